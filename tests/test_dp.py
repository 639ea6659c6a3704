"""psgrad.dp: Poisson sampling, the DP-SGD step against the truth, noise statistics, accounting against
dp_accounting itself, checkpoint/resume, every bad input, and a short ``psgrad train``.

Statistical checks use bounds derived from the sample size: a mean of n i.i.d. draws with std s is within
Z * s / sqrt(n) of its expectation with probability >= 1 - 2 * Phi(-Z). Z = 5 makes a false failure about
6e-7 likely per check; the seeded checks are deterministic anyway, the secure ones are not.
"""

from __future__ import annotations

import copy
import json
import math

import dp_accounting
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import psgrad
import psgrad.cli
from psgrad import PsgradError
from psgrad.dp import (
    DPSGD,
    Accountant,
    CounterNoise,
    PoissonSampler,
    SecureNoise,
    SeededNoise,
    epsilon_for,
    load_checkpoint,
    noise_multiplier_for,
    poisson_loader,
    save_checkpoint,
    secure_normal,
)
from psgrad.dp import cli as dp_cli
from psgrad.dp import trainers as dp_trainers
from psgrad.verify import tolerance

Z = 5.0
CE = nn.CrossEntropyLoss(reduction="none")


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds wake-up latency (severe on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _data(n=40, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype) * 3, torch.randint(0, 3, (n,), generator=g)


def _dp(model, *, q=0.25, n=40, sigma=1.3, max_norm=0.5, seed=7, lr=0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    return DPSGD(model, CE, opt, noise_multiplier=sigma, max_norm=max_norm, sample_rate=q, dataset_size=n,
                 seed=seed, **kw)


def _noise_like(model, seed, std, draw=0):
    """The documented noise of one step: draw ``draw`` of the default CounterNoise(seed), one flat draw of P
    values split in named_parameters order (CounterNoise's own numbers are tested below)."""
    named = list(model.named_parameters())
    noise = CounterNoise(seed)
    total = sum(p.numel() for _, p in named)
    noise.blocks = draw * -(-total // noise.BLOCK)  # the blocks of the earlier draws
    flat = noise.standard_normal((sum(p.numel() for _, p in named),), named[0][1].dtype, torch.device("cpu"))
    parts = flat.split([p.numel() for _, p in named])
    return {n: std * z.view(p.shape) for (n, p), z in zip(named, parts)}


# -- sampling ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("secure", [False, True])
def test_sampler_inclusion_rate(secure):
    n, q = 2000, 0.1
    sampler = PoissonSampler(n, q, steps=50, **({"secure": True} if secure else {"seed": 3}))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    counts = torch.zeros(n)
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < n for i in b)
        counts[b] += 1
    trials = n * len(batches)  # total included ~ Binomial(trials, q)
    assert abs(counts.sum().item() - trials * q) <= Z * math.sqrt(trials * q * (1 - q))
    # Each example: Binomial(50, q); their mean over 2000 examples has the same bound per example.
    assert abs(counts.mean().item() - 50 * q) <= Z * math.sqrt(50 * q * (1 - q) / n)


def test_sampler_reproducible_and_resumable():
    a = [list(PoissonSampler(300, 0.05, seed=11)) for _ in range(2)]
    assert a[0] == a[1]
    assert a[0] != list(PoissonSampler(300, 0.05, seed=12))
    assert len(a[0]) == 20  # round(1 / q)

    s = PoissonSampler(300, 0.05, seed=11)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = s.state_dict()
    fresh = PoissonSampler(300, 0.05, seed=999)
    fresh.load_state_dict(state)
    rest = list(fresh)  # finishes the pass it was saved in
    assert head + rest == a[0]
    second_pass = list(fresh)
    s2 = PoissonSampler(300, 0.05, seed=11)
    list(s2)
    assert second_pass == list(s2)


def test_loader_yields_empty_batches_with_shape():
    x, y = _data(10)
    loader = poisson_loader(TensorDataset(x, y), 0.01, seed=0, steps=30)
    sizes = []
    for xb, yb in loader:
        sizes.append(len(yb))
        assert xb.shape[1:] == (6,) and xb.dtype == x.dtype and yb.dtype == y.dtype
    assert 0 in sizes


# -- the DP-SGD step ---------------------------------------------------------------------------------
def test_step_equals_truth_clipped_sum_plus_seeded_noise():
    model = _model()
    x, y = _data(9)
    dp = _dp(model, sigma=1.3, max_norm=0.5, seed=7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    truth = psgrad.clipped_grad_sum(model, CE, x, y, 0.5, engine="loop", dtype=torch.float64)
    record = dp.train_step(x, y)
    noise = _noise_like(model, 7, 1.3 * 0.5)
    m = 0.25 * 40
    for name, p in model.named_parameters():
        expected = (truth[name] + noise[name].double()) / m
        err = (p.grad.double() - expected).norm() / expected.norm()
        assert err <= tolerance(torch.float32), (name, err)
        # SGD with momentum on a fresh buffer: the first update is -lr * grad, two float32 roundings at most
        bound = 2.0**-23 * (before[name].abs() + (0.1 * p.grad).abs())
        assert ((p.detach() - (before[name] - 0.1 * p.grad)).abs() <= bound).all(), name
    norms = psgrad.per_sample_norms(model, CE, x, y, engine="loop", dtype=torch.float64)
    assert record.examples == 9 and record.clipped == int((norms > 0.5).sum())
    assert dp.accountant.history == [(0.25, 1.3, 1)]


@pytest.mark.parametrize("clipping", ["per_layer", "automatic"])
def test_step_passes_clipping_modes_through(clipping):
    model = _model()
    x, y = _data(7)
    bounds = {"0": 0.3, "2": 0.4} if clipping == "per_layer" else 0.5
    dp = _dp(model, max_norm=bounds, clipping=clipping, seed=5, sigma=2.0)
    truth = psgrad.clipped_grad_sum(model, CE, x, y, bounds, clipping=clipping, engine="loop", dtype=torch.float64)
    dp.train_step(x, y)
    total = 0.5 if clipping == "automatic" else math.sqrt(0.3**2 + 0.4**2)
    assert dp.noise_std == pytest.approx(2.0 * total)
    noise = _noise_like(model, 5, 2.0 * total)
    for name, p in model.named_parameters():
        expected = (truth[name] + noise[name].double()) / 10
        assert (p.grad.double() - expected).norm() / expected.norm() <= tolerance(torch.float32)


def test_empty_batch_is_a_noise_only_accounted_step():
    model = _model()
    dp = _dp(model, sigma=1.1, max_norm=2.0, seed=3)
    record = dp.train_step(torch.empty(0, 6), torch.empty(0, dtype=torch.int64))
    noise = _noise_like(model, 3, 1.1 * 2.0)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, noise[name] / 10)
    assert record.examples == 0 and math.isnan(record.clipped_fraction)
    assert dp.accountant.steps == 1
    assert dp.epsilon(1e-5) == epsilon_for(0.25, 1.1, 1, 1e-5) > 0
    dp.step()  # no accumulate at all: also a noise-only step
    assert dp.accountant.steps == 2


def test_virtual_steps_equal_one_big_step():
    x, y = _data(23, dtype=torch.float64)
    big, small = _model(torch.float64), _model(torch.float64)
    dp_big, dp_small = _dp(big, seed=4), _dp(small, seed=4)
    for _ in range(2):
        dp_big.train_step(x, y)
        dp_small.train_step(x, y, physical_batch_size=5)
    assert dp_big.records == dp_small.records
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        # float64 sums in another order: differences of a few ulps of the gradient's norm
        assert (a - b).norm() <= 1e-12 * a.norm(), name
    # the same by hand, with accumulate
    manual = _model(torch.float64)
    dp_manual = _dp(manual, seed=4)
    for _ in range(2):
        for part in (slice(0, 10), slice(10, 10), slice(10, 23)):
            dp_manual.accumulate(x[part], y[part])
        dp_manual.step()
    for a, b in zip(big.parameters(), manual.parameters()):
        assert (a - b).norm() <= 1e-12 * a.norm()


@pytest.mark.parametrize("noise", ["seeded", "secure"])
def test_noise_std_is_sigma_times_bound(noise):
    torch.manual_seed(0)
    model = nn.Linear(200, 100)  # 20100 noise draws per step
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    kw = {"secure": True} if noise == "secure" else {"seed": 0}
    dp = DPSGD(model, CE, opt, noise_multiplier=0.7, max_norm=3.0, sample_rate=0.5, dataset_size=8, **kw)
    dp.step()
    g = torch.cat([p.grad.flatten() for p in model.parameters()]).double() * 4.0  # times q * N
    n, std = g.numel(), 0.7 * 3.0
    # mean: N(0, std^2 / n); mean of squares / std^2: mean 1, variance 2 / n (chi-square with n degrees)
    assert abs(g.mean().item()) <= Z * std / math.sqrt(n)
    assert abs((g**2).mean().item() / std**2 - 1) <= Z * math.sqrt(2 / n)


def test_secure_normal_distribution():
    n = 400_000
    z = secure_normal(n)
    assert z.dtype == torch.float64 and z.shape == (n,)
    assert abs(z.mean().item()) <= Z / math.sqrt(n)
    assert abs((z**2).mean().item() - 1) <= Z * math.sqrt(2 / n)
    # Kolmogorov-Smirnov distance to the normal CDF; P(sqrt(n) D > 2.0) < 2 exp(-8) ~ 7e-4 (DKW),
    # so with bound 2.8: P < 2 exp(-2 * 2.8^2) ~ 3e-7.
    s = z.sort().values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert math.sqrt(n) * d <= 2.8
    assert SecureNoise().standard_normal((3, 4), torch.float32, torch.device("cpu")).dtype == torch.float32


def test_seeded_noise_state_roundtrip():
    a = SeededNoise(seed=5)
    a.standard_normal((10,), torch.float32, torch.device("cpu"))
    state = a.state_dict()
    expected = a.standard_normal((10,), torch.float32, torch.device("cpu"))
    b = SeededNoise(seed=0)
    b.load_state_dict(state)
    assert torch.equal(b.standard_normal((10,), torch.float32, torch.device("cpu")), expected)


def _mix32_reference(x: int) -> int:
    """lowbias32 (C. Wellons' hash-prospector), written out again from its definition."""
    x = x % 2**32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) % 2**32
    x = ((x ^ (x >> 15)) * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def _splitmix64_reference(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def test_counter_noise_is_its_documented_function():
    """Block b of the run is torch.randn of a generator seeded with mix32(splitmix64(seed) + b)."""
    noise = CounterNoise(seed=123)
    noise.BLOCK = 5
    first = noise.standard_normal((12,), torch.float64, torch.device("cpu"))  # blocks 0, 1, 2
    second = noise.standard_normal((3, 2), torch.float64, torch.device("cpu"))  # blocks 3, 4
    assert (noise.draws, noise.blocks) == (2, 5)
    base = _splitmix64_reference(123)

    def block(b, n):
        return torch.randn(n, generator=torch.Generator().manual_seed(_mix32_reference(base + b)), dtype=torch.float64)

    assert torch.equal(first, torch.cat([block(0, 5), block(1, 5), block(2, 2)]))
    assert torch.equal(second.flatten(), torch.cat([block(3, 5), block(4, 1)]))


def test_counter_noise_block_seeds_never_repeat_within_a_run():
    """torch's CPU generator uses 32 bits of a seed: block seeds must be distinct 32-bit values, which a
    bijection of the block number gives (checked on the first 2**20 blocks, and on both ends of the range)."""
    base = _splitmix64_reference(7)
    seeds = {_mix32_reference(base + b) for b in range(1 << 20)}
    assert len(seeds) == 1 << 20
    ends = [_mix32_reference(base + b) for b in (*range(1000), *range(2**32 - 1000, 2**32))]
    assert len(set(ends)) == len(ends)
    noise = CounterNoise(seed=7)
    noise.blocks = CounterNoise.MAX_BLOCKS - 1
    with pytest.raises(PsgradError, match="at most"):
        noise.standard_normal((2 * noise.BLOCK,), torch.float32, torch.device("cpu"))


def test_counter_noise_distribution_and_resume():
    noise = CounterNoise(seed=1)
    noise.BLOCK = 1000
    z = torch.cat([noise.standard_normal((30_000,), torch.float64, torch.device("cpu")) for _ in range(4)])
    n = z.numel()
    assert abs(z.mean().item()) <= Z / math.sqrt(n)
    assert abs((z**2).mean().item() - 1) <= Z * math.sqrt(2 / n)
    # neighbouring blocks and draws are not copies or shifts of one another: correlation of independent
    # normals over m pairs is N(0, 1/m)
    pairs = [(z[:1000], z[1000:2000]), (z[:30_000], z[30_000:60_000])]
    for a, b in pairs:
        assert abs(float((a * b).mean())) <= Z / math.sqrt(a.numel())
    state = noise.state_dict()
    expected = noise.standard_normal((2500,), torch.float32, torch.device("cpu"))
    again = CounterNoise(seed=99)
    again.BLOCK = 1000
    again.load_state_dict(state)
    assert torch.equal(again.standard_normal((2500,), torch.float32, torch.device("cpu")), expected)


# -- accounting --------------------------------------------------------------------------------------
def test_rdp_epsilon_matches_dp_accounting_composed_per_step():
    acc = Accountant("rdp")
    direct = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1))
    for _ in range(10):
        acc.step(0.02, 1.1)
        direct.compose(event)
    acc.step(0.05, 2.0, steps=40)
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(2.0)), 40)
    assert acc.history == [(0.02, 1.1, 10), (0.05, 2.0, 40)]
    # RDP adds up per order: 10 additions against one multiplication differ by float rounding only
    assert acc.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    rebuilt = Accountant("rdp", history=acc.history)
    assert rebuilt.epsilon(1e-5) == acc.epsilon(1e-5)


