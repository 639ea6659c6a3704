"""Exceptions raised by psgrad."""

from __future__ import annotations


class PsgradError(ValueError):
    """Bad input to a psgrad call: the message names the call and what to do."""


class UnsupportedModelError(RuntimeError):
    """An engine cannot compute exact per-sample gradients for this model.

    Raised instead of returning a plausible but wrong answer. ``engine="auto"`` reacts by trying the
    next engine; an explicitly chosen engine lets it propagate.
    """


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
