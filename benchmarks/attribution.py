"""Data-attribution primitives on a CIFAR-size ResNet-9: psgrad's scores, dots, Gram and projections against a plain
backward pass and against peer libraries (traker, dattri, kronfluence, captum), each in its own process.

    python benchmarks/attribution.py [--peer-python /tmp/attr-venv/bin/python] [--repeats 3]
                                     [--out benchmarks/cpu-attribution] [--only plain,psgrad-gram,...]

Workload: the ResNet-9 of the TRAK CIFAR-10 quickstart (conv-bn-relu 64, 128 (5x5, stride 2), a residual pair at 128,
256 + max-pool, a residual pair at 256, conv-bn-relu 256->128 without padding, adaptive max-pool, bias-free linear to
10 classes, output times 0.2; 2,274,880 parameters), written here from that description, random weights (seed 0),
BatchNorm in eval mode; 1000 training examples and 100 queries drawn with ``torch.randn`` from seeded generators
(labels random), batches of 100, k = 1024 for projections; cross-entropy per example.

Each contestant runs in a child process (this script with ``--child NAME``), which builds the model and data, resets
its peak-RSS mark, warms up on one batch of 100, then times full passes over the 1000 examples (``--repeats`` at most,
fewer when ``--budget-s`` is spent, the median taken). A peer whose warm-up says 1000 examples would take longer than
``--max-pass-s`` runs on fewer examples (whole batches) and its time is scaled to 1000 (a one-off cost such as
psgrad-dots' query gradients is not scaled); the table says so. ``--render FILE.json`` rewrites the table from a run.
Peak MB is the child's peak RSS (VmHWM, reset after building model and data) above its RSS at that point.

Fidelity, against a float64 truth from ``per_sample_grads(engine="loop", dtype=torch.float64)`` on a subset (the first
100 training examples and the 100 queries, to keep the truth affordable): for exact scores the relative Frobenius
error of the [100 train, 100 query] block (or of the first batch's [100, 100] Gram); for projections the Gram
distortion ||Z Z^T - G G^T||_F / ||G G^T||_F on the first batch (Z scaled by the projector's own normalization). Peers
that cover only the Conv2d/Linear weights (kronfluence, captum's sample-wise path) are compared with the truth over
those weights; traker differentiates TRAK's margin (not the loss), and is compared with the margin's Gram.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

N_TRAIN, N_QUERY, BATCH, DIM = int(os.environ.get("ATTR_BENCH_N", 1000)), 100, 100, 1024  # env: quick tests only
SUBSET = 100   # training examples in the fidelity truth

PSGRAD = ("plain", "psgrad-scores", "psgrad-dots", "psgrad-dots-given", "psgrad-gram", "psgrad-project-dense", "psgrad-project-kronecker",
          "psgrad-grads")
PEERS = ("traker", "dattri-trak", "dattri-tracin", "kronfluence", "captum-tracincp")
WHAT = {
    "plain": "forward + backward of the mean loss per batch (the yardstick)",
    "psgrad-scores": "exact [1000, 100] scores: per_sample_gram(batch, other=queries) per batch",
    "psgrad-dots": "exact [1000, 100] scores: query grads [100, P] once, then per_sample_dots per batch",
    "psgrad-dots-given": "exact [1000, 100] scores: per_sample_dots per batch, the queries' [100, P] gradients an input "
                         "(made by another process, loaded before the peak mark)",
    "psgrad-gram": "exact [100, 100] Gram of each batch with itself (per_sample_gram)",
    "psgrad-project-dense": "[1000, 1024] dense sign projection (psgrad.project)",
    "psgrad-project-kronecker": "[1000, 1024] kronecker (LoGra) projection (psgrad.project)",
    "psgrad-grads": "per_sample_grads(flat=True) per batch, [100, P] each, discarded",
    "traker": "TRAKer.featurize, CPU BasicProjector (normal, k=1024, float32): margin grads projected",
    "dattri-trak": "dattri TRAKAttributor.cache: projected grads (k=1024) and (X^T X)^-1 X^T",
    "dattri-tracin": "dattri TracInAttributor.attribute, projected (normal, k=1024) [1000, 100] scores",
    "kronfluence": "kronfluence identity-strategy pairwise scores [100, 1000] (Conv2d/Linear weights)",
    "captum-tracincp": "captum TracInCP.influence, sample-wise grads (Conv2d/Linear weights) [100, 1000] scores",
}


# -- workload ---------------------------------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _block(cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def resnet9(classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        _block(3, 64), _block(64, 128, 5, 2, 2),
        Residual(nn.Sequential(_block(128, 128), _block(128, 128))),
        _block(128, 256), nn.MaxPool2d(2),
        Residual(nn.Sequential(_block(256, 256), _block(256, 256))),
        _block(256, 128, 3, 1, 0), nn.AdaptiveMaxPool2d((1, 1)), nn.Flatten(),
        nn.Linear(128, classes, bias=False), Scale(0.2))


def workload():
    torch.manual_seed(0)
    model = resnet9().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N_TRAIN, 3, 32, 32, generator=g), torch.randint(0, 10, (N_TRAIN,), generator=g)
    g = torch.Generator().manual_seed(2)
    xq, yq = torch.randn(N_QUERY, 3, 32, 32, generator=g), torch.randint(0, 10, (N_QUERY,), generator=g)
    return model, x, y, xq, yq


def margin(logits, y):
    """TRAK's image-classification output: the correct logit minus the logsumexp of the others, per example."""
    correct = logits.gather(1, y[:, None])[:, 0]
    others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return correct - others.logsumexp(dim=1)


