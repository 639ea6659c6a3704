"""DP-SGD on psgrad's public API: Poisson sampling, clipped sums, Gaussian noise, accounting, checkpoints."""

from .accounting import Accountant, dp_event, epsilon_for, noise_multiplier_for
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import World
from .noise import CounterNoise, NoiseSource, SecureNoise, SeededNoise, secure_normal
from .optimizer import DPSGD, StepRecord
from .philox import PhiloxNoise
from .sampling import EmptySafeCollate, PoissonSampler, poisson_loader

__all__ = [
    "DPSGD",
    "Accountant",
    "CounterNoise",
    "EmptySafeCollate",
    "NoiseSource",
    "PhiloxNoise",
    "PoissonSampler",
    "SecureNoise",
    "SeededNoise",
    "StepRecord",
    "World",
    "dp_event",
    "epsilon_for",
    "load_checkpoint",
    "noise_multiplier_for",
    "poisson_loader",
    "save_checkpoint",
    "secure_normal",
]
