"""The check that every use of a differentiated parameter lies inside a call of the unit that owns it.

NOTE [parameters used outside their module]
A parameter's gradient is only complete if every use of it lies inside a call of a unit that
differentiates it. After the forward, the autograd graph is walked once: every node that consumes a
wanted parameter must have been created during such a call (autograd sequence numbers are increasing, so
each call is a window of them). A use elsewhere (a tied weight passed to ``F.linear`` by the parent) is
refused with UnsupportedModelError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor

from .unit import NeedsParent, Unit


def check_parameter_uses(loss: Tensor, units: Sequence[Unit], windows: Sequence[Sequence[tuple[int, int]]]) -> None:
    """Refuse if a parameter of ``units[u]`` is consumed by an autograd node made outside every window
    ``windows[u]`` (the sequence numbers of its calls' nodes)."""
    inside: dict[int, list[tuple[int, int]]] = {}
    names: dict[int, str] = {}
    owners: dict[int, list[Unit]] = {}
    for unit, unit_windows in zip(units, windows):
        for name, p in unit.params.items():
            inside.setdefault(id(p), []).extend(unit_windows)
            names[id(p)] = name
            owners.setdefault(id(p), []).append(unit)
    for node, param in _parameter_consumers(loss.grad_fn):
        key = id(param)
        if key not in inside:
            continue
        seq = node._sequence_nr()
        if not any(lo <= seq <= hi for lo, hi in inside[key]):
            raise NeedsParent(
                f"parameter '{names[key]}' is used outside the forward of the module that owns it "
                f"(by {type(node).__name__}); its per-sample gradient would miss that use", owners[key]
            )


def graph_edges(roots: list[Any], follow: Callable[[Any], bool] = lambda node: True) -> Iterator[tuple[Any, Any, int]]:
    """``(node, next node, input number)`` for every edge of the autograd graph reached from ``roots``, each node
    visited once, walking on only into the next nodes ``follow`` admits (AccumulateGrad nodes are yielded, never
    walked into)."""
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            yield node, nxt, nr
            if not hasattr(nxt, "variable") and id(nxt) not in seen and follow(nxt):
                stack.append(nxt)


def _parameter_consumers(root: Any) -> Iterator[tuple[Any, Tensor]]:
    """(node, leaf tensor) for every autograd node with an edge into a leaf's AccumulateGrad."""
    for node, nxt, _ in graph_edges([root]):
        variable = getattr(nxt, "variable", None)
        if variable is not None:
            yield node, variable