def convlinear_params(model: nn.Module) -> list[str]:
    names = []
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            names += [f"{mname}.{p}" for p, _ in m.named_parameters(recurse=False)]
    return names


def convlinear_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# -- memory -----------------------------------------------------------------------------------------------------
# -- contestants: each returns run(n) -> (seconds, fidelity dict), plus extra facts --------------------------------
def _batches(x, y, n):
    for s in range(0, n, BATCH):
        yield x[s:s + BATCH], y[s:s + BATCH]


def _query_grads(model, loss, xq, yq):
    """The queries' ``[Q, P]`` gradients, made in a forked process and loaded here: memory that making them freed
    would otherwise be reused by the measured calls without showing in their peak."""
    import multiprocessing

    import psgrad

    path = os.path.join(tempfile.mkdtemp(), "queries.pt")
    proc = multiprocessing.get_context("fork").Process(
        target=lambda: torch.save(psgrad.per_sample_grads(model, loss, xq, yq, flat=True), path))
    proc.start()
    proc.join()
    q = torch.load(path)
    os.remove(path)
    return q


def make_psgrad(name, model, x, y, xq, yq, extra):
    import psgrad

    ce = nn.CrossEntropyLoss(reduction="none")
    if name == "plain":
        mean = nn.CrossEntropyLoss()

        def run(n):
            for xb, yb in _batches(x, y, n):
                model.zero_grad(set_to_none=True)
                mean(model(xb), yb).backward()
            model.zero_grad(set_to_none=True)
            return {}
        extra["bytes_per_example"] = 0
        return run
    if name == "psgrad-scores":
        def run(n):
            first = None
            for xb, yb in _batches(x, y, n):
                s = psgrad.per_sample_gram(model, ce, xb, yb, other=(xq, yq))
                first = s if first is None else first
            return {"scores": first[:SUBSET]}
        extra["bytes_per_example"] = N_QUERY * 8
        return run
    if name == "psgrad-dots":
        def run(n):
            start = time.perf_counter()
            q = psgrad.per_sample_grads(model, ce, xq, yq, flat=True)
            extra.setdefault("query_grads_s", []).append(time.perf_counter() - start)
            first = None
            for xb, yb in _batches(x, y, n):
                s = psgrad.per_sample_dots(model, ce, xb, yb, q)
                first = s if first is None else first
            del q
            return {"scores": first[:SUBSET]}
        extra["bytes_per_example"] = N_QUERY * 8
        extra["note"] = "also holds the [100, P] float32 query gradients (%.0f MB) once" % (
            N_QUERY * sum(p.numel() for p in model.parameters()) * 4 / 2**20)
        return run
    if name == "psgrad-dots-given":
        q = _query_grads(model, ce, xq, yq)

        def run(n):
            first = None
            for xb, yb in _batches(x, y, n):
                s = psgrad.per_sample_dots(model, ce, xb, yb, q)
                first = s if first is None else first
            return {"scores": first[:SUBSET]}
        extra["bytes_per_example"] = N_QUERY * 8
        return run
    if name == "psgrad-gram":
        def run(n):
            first = None
            for xb, yb in _batches(x, y, n):
                k = psgrad.per_sample_gram(model, ce, xb, yb)
                first = k if first is None else first
            return {"gram": first}
        extra["bytes_per_example"] = BATCH * 8
        return run
    if name.startswith("psgrad-project"):
        proj = psgrad.Projector(model, DIM, kind=name.rsplit("-", 1)[1], seed=0)

        def run(n):
            first = None
            for xb, yb in _batches(x, y, n):
                z = psgrad.project(model, ce, xb, yb, proj)
                first = z if first is None else first
            return {"Z": first, "scale": 1.0}
        extra["bytes_per_example"] = DIM * 4
        return run
    if name == "psgrad-grads":
        def run(n):
            for xb, yb in _batches(x, y, n):
                g = psgrad.per_sample_grads(model, ce, xb, yb, flat=True)
                del g
            return {}
        extra["bytes_per_example"] = sum(p.numel() for p in model.parameters()) * 4
        extra["note"] = "bytes/example if the [B, P] rows were kept"
        return run
    raise KeyError(name)


