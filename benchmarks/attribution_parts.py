"""Parts of ``benchmarks/attribution.py``: the peer libraries' contestants (traker, dattri, kronfluence, captum),
each through its public API as documented, on the same workload; the child's memory readings; the table."""

from __future__ import annotations

import math
import os
import resource
import statistics
import tempfile

import torch
from attribution import BATCH, DIM, N_QUERY, SUBSET, _batches, convlinear_modules
from torch import nn


def _status(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    now = _status("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_peer(name, model, x, y, xq, yq, extra, work):
    from torch.utils.data import DataLoader, TensorDataset

    ckpt = os.path.join(work, "model.pt")
    torch.save(model.state_dict(), ckpt)
    nparams = sum(p.numel() for p in model.parameters())

    if name == "traker":
        import trak
        from trak import TRAKer
        extra["version"] = getattr(trak, "__version__", "?")

        def run(n):
            with tempfile.TemporaryDirectory(dir=work) as save:
                traker = TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=save,
                                device="cpu", proj_dim=DIM, use_half_precision=False, logging_level=40)
                traker.load_checkpoint(model.state_dict(), model_id=0)
                for xb, yb in _batches(x, y, n):
                    traker.featurize(batch=(xb, yb), num_samples=len(xb))
                feats = torch.as_tensor(traker.saver.current_store["grads"][:SUBSET]).clone().float()
            # features are g^T R / sqrt(P), R standard normal: E[z z^T] = k / P g g^T
            return {"Z": feats, "scale": math.sqrt(nparams / DIM), "target": "margin"}
        extra["bytes_per_example"] = DIM * 4 + 4
        return run

    if name.startswith("dattri"):
        import dattri
        from dattri.task import AttributionTask
        extra["version"] = getattr(dattri, "__version__", None) or _dist_version("dattri")
        ce_mean = nn.CrossEntropyLoss()

        def loss_func(params, data):
            image, label = data
            out = torch.func.functional_call(model, params, image.unsqueeze(0))
            return ce_mean(out, label.unsqueeze(0))

        def correct_probability(params, data):
            image, label = data
            out = torch.func.functional_call(model, params, image.unsqueeze(0))
            return torch.exp(-ce_mean(out, label.unsqueeze(0)))

        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        projector = {"proj_dim": DIM, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
        if name == "dattri-trak":
            from dattri.algorithm import TRAKAttributor

            def run(n):
                att = TRAKAttributor(task=task, correct_probability_func=correct_probability,
                                     projector_kwargs=dict(projector), device="cpu", regularization=1e-8)
                att.cache(DataLoader(TensorDataset(x[:n], y[:n]), batch_size=BATCH, shuffle=False))
                return {}
            extra["bytes_per_example"] = DIM * 4
            extra["note"] = "fidelity n/a: TRAK's scores include the (X^T X)^-1 correction, not plain dots"
            return run
        from dattri.algorithm import TracInAttributor

        def run(n):
            att = TracInAttributor(task=task, weight_list=torch.ones(1), normalized_grad=False,
                                   projector_kwargs=dict(projector), device="cpu")
            scores = att.attribute(DataLoader(TensorDataset(x[:n], y[:n]), batch_size=BATCH, shuffle=False),
                                   DataLoader(TensorDataset(xq, yq), batch_size=BATCH, shuffle=False))
            # dattri's projector divides by sqrt(k): the scores are unbiased estimates of <g, q>
            return {"scores": scores[:SUBSET].double(), "approx": True}
        extra["bytes_per_example"] = N_QUERY * 4
        return run

    if name == "kronfluence":
        import kronfluence
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        extra["version"] = getattr(kronfluence, "__version__", None) or _dist_version("kronfluence")
        import torch.nn.functional as F

        class CE(Task):
            def compute_train_loss(self, batch, model, sample=False):
                inputs, labels = batch
                logits = model(inputs)
                if sample:
                    with torch.no_grad():
                        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                return F.cross_entropy(logits, labels, reduction="sum")

            def compute_measurement(self, batch, model):
                inputs, labels = batch
                return F.cross_entropy(model(inputs), labels, reduction="sum")

        task = CE()
        model = prepare_model(model, task)
        out_dir = os.path.join(work, "kronfluence")

        def run(n):
            analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True,
                                output_dir=out_dir, log_level=40)
            train = TensorDataset(x[:n], y[:n])
            analyzer.fit_all_factors(factors_name="identity", dataset=train, per_device_batch_size=BATCH,
                                     factor_args=FactorArguments(strategy="identity"), overwrite_output_dir=True)
            analyzer.compute_pairwise_scores(scores_name="scores", factors_name="identity",
                                             query_dataset=TensorDataset(xq, yq), train_dataset=train,
                                             per_device_query_batch_size=N_QUERY, per_device_train_batch_size=BATCH,
                                             score_args=ScoreArguments(), overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores(scores_name="scores")["all_modules"]   # [Q, N]
            return {"scores": scores[:, :SUBSET].T.double(), "params": "convlinear"}
        extra["bytes_per_example"] = N_QUERY * 4
        return run

    if name == "captum-tracincp":
        import captum
        from captum.influence import TracInCP
        extra["version"] = captum.__version__
        layers = convlinear_modules(model)

        def run(n):
            tracin = TracInCP(model, TensorDataset(x[:n], y[:n]), checkpoints=[ckpt],
                              checkpoints_load_func=lambda m, path: (m.load_state_dict(torch.load(path)), 1.0)[1],
                              layers=layers, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=BATCH,
                              sample_wise_grads_per_batch=True)
            scores = tracin.influence((xq, yq), k=None)   # [Q, N]
            return {"scores": scores[:, :SUBSET].T.double(), "params": "convlinear"}
        extra["bytes_per_example"] = N_QUERY * 4
        return run
    raise KeyError(name)


def _dist_version(dist: str) -> str:
    from importlib.metadata import version
    try:
        return version(dist)
    except Exception:  # noqa: BLE001
        return "?"


def render(out: str, machine: dict, setup: dict, rows: list[dict]) -> None:
    lines = [f"# Data attribution on a CIFAR-size ResNet-9 ({setup['train']} examples, {setup['queries']} queries, "
             f"batch {setup['batch']}, k = {setup['k']})", "",
             f"Machine: {machine['platform']}, {machine['cpus']} CPUs, {machine['threads']} threads, torch "
             f"{machine['torch']}, psgrad {machine['psgrad_commit']}. Model: {setup['model']}, random weights. Each "
             "contestant in its own process; seconds per 1000 examples are the median of up to "
             f"{setup['repeats']} timed passes after a one-batch warm-up (one pass where a pass took over half of "
             f"{setup['budget_s']:.0f} s). Peers whose 1000 examples would take over {setup['max_pass_s']:.0f} s ran "
             "on fewer (whole batches) and were scaled. Peak MB: the child's peak RSS above its RSS after building "
             "model and data. Fidelity against a float64 loop-engine truth on the first "
             f"{setup['fidelity_subset']} training examples and the {setup['queries']} queries (Gram: the first "
             f"batch of {setup['batch']}). Made by `{setup.get('command', 'python benchmarks/attribution.py')}`.", "",
             "| contestant | s / 1000 ex. | x plain | peak MB | bytes / example | fidelity | computes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            why = r.get("why", "").splitlines()[-1][:160] if r.get("why") else ""
            lines.append(f"| {r['name']} | {r['status']} | | | | | {why} |")
            continue
        s = f"{r['s_per_1000']:.1f}"
        if r["examples"] < setup["train"]:
            s += f" (scaled from {r['examples']})"
        fid = f"{r['fidelity']:.1e} ({r['fidelity_kind']})" if r.get("fidelity") is not None else (
            "n/a" if r["name"] != "plain" else "")
        what = r["computes"]
        if r.get("query_grads_s"):
            what += f"; query grads {statistics.median(r['query_grads_s']):.1f} s of it"
        if r.get("note"):
            what += f"; {r['note']}"
        if r.get("version"):
            what += f" (v{r['version']})"
        lines.append(f"| {r['name']} | {s} | {r.get('ratio_to_plain', float('nan')):.1f} | {r['peak_mb']:.0f} | "
                     f"{r['bytes_per_example']:,} | {fid} | {what} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