def test_pld_epsilon_matches_dp_accounting():
    acc = Accountant("pld")
    acc.step(0.05, 1.2, steps=100)
    direct = dp_accounting.pld.PLDAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.2)), 100)
    assert acc.epsilon(1e-5) == direct.get_epsilon(1e-5)
    assert acc.epsilon(1e-5) < epsilon_for(0.05, 1.2, 100, 1e-5, "rdp")  # PLD is the tighter bound


@pytest.mark.parametrize("method, rtol", [("rdp", 1e-3), ("pld", 2e-2)])  # PLD points cost more
def test_noise_multiplier_search_round_trips(method, rtol):
    q, steps, delta, target = 0.05, 10, 1e-5, 1.5
    sigma = noise_multiplier_for(target, sample_rate=q, steps=steps, delta=delta, method=method, rtol=rtol)
    assert epsilon_for(q, sigma, steps, delta, method) <= target
    assert epsilon_for(q, sigma / (1 + rtol), steps, delta, method) > target  # the smallest, to rtol


# -- checkpoint and resume ---------------------------------------------------------------------------
def _run(epochs, *, resume_from=None, save_to=None, stop_after=None):
    x, y = _data(40)
    model = _model()
    loader = poisson_loader(TensorDataset(x, y), 0.2, seed=21)
    dp = _dp(model, q=0.2, seed=8, sigma=1.0)
    start = 0
    if resume_from:
        start = load_checkpoint(resume_from, model=model, optimizer=dp, sampler=loader.batch_sampler)["epoch"]
    for epoch in range(start, epochs):
        for i, (xb, yb) in enumerate(loader):
            dp.train_step(xb, yb)
            if stop_after == (epoch, i):  # interrupted mid-pass
                save_checkpoint(save_to, model=model, optimizer=dp, sampler=loader.batch_sampler,
                                extra={"epoch": epoch})
                return model, dp
    return model, dp


