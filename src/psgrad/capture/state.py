"""Objects passed to a call, kept as they were when the call began.

NOTE [state passed to a call]
A module may be called with an object that it changes: transformers' attention layers take a key-value cache
and append their keys and values to it. The generic rule re-runs a call per example during the backward, when
such an object has long moved on (later layers and later calls appended to it), so the re-run would compute
something else and change the object again. Where such an object holds no tensor when the call begins (a cache
the forward created empty, a counter, a config), a deep copy taken then is the state the call saw: each re-run
gets a fresh copy of it, and the user's object is never touched again. An object that holds tensors (a cache
with entries, a reference to a module) is not copied: its tensors carry the whole batch, which a re-run for one
example must not see, so the generic rule refuses the call, naming the argument. Plain values (numbers,
strings, dtypes) are immutable and passed as they are.
"""

from __future__ import annotations

import copy
import types
from typing import Any

from torch import Tensor, nn

from ..rules.call import PLAIN

_OPAQUE = (nn.Module, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.GeneratorType,
           types.ModuleType)
_BUDGET = 10_000  # objects visited at most per argument; beyond, it is not copied


def snapshots(leaves: list[Any]) -> dict[int, Any]:
    """``{leaf index: deep copy}`` for the leaves that are objects holding no tensor (NOTE [state passed to a
    call]); plain values and tensors are left out, and so is every object that cannot be copied safely."""
    out = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, (Tensor, *PLAIN)) or not _tensor_free(leaf):
            continue
        try:
            out[i] = copy.deepcopy(leaf)
        except Exception:  # not copyable: the generic rule refuses the call, as for any other state
            continue
    return out


def _tensor_free(obj: Any) -> bool:
    """Whether nothing reachable from ``obj`` through containers, attributes and slots is a tensor, a module, a
    function (which may close over either) or anything else that cannot be told apart from state."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, PLAIN):
            continue
        seen.add(id(o))
        if len(seen) > _BUDGET or isinstance(o, (Tensor, *_OPAQUE)):
            return False
        if isinstance(o, type):
            continue  # a class: its behaviour is code, not state of the call
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        else:
            attrs = getattr(o, "__dict__", None)
            slots = [s for cls in type(o).__mro__ for s in _slots(cls)]
            if attrs is None and not slots:
                return False  # an object whose state cannot be seen
            if attrs is not None:
                stack.extend(attrs.values())
            stack.extend(getattr(o, s) for s in slots if hasattr(o, s))
    return True


def _slots(cls: type) -> tuple[str, ...]:
    slots = getattr(cls, "__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)
