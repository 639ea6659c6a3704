"""psgrad: exact, verified and fast per-sample gradients for PyTorch."""

__version__ = "0.1.0"

from .api import (
    clipped_grad_sum,
    empty_cache,
    engine_status,
    engines,
    explain,
    parameter_groups,
    per_sample_dots,
    per_sample_grads,
    per_sample_gram,
    per_sample_norms,
    project,
)
from .errors import (
    ConsistencyError,
    FallbackWarning,
    MissingDependencyError,
    PsgradError,
    UnsupportedModelError,
)
from .projection import Projector
from .verify import verify

__all__ = [
    "ConsistencyError",
    "FallbackWarning",
    "MissingDependencyError",
    "Projector",
    "PsgradError",
    "UnsupportedModelError",
    "__version__",
    "clipped_grad_sum",
    "empty_cache",
    "engine_status",
    "engines",
    "explain",
    "parameter_groups",
    "per_sample_grads",
    "per_sample_dots",
    "per_sample_gram",
    "per_sample_norms",
    "project",
    "verify",
]
