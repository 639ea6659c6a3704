"""Rules for the recurrent layer family (registered into DEFAULT on import).

nn.RNN (tanh and relu), nn.LSTM (with or without ``proj_size``) and nn.GRU are handled by one
hand-written rule. The generic rule cannot take them: on CPU (PyTorch 2.14), vmap of nn.RNN, nn.GRU and
of an nn.LSTM with proj_size fails inside their decomposition ("output with shape [1, H] doesn't match
the broadcast shape"), and plain nn.LSTM goes through vmap's slow per-example fallback.

The rule recomputes the layer for the whole batch from the captured input and initial state, in plain
tensor operations with autograd, keeping each pre-activation; one batched backward with the captured
output gradients gives the gradient of every pre-activation of every example (the examples of a batch
never mix in a recurrent layer), and every parameter gradient is then a ``b_i^T a_i`` product as for
nn.Linear. Cost: one forward and one backward of the layer step by step (about what the layer costs in
the model's own pass, without fused kernels), plus the batched products.

Refused with UnsupportedModelError (never approximated): PackedSequence inputs, dropout between layers
in training mode, and inputs or states that do not carry the batch where the layer's layout says.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_unflatten

from ..errors import UnsupportedModelError
from ..capture import Call
from .base import Rule, linear_form_clipped, linear_form_norms, put, sq_norms
from .registry import DEFAULT

_FORWARDS = {nn.RNN: nn.RNN.forward, nn.LSTM: nn.LSTM.forward, nn.GRU: nn.GRU.forward}

#: per parameter, the linear form ``(a [B, T, d], b [B, T, p])`` of its weight gradient ``b_i^T a_i``,
#: or, for a bias, the per-sample gradient ``[B, p]``
_Pieces = tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]


def _stock_forward(module: nn.Module) -> Any:
    for cls, fwd in _FORWARDS.items():
        if isinstance(module, cls):
            return fwd
    return None


def _bound(call: Call) -> tuple[Any, Any, Any, Any]:
    """``(input, hx, input's batch dim, hx's batch dims)`` of the call."""
    forward = _stock_forward(call.module)
    sig = inspect.signature(forward)
    args, kwargs = tree_unflatten(call.checked_leaves(), call.spec)
    values = sig.bind(call.module, *args, **kwargs)
    values.apply_defaults()
    x, hx = values.arguments["input"], values.arguments["hx"]
    if isinstance(x, PackedSequence):  # its batch dims cannot be rebuilt into a PackedSequence; not needed
        return x, hx, None, None
    dims_args, dims_kwargs = tree_unflatten(call.in_bdims, call.spec)
    dims = sig.bind(call.module, *dims_args, **dims_kwargs)
    return x, hx, dims.arguments.get("input"), dims.arguments.get("hx")


def _refusal(module: nn.RNNBase, call: Call) -> str | None:
    """Why this call cannot be handled exactly, or None."""
    x, hx, xdim, hdims = _bound(call)
    label = type(module).__name__
    if isinstance(x, PackedSequence):
        return (
            f"{label} was called with a PackedSequence, whose packed rows mix time steps of all examples; "
            "the hooks engine does not separate them. Pass padded tensors, or use engine='loop'"
        )
    if module.dropout > 0 and module.training and module.num_layers > 1:
        return (
            f"{label} applies dropout between layers in training mode; its random masks cannot be recomputed. "
            "Call model.eval() or set dropout=0"
        )
    lay = 0 if module.batch_first else 1
    if not isinstance(x, Tensor) or x.dim() != 3 or xdim != lay:
        return f"{label}: the input is not a batched 3-D tensor with the batch at dimension {lay}"
    states = hx if isinstance(hx, tuple) else (hx,)
    sdims = hdims if isinstance(hdims, tuple) else (hdims,)
    for s, d in zip(states, sdims):
        if s is not None and (s.dim() != 3 or d != 1):
            return f"{label}: an initial state does not carry the batch at dimension 1"
    n_out = 3 if isinstance(module, nn.LSTM) else 2
    expected = [lay] + [1] * (n_out - 1)
    if len(call.out_bdims) != n_out or any(
        g is not None and d != e for g, d, e in zip(call.grads, call.out_bdims, expected)
    ):
        return f"{label}: an output does not carry the batch where the layer's layout puts it"
    return None


def _pieces(module: nn.RNNBase, call: Call) -> _Pieces:
    """Recompute the layer for the whole batch and take the gradient of every pre-activation.

    Per layer l and direction (names with suffix ``l{l}`` or ``l{l}_reverse``), with the layer input
    ``x_t [B, F_l]`` and the previous state ``h_{t-1} [B, H_out]`` (the reverse direction runs t backwards):
    ``u_t = x_t W_ih^T + b_ih`` and ``w_t = h_{t-1} W_hh^T + b_hh`` (``[B, G]``, G = H, 4H, 3H), then

    - RNN: ``h_t = act(u_t + w_t)``;
    - LSTM: ``i, f, g, o = chunks of u_t + w_t``; ``c_t = s(f) c_{t-1} + s(i) tanh(g)``;
      ``m_t = s(o) tanh(c_t)``; ``h_t = m_t W_hr^T`` with proj_size, else ``h_t = m_t``;
    - GRU: ``r = s(u^r + w^r)``, ``z = s(u^z + w^z)``, ``n = tanh(u^n + r * w^n)``,
      ``h_t = (1 - z) n + z h_{t-1}``.

    With ``U = dL/du``, ``W = dL/dw`` and ``dL/dh_t`` (all ``[B, T, .]``, one backward of the recompute
    with the captured gradients of output, h_n and c_n), per example:
    ``dW_ih = U^T x``, ``db_ih = sum_t U``, ``dW_hh = W^T h_prev``, ``db_hh = sum_t W``,
    ``dW_hr = (dL/dh)^T m``.
    """
    x, hx, _, _ = _bound(call)
    lay = 0 if module.batch_first else 1
    bsz, dirs = call.batch_size, 2 if module.bidirectional else 1
    mode = module.mode
    proj = getattr(module, "proj_size", 0)
    h_out = proj if proj > 0 else module.hidden_size
    if isinstance(hx, tuple):
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    layer_in = x.movedim(lay, 0).detach().requires_grad_(True)  # [B, T, F]; a graph root, never differentiated
    steps = layer_in.shape[1]
    forms_in: dict[str, tuple[Tensor, list[Tensor]]] = {}  # name -> (a, the tensors b is the gradient of)
    h_last: list[Tensor] = []
    c_last: list[Tensor] = []
    with torch.enable_grad():
        for layer in range(module.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                w_ih = getattr(module, f"weight_ih_{sfx}").detach()
                w_hh = getattr(module, f"weight_hh_{sfx}").detach()
                b_ih = getattr(module, f"bias_ih_{sfx}").detach() if module.bias else None
                b_hh = getattr(module, f"bias_hh_{sfx}").detach() if module.bias else None
                w_hr = getattr(module, f"weight_hr_{sfx}").detach() if proj > 0 else None
                k = layer * dirs + d
                h = h0[k].detach() if h0 is not None else layer_in.new_zeros(bsz, h_out)
                h = h.requires_grad_(True)  # a graph root, so that every w_t below can be differentiated
                c = None
                if mode == "LSTM":
                    c = c0[k].detach() if c0 is not None else layer_in.new_zeros(bsz, module.hidden_size)
                u = F.linear(layer_in, w_ih, b_ih)  # [B, T, G]
                h_prev, w_pre, m_all, h_all = [], [], [], []
                out: list[Tensor | None] = [None] * steps
                for t in range(steps) if d == 0 else reversed(range(steps)):
                    w = F.linear(h, w_hh, b_hh)
                    h_prev.append(h)
                    w_pre.append(w)
                    ut = u[:, t]
                    if mode == "RNN_TANH":
                        h = torch.tanh(ut + w)
                    elif mode == "RNN_RELU":
                        h = torch.relu(ut + w)
                    elif mode == "LSTM":
                        i, f, g, o = (ut + w).chunk(4, 1)
                        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                        m = torch.sigmoid(o) * torch.tanh(c)
                        if w_hr is not None:
                            h = F.linear(m, w_hr)
                            m_all.append(m)
                            h_all.append(h)
                        else:
                            h = m
                    elif mode == "GRU":
                        ur, uz, un = ut.chunk(3, 1)
                        wr, wz, wn = w.chunk(3, 1)
                        r = torch.sigmoid(ur + wr)
                        z = torch.sigmoid(uz + wz)
                        n = torch.tanh(un + r * wn)
                        h = (1 - z) * n + z * h
                    else:
                        raise UnsupportedModelError(f"{type(module).__name__}: unknown recurrent mode {mode!r}")
                    out[t] = h
                outs.append(torch.stack(out, 1))  # type: ignore[arg-type]
                h_last.append(h)
                if c is not None:
                    c_last.append(c)
                forms_in[f"weight_ih_{sfx}"] = (layer_in, [u])
                forms_in[f"weight_hh_{sfx}"] = (torch.stack(h_prev, 1), w_pre)
                if w_hr is not None:
                    forms_in[f"weight_hr_{sfx}"] = (torch.stack(m_all, 1), h_all)
            layer_in = torch.cat(outs, 2) if dirs > 1 else outs[0]
        results = [layer_in, torch.stack(h_last, 1)] + ([torch.stack(c_last, 1)] if c_last else [])
        live = [j for j, g in enumerate(call.grads) if g is not None]
        wanted = [t for _, parts in forms_in.values() for t in parts]
        found = torch.autograd.grad(
            [results[j] for j in live], wanted, [call.grad(j) for j in live], allow_unused=True
        )
    grads = iter(torch.zeros_like(t) if g is None else g for t, g in zip(wanted, found))
    forms: dict[str, tuple[Tensor, Tensor]] = {}
    sums: dict[str, Tensor] = {}
    for name, (a, parts) in forms_in.items():
        mine = [next(grads) for _ in parts]
        b = mine[0] if name.startswith("weight_ih") else torch.stack(mine, 1)  # u is [B, T, G] already
        forms[name] = (a.detach(), b)
        if module.bias and not name.startswith("weight_hr"):
            sums[name.replace("weight", "bias", 1)] = b.sum(1)
    return forms, sums


def _concat(pieces: Sequence[_Pieces]) -> _Pieces:
    """Several calls as one: forms concatenated along T, bias gradients added."""
    forms = {n: (torch.cat([p[0][n][0] for p in pieces], 1), torch.cat([p[0][n][1] for p in pieces], 1)) for n in pieces[0][0]}
    sums = {n: sum(p[1][n] for p in pieces) for n in pieces[0][1]}
    return forms, sums  # type: ignore[return-value]


@DEFAULT.register(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentRule(Rule):
    """nn.RNN, nn.LSTM and nn.GRU: batch_first either way, any num_layers, bidirectional, bias on or off,
    LSTM proj_size, with or without an initial state, gradients from output, h_n and c_n alike."""

    def check(self, module: nn.Module, call: Call) -> str | None:
        if type(module).forward is not _stock_forward(module):
            return "forward is overridden"
        return None

    def _pieces(self, module: nn.RNNBase, calls: Sequence[Call]) -> _Pieces:
        for call in calls:
            reason = _refusal(module, call)
            if reason is not None:
                raise UnsupportedModelError(reason)
        return _concat([_pieces(module, c) for c in calls])

    def grad_sample(self, module: nn.RNNBase, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        forms, sums = self._pieces(module, [call])
        for name, (a, b) in forms.items():
            if name in dest:
                if accumulate:
                    dest[name].baddbmm_(b.transpose(1, 2), a)
                else:
                    torch.bmm(b.transpose(1, 2), a, out=dest[name])
        for name, s in sums.items():
            if name in dest:
                put(dest[name], s, accumulate)

    def norm_sample(self, module: nn.RNNBase, calls: Sequence[Call], names: Sequence[str]) -> tuple[dict[str, Tensor], Any]:
        """Weights: :func:`~psgrad.rules.base.linear_form_norms` (ghost norm or materialized); biases: exact."""
        forms, sums = self._pieces(module, calls)
        norms: dict[str, Tensor] = {}
        caches: dict[str, Any] = {}
        for name, (a, b) in forms.items():
            if name in names:
                norms[name], caches[name] = linear_form_norms(a, b)
        for name, s in sums.items():
            if name in names:
                norms[name] = sq_norms(s)
        return norms, (sums, caches)

    def clipped_sum(
        self, module: nn.RNNBase, calls: Sequence[Call], names: Sequence[str], c: Tensor, cache: Any
    ) -> dict[str, Tensor]:
        sums, caches = cache
        out: dict[str, Tensor] = {}
        for name, kept in caches.items():
            if name in names:
                out[name] = linear_form_clipped(c, kept)
        for name, s in sums.items():
            if name in names:
                out[name] = c.to(s.dtype) @ s
        return out
