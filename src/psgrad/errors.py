"""Exceptions raised by psgrad."""

from __future__ import annotations


class PsgradError(ValueError):
    """Bad input to a psgrad call: the message names the call and what to do."""


class UnsupportedModelError(RuntimeError):
    """An engine cannot compute exact per-sample gradients for this model.

    Raised instead of returning a plausible but wrong answer. ``engine="auto"`` reacts by trying the
    next engine; an explicitly chosen engine lets it propagate.
    """


class ConsistencyError(PsgradError):
    """The per-sample gradients of some parameters do not add up to the batch gradient autograd computes from the
    same forward (``check=True``): ``||sum_i g_i - grad sum_i l_i|| > tau * sum_i ||g_i||``. ``parameters`` lists
    ``(parameter name, module, relative error)`` for each, ``modules`` the paths of the modules that own them;
    ``engine="auto"`` reacts by taking those modules to the generic rule, or the next engine."""

    def __init__(self, message: str, parameters: list[tuple[str, str, float]], modules: tuple[str, ...] = ()):
        super().__init__(message)
        self.parameters = parameters
        self.modules = modules


class FallbackWarning(UserWarning):
    """``engine="auto"`` did not use its first choice for a model: the message names the module and the engine
    (or the rule) it used instead, and why."""


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message carries the install command."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or raise MissingDependencyError with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError(
            f"{purpose} needs the optional dependency '{module}'; install it with: "
            f"pip install 'psgrad[{extra}]'"
        ) from exc
