"""PhiloxNoise: Philox4x32-10 against Random123's known answers, the documented function of (seed, draw, position)
written out again in Python integers, its distribution, shares of a draw across ranks, resuming, and (on a GPU) a
draw captured in a CUDA graph that draws the next numbers on every replay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from psgrad.dp import DPSGD, PhiloxNoise
from psgrad.dp.philox import philox4x32
from psgrad.errors import PsgradError

Z = 5.0  # standard deviations: a correct generator fails such a bound with probability below 1e-6
CPU = torch.device("cpu")

# Random123's kat_vectors, philox4x32 with 10 rounds: counter (4 words), key (2 words) -> output (4 words)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


def _philox_reference(counter, key):
    """Philox4x32-10 from its definition, in Python integers (the products formed whole)."""
    c, (k0, k1) = list(counter), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) % 2**32, (k1 + 0xBB67AE85) % 2**32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 % 2**32, (p0 >> 32) ^ c[3] ^ k1, p0 % 2**32]
    return c


def _normal_reference(seed, draw, position):
    """Position p of a draw: pair k = p // 2 is the counter (k mod 2**32, k div 2**32, draw mod 2**32, draw div
    2**32) under the key (seed mod 2**32, seed div 2**32); two 53-bit uniforms; Box-Muller's cos (even p) or sin."""
    k = position // 2
    x = _philox_reference([k % 2**32, k >> 32, draw % 2**32, draw >> 32], (seed % 2**32, seed >> 32))
    u1 = (((x[0] >> 5) << 26) + (x[1] >> 6) + 1) / 2**53
    u2 = (((x[2] >> 5) << 26) + (x[3] >> 6)) / 2**53
    trig = math.cos if position % 2 == 0 else math.sin
    return math.sqrt(-2 * math.log(u1)) * trig(2 * math.pi * u2)


def test_philox_noise_is_its_documented_function():
    seed = 0x0123456789ABCDEF
    noise = PhiloxNoise(seed=seed)
    size = PhiloxNoise.BLOCK + 5  # two blocks
    first = noise.standard_normal((size,), torch.float64, CPU)
    second = noise.standard_normal((3, 3), torch.float64, CPU)
    for draw, values, positions in [(0, first, (0, 1, 2, 77, PhiloxNoise.BLOCK - 1, PhiloxNoise.BLOCK + 4)),
                                    (1, second.flatten(), range(9))]:
        for p in positions:
            assert float(values[p]) == pytest.approx(_normal_reference(seed, draw, p), rel=1e-12, abs=1e-12)
    assert noise.draws == 2


def test_philox_noise_distribution():
    noise = PhiloxNoise(seed=1)
    z = torch.cat([noise.standard_normal((100_000,), torch.float64, CPU) for _ in range(3)])
    n = z.numel()
    assert abs(z.mean().item()) <= Z / math.sqrt(n)
    assert abs((z**2).mean().item() - 1) <= Z * math.sqrt(2 / n)
    s = z.sort().values  # Kolmogorov-Smirnov distance to the normal CDF: P(sqrt(n) D > 2.8) < 2 exp(-2 * 2.8^2)
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    assert math.sqrt(n) * torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item() <= 2.8
    # the two numbers of a pair, neighbouring pairs and consecutive draws are uncorrelated: N(0, 1/m) over m
    d0, d1 = z[:100_000], z[100_000:200_000]
    for a, b in [(d0[0::2], d0[1::2]), (d0[:-2], d0[2:]), (d0, d1)]:
        assert abs(float((a * b).mean())) <= Z / math.sqrt(a.numel())


def test_shares_of_a_draw_add_up_to_the_draw():
    whole = PhiloxNoise(seed=9)
    whole.BLOCK = 7  # odd: a block may start inside a pair
    expected = [whole.standard_normal((5, 11), torch.float32, CPU) for _ in range(2)]
    for size in (2, 3):
        parts = []
        for rank in range(size):
            noise = PhiloxNoise(seed=9)
            noise.BLOCK = 7
            parts.append([noise.standard_normal((5, 11), torch.float32, CPU, part=(rank, size)) for _ in range(2)])
        for step in range(2):
            shares = torch.stack([p[step] for p in parts])
            assert torch.equal(shares.sum(0), expected[step])
            assert torch.equal((shares != 0).sum(0), torch.ones(5, 11, dtype=torch.long))  # each number once


def test_the_counter_is_a_tensor_advanced_in_place_and_resumes():
    noise = PhiloxNoise(seed=3)
    counter = noise.counter
    noise.standard_normal((10,), torch.float32, CPU)
    assert noise.counter is counter and counter.dtype == torch.int64 and int(counter) == 1
    state = noise.state_dict()
    expected = noise.standard_normal((10,), torch.float32, CPU)
    again = PhiloxNoise(seed=99)
    again.load_state_dict(state)
    assert torch.equal(again.standard_normal((10,), torch.float32, CPU), expected)
    with pytest.raises(PsgradError, match="not 'philox'"):
        again.load_state_dict({"kind": "counter", "seed": 1, "draws": 0, "blocks": 0})


def test_dp_steps_take_philox_noise():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = DPSGD(model, nn.CrossEntropyLoss(reduction="none"), opt, noise_multiplier=2.0, max_norm=1.0,
               sample_rate=0.5, dataset_size=4, noise=PhiloxNoise(seed=5))
    dp.step()  # an empty batch: noise only
    z = PhiloxNoise(seed=5).standard_normal((15,), torch.float32, CPU)
    moved = torch.cat([(a - p.detach()).flatten() for a, p in zip(start, model.parameters())])
    torch.testing.assert_close(moved, z * 2.0 * 1.0 / 2.0, rtol=0, atol=1e-6)  # sigma C z / (q N), lr 1


@pytest.mark.cuda
def test_a_captured_draw_draws_the_next_numbers_on_every_replay():
    device = torch.device("cuda")
    eager = PhiloxNoise(seed=11, device=device)
    want = [eager.standard_normal((1000,), torch.float32, device) for _ in range(4)]
    on_cpu = PhiloxNoise(seed=11).standard_normal((1000,), torch.float32, CPU)
    torch.testing.assert_close(want[0].cpu(), on_cpu, rtol=1e-6, atol=1e-6)  # float64 libm may differ in a bit
    noise = PhiloxNoise(seed=11, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        noise.standard_normal((1000,), torch.float32, device)  # draw 0, eagerly (warm-up)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = noise.standard_normal((1000,), torch.float32, device)  # recorded, not run
    for step in (1, 2, 3):
        graph.replay()
        torch.testing.assert_close(out, want[step], rtol=0, atol=0)