def child(name: str, args) -> dict:
    from attribution_parts import peak_mb, reset_peak, rss_mb

    torch.set_num_threads(args.threads)
    model, x, y, xq, yq = workload()
    extra: dict = {}
    work = args.work
    if name in PEERS:
        try:
            from attribution_parts import make_peer

            run = make_peer(name, model, x, y, xq, yq, extra, work)
        except ImportError as e:
            return {"name": name, "status": "not installed", "why": f"{type(e).__name__}: {e}"}
    else:
        run = make_psgrad(name, model, x, y, xq, yq, extra)
    base = rss_mb()
    exact_peak = reset_peak()
    start = time.perf_counter()
    fid = run(BATCH)                                  # warm-up on one batch (also the calibration)
    warm = time.perf_counter() - start
    n = N_TRAIN
    if name in PEERS and warm * N_TRAIN / BATCH > args.max_pass_s:   # psgrad's contestants always run in full
        n = max(BATCH, BATCH * int(args.max_pass_s / warm))
        n = min(n, N_TRAIN)
    seconds, spent = [], 0.0
    for i in range(args.repeats):
        extra.pop("query_grads_s", None) if i == 0 else None
        start = time.perf_counter()
        fid = run(n)
        seconds.append(time.perf_counter() - start)
        spent += seconds[-1]
        if spent + seconds[-1] > args.budget_s:
            break
    torch.save(fid, os.path.join(work, f"{name}.pt"))
    fixed = statistics.median(extra["query_grads_s"]) if "query_grads_s" in extra else 0.0   # once, not per example
    return {"name": name, "status": "ok", "examples": n, "warmup_s": warm, "seconds": seconds,
            "s_per_1000": (statistics.median(seconds) - fixed) * 1000 / n + fixed, "peak_mb": peak_mb() - base,
            "peak_exact": exact_peak, "base_rss_mb": base, **extra}


def truth(args) -> dict:
    """float64 loop-engine per-sample gradients of the first SUBSET training examples and the queries."""
    import psgrad

    torch.set_num_threads(args.threads)
    model, x, y, xq, yq = workload()
    names = [n for n, _ in model.named_parameters()]
    cl = set(convlinear_params(model))
    mask = torch.cat([torch.full((p.numel(),), n in cl, dtype=torch.bool) for n, p in model.named_parameters()])
    ce = nn.CrossEntropyLoss(reduction="none")

    def flat(loss, xs, ys):
        g = psgrad.per_sample_grads(model, loss, xs, ys, engine="loop", dtype=torch.float64)
        return torch.cat([g[n].reshape(len(xs), -1).double() for n in names], dim=1)

    start = time.perf_counter()
    g, q = flat(ce, x[:SUBSET], y[:SUBSET]), flat(ce, xq, yq)
    out = {"scores": g @ q.T, "gram": g @ g.T, "scores_convlinear": g[:, mask] @ q[:, mask].T}
    del q
    m = flat(margin, x[:SUBSET], y[:SUBSET])
    out["gram_margin"] = m @ m.T
    torch.save(out, os.path.join(args.work, "truth.pt"))
    return {"name": "truth", "status": "ok", "seconds": [time.perf_counter() - start]}