def test_resume_matches_uninterrupted_run_bitwise(tmp_path):
    path = tmp_path / "run.pt"
    full_model, full_dp = _run(3)
    _run(3, save_to=path, stop_after=(1, 2))
    model, dp = _run(3, resume_from=path)
    for (name, a), b in zip(full_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    assert dp.accountant.history == full_dp.accountant.history == [(0.2, 1.0, 15)]
    assert dp.epsilon(1e-5) == full_dp.epsilon(1e-5)
    assert dp.records == full_dp.records


def test_checkpoint_refuses_half_accumulated_batch(tmp_path):
    model = _model()
    dp = _dp(model)
    x, y = _data(4)
    dp.accumulate(x, y)
    with pytest.raises(PsgradError, match="half accumulated"):
        save_checkpoint(tmp_path / "x.pt", model=model, optimizer=dp)


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"max_norm": 0.0}, "max_norm must be a positive"),
    ({"max_norm": -1.0}, "max_norm must be a positive"),
    ({"max_norm": float("nan")}, "max_norm must be a positive"),
    ({"max_norm": {"0": 1.0, "2": -1.0}, "clipping": "per_layer"}, "bounds must be positive"),
    ({"max_norm": {"0": 1.0}, "clipping": "per_layer"}, r"missing \['2'\]"),
    ({"max_norm": {"0": 1.0, "2": 1.0}}, "needs clipping='per_layer'"),
    ({"sigma": 0.0}, "noise_multiplier must be a positive"),
    ({"sigma": -0.5}, "noise_multiplier must be a positive"),
    ({"q": 0.0}, r"sample_rate must be a probability in \(0, 1\]"),
    ({"q": 1.5}, r"sample_rate must be a probability in \(0, 1\]"),
    ({"q": -0.1}, r"sample_rate must be a probability in \(0, 1\]"),
    ({"n": 0}, "dataset_size must be a positive int"),
    ({"clipping": "median"}, "unknown clipping 'median'"),
    ({"accountant": "moments"}, "unknown accountant 'moments'"),
])
def test_dpsgd_bad_input(kw, match):
    with pytest.raises(PsgradError, match=f"DPSGD: .*{match}"):
        _dp(_model(), **kw)


