"""Leave the user's model exactly as it was found, also when a call raises.

Every public call runs its engine inside :class:`ModelGuard`. Engines are written not to leave state on
modules or parameters, and this guard is the belt to those braces: it restores train/eval modes, hook
dictionaries, attributes added to modules or parameters, ``.grad``, ``requires_grad`` and buffer values, and a
module's own attributes: rebound ones are bound back, and dicts, lists and sets get their entries back (a cache a
module fills in its forward, such as timm's ``attention_bias_cache`` in eval mode, filled by psgrad's probe without
autograd, would otherwise give the user's next forward a bias without gradient).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


#: nn.Module's own attributes, restored by the rest of the guard or not state of the model
_INTERNAL = frozenset(nn.Module().__dict__) | {"training"}
_CONTAINERS = (dict, list, set)


def _own_attributes(m: nn.Module) -> dict[str, tuple[Any, Any]]:
    """``{name: (value, shallow copy of its entries or None)}`` of the module's attributes that are its own."""
    out = {}
    for name, value in m.__dict__.items():
        if name not in _INTERNAL:
            out[name] = (value, type(value)(value) if type(value) in _CONTAINERS else None)
    return out


def _restore_attributes(m: nn.Module, saved: dict[str, tuple[Any, Any]]) -> None:
    for name, (value, entries) in saved.items():
        if m.__dict__.get(name, _MISSING) is not value:
            m.__dict__[name] = value
        if entries is not None and not _same_items(value, entries):
            value.clear()
            value.update(entries) if isinstance(value, (dict, set)) else value.extend(entries)


def _same_items(now: Any, saved: Any) -> bool:
    if isinstance(now, dict):
        return _same_entries(now, saved)
    if isinstance(now, list):
        return len(now) == len(saved) and all(a is b for a, b in zip(now, saved))
    return now == saved  # a set: its members hash, so compare as sets


_MISSING = object()


class ModelGuard:
    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> ModelGuard:
        modules = list(self.model.modules())
        self._modules: list[tuple[nn.Module, bool, set[str], dict[str, dict], dict, dict, dict]] = []
        for m in modules:
            hooks = {name: dict(getattr(m, name)) for name in _HOOK_DICTS if hasattr(m, name)}
            self._modules.append((m, m.training, set(m.__dict__), hooks, dict(m._parameters), dict(m._buffers),
                                  _own_attributes(m)))
        self._params: list[tuple[nn.Parameter, Any, bool, set[str], int]] = []
        for p in {id(p): p for m in modules for p in m._parameters.values() if p is not None}.values():
            self._params.append((p, p.grad, p.requires_grad, set(p.__dict__), p._version))
        self._buffers: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        for b in {id(b): b for m in modules for b in m._buffers.values() if b is not None}.values():
            self._buffers.append((b, b._version, b.detach().clone()))
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, training, attrs, hooks, params, buffers, own in self._modules:
            m.training = training
            for name in set(m.__dict__) - attrs:
                delattr(m, name)
            _restore_attributes(m, own)
            for name, saved in hooks.items():
                current = getattr(m, name)
                current.clear()
                current.update(saved)
            if not _same_entries(m._parameters, params):
                m._parameters.clear()
                m._parameters.update(params)
            if not _same_entries(m._buffers, buffers):
                m._buffers.clear()
                m._buffers.update(buffers)
        with torch.no_grad():
            for p, grad, requires_grad, attrs, version in self._params:
                for name in set(p.__dict__) - attrs:
                    delattr(p, name)
                p.grad = grad
                p.requires_grad_(requires_grad)
                if p._version != version:  # pragma: no cover - no engine writes parameters
                    raise RuntimeError("psgrad: an engine modified a parameter in place; please report this")
            for b, version, saved in self._buffers:
                if b._version != version:
                    b.copy_(saved)


def _same_entries(now: dict, saved: dict) -> bool:
    """Whether a module's parameter (or buffer) dict holds the same objects under the same names, in order: by
    identity (``==`` on two dicts would compare tensors by value, elementwise)."""
    return list(now) == list(saved) and all(now[k] is saved[k] for k in saved)