# -- parent ---------------------------------------------------------------------------------------------------
def rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


def fidelity(name: str, work: str, truth_: dict) -> tuple[float | None, str]:
    path = os.path.join(work, f"{name}.pt")
    if not os.path.exists(path):
        return None, ""
    f = torch.load(path)
    if "scores" in f:
        key = "scores_convlinear" if f.get("params") == "convlinear" else "scores"
        kind = "score rel. error" + (" (projected)" if f.get("approx") else "")
        return rel(f["scores"], truth_[key]), kind + (" vs Conv/Linear truth" if key != "scores" else "")
    if "gram" in f:
        return rel(f["gram"], truth_["gram"]), "Gram rel. error"
    if "Z" in f:
        z = f["Z"].double() * f["scale"]
        key = "gram_margin" if f.get("target") == "margin" else "gram"
        return rel(z @ z.T, truth_[key]), "Gram distortion" + (" (margin grads)" if key != "gram" else "")
    return None, ""


def spawn(python: str, name: str, args, timeout: float) -> dict:
    cmd = [python, os.path.abspath(__file__), "--child", name, "--work", args.work, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--budget-s", str(args.budget_s), "--max-pass-s", str(args.max_pass_s)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "timeout", "why": f"over {timeout:.0f} s"}
    wall = time.perf_counter() - start
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            result["child_wall_s"] = wall
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
    return {"name": name, "status": "error", "why": "\n".join(tail), "child_wall_s": wall}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "?"


def _render(*args) -> None:
    from attribution_parts import render

    render(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/cpu-attribution")
    p.add_argument("--peer-python", default=sys.executable, help="interpreter with the peer packages (and psgrad)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes at most (after one warm-up batch)")
    p.add_argument("--budget-s", type=float, default=240.0, help="stop repeating once the timed passes took this long")
    p.add_argument("--max-pass-s", type=float, default=600.0,
                   help="a contestant whose 1000 examples would take longer runs on fewer and is scaled")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--only", default="", help="comma-separated contestants (default: all)")
    p.add_argument("--timeout-s", type=float, default=2400.0, help="per child")
    p.add_argument("--render", default=None, help="only rewrite OUT.md from this earlier run's JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        result = truth(args) if args.child == "truth" else child(args.child, args)
        print(json.dumps(result), flush=True)
        return

    if args.render:
        with open(args.render) as f:
            found = json.load(f)
        _render(args.out, found["machine"], found["setup"], found["rows"])
        return
    names = [n for n in args.only.split(",") if n] or list(PSGRAD + PEERS)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        t = spawn(sys.executable, "truth", args, args.timeout_s)
        print(f"truth (float64 loop, {SUBSET} train + {N_QUERY} queries): {t}", flush=True)
        truth_ = torch.load(os.path.join(work, "truth.pt")) if t["status"] == "ok" else None
        for name in names:
            r = spawn(args.peer_python if name in PEERS else sys.executable, name, args, args.timeout_s)
            r["computes"] = WHAT[name]
            if r["status"] == "ok" and truth_ is not None:
                r["fidelity"], r["fidelity_kind"] = fidelity(name, work, truth_)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "computes"}), flush=True)
    plain = next((r["s_per_1000"] for r in rows if r["name"] == "plain" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and plain:
            r["ratio_to_plain"] = r["s_per_1000"] / plain
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cpus": os.cpu_count(), "threads": args.threads, "psgrad_commit": _commit(),
               "peer_python": args.peer_python}
    setup = {"model": "TRAK-quickstart ResNet-9, eval-mode BatchNorm, 2,274,880 parameters", "train": N_TRAIN,
             "queries": N_QUERY, "batch": BATCH, "k": DIM, "fidelity_subset": SUBSET, "repeats": args.repeats,
             "budget_s": args.budget_s, "max_pass_s": args.max_pass_s,
             "command": "python benchmarks/attribution.py " + " ".join(sys.argv[1:])}
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": machine, "setup": setup, "rows": rows}, f, indent=2)
    _render(args.out, machine, setup, rows)


if __name__ == "__main__":
    main()
