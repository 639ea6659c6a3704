"""Engines by name. Every engine has the signature of :class:`~psgrad.engines.base.Engine`."""

from __future__ import annotations

from ..errors import PsgradError
from .base import Engine
from .expanded import ExpandedEngine
from .hooks import HooksEngine
from .loop import LoopEngine
from .opacus import OpacusEngine
from .vmap import VmapEngine

ENGINES: dict[str, Engine] = {e.name: e for e in (HooksEngine(), LoopEngine(), VmapEngine(), ExpandedEngine(), OpacusEngine())}

#: what ``engine="auto"`` tries, in order; the next one is tried when an engine cannot handle the model
AUTO_ORDER = ("hooks", "vmap", "loop")


def get(name: str, where: str) -> Engine:
    if name not in ENGINES:
        valid = ", ".join(["auto", *ENGINES])
        raise PsgradError(f"{where}: unknown engine {name!r}; valid engines: {valid}")
    return ENGINES[name]


def available() -> list[str]:
    """Names of the engines usable in this environment."""
    return [name for name, e in ENGINES.items() if e.available() is None]


__all__ = ["AUTO_ORDER", "ENGINES", "Engine", "available", "get"]