def test_dpsgd_optimizer_must_match_model():
    model = _model()
    other = torch.optim.SGD(_model(seed=1).parameters(), lr=0.1)
    with pytest.raises(PsgradError, match="not trainable parameters of the model"):
        DPSGD(model, CE, other, noise_multiplier=1.0, max_norm=1.0, sample_rate=0.1, dataset_size=10)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_bad_delta(delta):
    with pytest.raises(PsgradError, match=r"delta must be in \(0, 1\)"):
        Accountant().epsilon(delta)
    with pytest.raises(PsgradError, match=r"noise_multiplier_for: delta must be in \(0, 1\)"):
        noise_multiplier_for(1.0, sample_rate=0.1, steps=10, delta=delta)


def test_bad_sample_rate_in_sampler_and_accountant():
    with pytest.raises(PsgradError, match="PoissonSampler: sample_rate"):
        PoissonSampler(10, 0.0)
    with pytest.raises(PsgradError, match="Accountant.step: sample_rate"):
        Accountant().step(1.01, 1.0)
    with pytest.raises(PsgradError, match="Accountant.step: noise_multiplier"):
        Accountant().step(0.1, 0.0)


@pytest.mark.parametrize("target", [0.0, -1.0, float("inf")])
def test_non_positive_epsilon_target(target):
    with pytest.raises(PsgradError, match="target_epsilon must be a positive"):
        noise_multiplier_for(target, sample_rate=0.1, steps=10, delta=1e-5)


def test_unreachable_epsilon_target():
    # RDP's conversion to (epsilon, delta) has a floor near log(1/delta) / (max order - 1) whatever sigma is.
    with pytest.raises(PsgradError, match="unreachable"):
        noise_multiplier_for(1e-3, sample_rate=0.5, steps=1000, delta=1e-5)


def test_cli_bad_input_fails_before_training(capsys):
    assert dp_cli.main(["--delta", "1.5"]) == 2
    assert "--delta must be in (0, 1)" in capsys.readouterr().out
    assert dp_cli.main(["--epsilon", "-1"]) == 2
    assert dp_cli.main(["--max-norm", "0"]) == 2
    assert dp_cli.main(["--epsilon", "0.001"]) == 2
    assert "unreachable" in capsys.readouterr().out


# -- psgrad train ------------------------------------------------------------------------------------
SMALL = ["--epochs", "2", "--batch-size", "480", "--width", "4", "--noise-multiplier", "1.5"]


def test_train_cli_short_run_writes_json(tmp_path):
    path = tmp_path / "run.json"
    small = ["--epochs", "2", "--batch-size", "480", "--width", "4"]  # sigma from the default target epsilon
    assert psgrad.cli.main(["train", *small, "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    (run,) = doc["runs"]
    assert [r["epoch"] for r in run["records"]] == [1, 2]
    assert doc["settings"]["sample_rate"] == 480 / 1437
    assert 0 < run["final"]["epsilon"] <= 8.0


def test_train_cli_resume_matches_uninterrupted(tmp_path, monkeypatch):
    full = tmp_path / "full.json"
    assert dp_cli.main([*SMALL, "--json", str(full)]) == 0

    real_save = dp_trainers.save_checkpoint

    def save_then_stop(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint

    ckpt, resumed = tmp_path / "run.pt", tmp_path / "resumed.json"
    monkeypatch.setattr(dp_trainers, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        dp_cli.main([*SMALL, "--checkpoint", str(ckpt)])
    monkeypatch.setattr(dp_trainers, "save_checkpoint", real_save)
    assert dp_cli.main([*SMALL, "--resume", str(ckpt), "--json", str(resumed)]) == 0

    def strip(path):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(path.read_text())["runs"][0]["records"]]

    assert strip(resumed) == strip(full)
    assert dp_cli.main([*SMALL, "--lr", "0.3", "--resume", str(ckpt)]) == 2  # other settings: refused


def test_train_cli_non_private(tmp_path):
    path = tmp_path / "np.json"
    assert dp_cli.main([*SMALL[:6], "--non-private", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["runs"][0]["final"]["epsilon"] == "inf"


def test_model_left_without_grad_state_by_clipped_sums():
    # DPSGD writes .grad itself; psgrad's calls leave nothing else behind on the model.
    model = _model()
    snapshot = copy.deepcopy(model.state_dict())
    dp = _dp(model, lr=0.0)
    x, y = _data(5)
    dp.accumulate(x, y)
    assert all(p.grad is None for p in model.parameters())
    dp.step()
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


def test_train_cli_peer_opacus_same_batches_and_epsilon(tmp_path):
    pytest.importorskip("opacus")
    path = tmp_path / "peer.json"
    assert dp_cli.main([*SMALL, "--peer", "opacus", "--json", str(path)]) == 0
    psg, opa = json.loads(path.read_text())["runs"]
    assert (psg["name"], opa["name"]) == ("psgrad", "opacus")
    assert [r["examples"] for r in psg["records"]] == [r["examples"] for r in opa["records"]]  # the same batches
    assert psg["final"]["epsilon"] == opa["final"]["epsilon"]
    assert dp_cli.main([*SMALL, "--peer", "opacus", "--clipping", "automatic"]) == 2  # flat only: refused
