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
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import UnsupportedModelError
from .call import Call
from .forms import Block, Forms, LinearFormRule
from .recurrent_written import FUSED_LAYERS, initial_states, written_forms
from .registry import DEFAULT

_SIGNATURES = {cls: inspect.signature(cls.forward) for cls in (nn.RNN, nn.LSTM, nn.GRU)}


def _bound(call: Call) -> tuple[Any, Any, Any, Any]:
    """``(input, hx, input's batch dim, hx's batch dims)`` of the call."""
    signature = next(s for cls, s in _SIGNATURES.items() if isinstance(call.module, cls))
    values = call.bound(signature)
    x, hx = values["input"], values["hx"]
    if isinstance(x, PackedSequence):  # its batch dims cannot be rebuilt into a PackedSequence; not needed
        return x, hx, None, None
    dims = call.bound_bdims(signature)
    return x, hx, dims.get("input"), dims.get("hx")


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
    if call.num_outputs != n_out or any(call.has_grad(j) and call.out_bdim(j) != e for j, e in enumerate(expected)):
        return f"{label}: an output does not carry the batch where the layer's layout puts it"
    return None


# One time step per mode: (u_t, w_t, h_{t-1}, c_{t-1}, W_hr) -> (h_t, c_t, m_t), with u_t = x_t W_ih^T + b_ih and
# w_t = h_{t-1} W_hh^T + b_hh ([B, G]); c is the LSTM cell state, m the LSTM output before its projection (proj_size).
Step = Callable[[Tensor, Tensor, Tensor, Any, Any], tuple[Tensor, Any, Any]]


def _tanh_step(u: Tensor, w: Tensor, h: Tensor, c: Any, w_hr: Any) -> tuple[Tensor, Any, Any]:
    return torch.tanh(u + w), None, None


def _relu_step(u: Tensor, w: Tensor, h: Tensor, c: Any, w_hr: Any) -> tuple[Tensor, Any, Any]:
    return torch.relu(u + w), None, None


def _lstm_step(u: Tensor, w: Tensor, h: Tensor, c: Tensor, w_hr: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    i, f, g, o = (u + w).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    m = torch.sigmoid(o) * torch.tanh(c)
    return (m if w_hr is None else F.linear(m, w_hr)), c, m


def _gru_step(u: Tensor, w: Tensor, h: Tensor, c: Any, w_hr: Any) -> tuple[Tensor, Any, Any]:
    ur, uz, un = u.chunk(3, 1)
    wr, wz, wn = w.chunk(3, 1)
    r = torch.sigmoid(ur + wr)
    z = torch.sigmoid(uz + wz)
    n = torch.tanh(un + r * wn)
    return (1 - z) * n + z * h, None, None


_STEPS: dict[str, Step] = {"RNN_TANH": _tanh_step, "RNN_RELU": _relu_step, "LSTM": _lstm_step, "GRU": _gru_step}


@dataclass
class _Direction:
    """One layer and direction of the recompute: its outputs ``[B, T, H_out]``, last states, and per parameter the
    input form ``a`` with the graph tensors whose gradients make the output-gradient form ``b``."""

    out: Tensor
    h_last: Tensor
    c_last: Tensor | None
    forms_in: dict[str, tuple[Tensor, list[Tensor]]]


def _direction(module: nn.RNNBase, layer_in: Tensor, k: int, sfx: str, reverse: bool, h0: Any, c0: Any) -> _Direction:
    """Run one layer and direction over ``layer_in [B, T, F]`` with autograd, keeping each pre-activation."""
    step = _STEPS.get(module.mode)
    if step is None:
        raise UnsupportedModelError(f"{type(module).__name__}: unknown recurrent mode {module.mode!r}")
    bsz, steps = layer_in.shape[0], layer_in.shape[1]
    proj = getattr(module, "proj_size", 0)
    w_ih = getattr(module, f"weight_ih_{sfx}").detach()
    w_hh = getattr(module, f"weight_hh_{sfx}").detach()
    b_ih = getattr(module, f"bias_ih_{sfx}").detach() if module.bias else None
    b_hh = getattr(module, f"bias_hh_{sfx}").detach() if module.bias else None
    w_hr = getattr(module, f"weight_hr_{sfx}").detach() if proj > 0 else None
    h = h0[k].detach() if h0 is not None else layer_in.new_zeros(bsz, proj if proj > 0 else module.hidden_size)
    h = h.requires_grad_(True)  # a graph root, so that every w_t below can be differentiated
    c = None
    if module.mode == "LSTM":
        c = c0[k].detach() if c0 is not None else layer_in.new_zeros(bsz, module.hidden_size)
    u = F.linear(layer_in, w_ih, b_ih)  # [B, T, G]
    h_prev, w_pre, m_all, h_all = [], [], [], []
    out: list[Tensor | None] = [None] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        w = F.linear(h, w_hh, b_hh)
        h_prev.append(h)
        w_pre.append(w)
        h, c, m = step(u[:, t], w, h, c, w_hr)
        if w_hr is not None:
            m_all.append(m)
            h_all.append(h)
        out[t] = h
    forms_in = {f"weight_ih_{sfx}": (layer_in, [u]), f"weight_hh_{sfx}": (torch.stack(h_prev, 1), w_pre)}
    if w_hr is not None:
        forms_in[f"weight_hr_{sfx}"] = (torch.stack(m_all, 1), h_all)
    return _Direction(torch.stack(out, 1), h, c, forms_in)  # type: ignore[arg-type]


def _forms(module: nn.RNNBase, call: Call) -> Forms:
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
    reason = _refusal(module, call)
    if reason is not None:
        raise UnsupportedModelError(reason)
    fused = _fused_forms(module, call)
    if fused is not None:
        return fused
    x, hx, _, _ = _bound(call)
    lay = 0 if module.batch_first else 1
    dirs = 2 if module.bidirectional else 1
    h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
    layer_in = x.movedim(lay, 0).detach().requires_grad_(True)  # [B, T, F]; a graph root, never differentiated
    forms_in: dict[str, tuple[Tensor, list[Tensor]]] = {}
    h_last: list[Tensor] = []
    c_last: list[Tensor] = []
    with torch.enable_grad():
        for layer in range(module.num_layers):
            runs = [_direction(module, layer_in, layer * dirs + d, f"l{layer}" + ("_reverse" if d else ""), d == 1, h0, c0)
                    for d in range(dirs)]
            for run in runs:
                h_last.append(run.h_last)
                if run.c_last is not None:
                    c_last.append(run.c_last)
                forms_in.update(run.forms_in)
            layer_in = torch.cat([r.out for r in runs], 2) if dirs > 1 else runs[0].out
        results = [layer_in, torch.stack(h_last, 1)] + ([torch.stack(c_last, 1)] if c_last else [])
        live = [j for j in range(call.num_outputs) if call.has_grad(j)]
        wanted = [t for _, parts in forms_in.values() for t in parts]
        found = torch.autograd.grad(
            [results[j] for j in live], wanted, [call.grad(j) for j in live], allow_unused=True
        )
    grads = iter(torch.zeros_like(t) if g is None else g for t, g in zip(wanted, found))
    forms = Forms()
    for name, (a, parts) in forms_in.items():
        mine = [next(grads) for _ in parts]
        b = mine[0] if name.startswith("weight_ih") else torch.stack(mine, 1)  # u is [B, T, G] already
        forms.weights[name] = [Block(0, a.detach(), b)]
        if module.bias and not name.startswith("weight_hr"):
            forms.sums[name.replace("weight", "bias", 1)] = [(0, b.sum(1))]
    return forms


#: the fused layer's identity input projection costs D G^2 per row against the recurrence's G H: used up to this G
FUSED_MAX_GATES = 1024


def _written_out(module: nn.RNNBase, x: Tensor) -> bool:
    """Whether the layer's gate gradients come from its backward written out (NOTE [recurrent backward written out]
    in :mod:`psgrad.rules.recurrent_written`): on the CPU, for LSTM and GRU layers, and for RNN layers too wide for
    the fused route (whose identity is only ``[H, H]`` for an RNN, cheaper there than a Python step; benchmarks/README.md)."""
    return x.device.type == "cpu" and (module.mode in ("LSTM", "GRU") or module.hidden_size > FUSED_MAX_GATES)


def _fused_forms(module: nn.RNNBase, call: Call) -> Forms | None:
    """NOTE [the recurrence by PyTorch's own kernel]: LSTM, GRU and RNN layers without proj_size. In LSTM and RNN the
    gradient of each gate pre-activation is also that of the hidden side's (``dL/du_t = dL/dw_t``, as ``u_t +
    w_t`` is all they enter); in a GRU so for r and z, while ``dL/dw^n = r * dL/du^n`` (``n = tanh(u^n + r *
    w^n)``), with r recomputed from ``h_prev`` in one product for all steps. Per layer, ``u = x W_ih^T + b_ih``
    is computed here for every direction, and PyTorch's fused layer runs on ``u`` itself (input weights the
    identity on each direction's block, input bias 0, the module's own hidden weights and bias): the same
    recurrence, exactly (a product with 1 and sums with 0 are exact), with one fused backward for ``U = dL/du``
    in place of one Python step per time step. Then ``dW_ih = U^T x``, ``dW_hh = U^T h_prev`` with ``h_prev`` the
    layer's outputs shifted by one step (the initial state first), ``db = sum_t U``. None where this does not
    apply (proj_size, many gates). On the CPU the layer takes its backward written out instead (NOTE [recurrent backward
    written out] in :mod:`psgrad.rules.recurrent_written`)."""
    op = FUSED_LAYERS.get(module.mode)
    hidden = module.hidden_size
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1) * hidden
    dirs = 2 if module.bidirectional else 1
    if op is None or getattr(module, "proj_size", 0) > 0:
        return None
    x, hx, _, _ = _bound(call)
    layer_in = x.movedim(0 if module.batch_first else 1, 0).detach()  # [B, T, F]
    if _written_out(module, layer_in):
        return written_forms(module, call, layer_in, hx)
    if gates > FUSED_MAX_GATES:
        return None
    h0, c0 = initial_states(module, layer_in, hx)
    eye = torch.eye(gates, dtype=layer_in.dtype, device=layer_in.device)
    w_in = [torch.cat([eye if e == d else torch.zeros_like(eye) for e in range(dirs)], 1) for d in range(dirs)]
    inputs, us, prevs, h_last, c_last = {}, {}, {}, [], []
    with torch.enable_grad():
        for layer in range(module.num_layers):
            names = [f"l{layer}", f"l{layer}_reverse"][:dirs]
            u = [F.linear(layer_in, getattr(module, f"weight_ih_{n}").detach(),
                          getattr(module, f"bias_ih_{n}").detach() if module.bias else None) for n in names]
            if layer == 0:
                u = [t.detach().requires_grad_(True) for t in u]
            params = []
            for d, n in enumerate(names):
                params += [w_in[d], getattr(module, f"weight_hh_{n}").detach()]
                if module.bias:
                    params += [eye.new_zeros(gates), getattr(module, f"bias_hh_{n}").detach()]
            states = slice(layer * dirs, (layer + 1) * dirs)
            hx_l = (h0[states], c0[states]) if module.mode == "LSTM" else h0[states]
            res = op(torch.cat(u, 2) if dirs > 1 else u[0], hx_l, params, module.bias, 1, 0.0, True, dirs > 1, True)
            out = res[0]
            for d, n in enumerate(names):
                o, first = out[..., d * hidden : (d + 1) * hidden].detach(), h0[layer * dirs + d].unsqueeze(1)
                prevs[n] = torch.cat([first, o[:, :-1]], 1) if d == 0 else torch.cat([o[:, 1:], first], 1)
                inputs[n], us[n] = layer_in.detach(), u[d]
                h_last.append(res[1][d])
                if module.mode == "LSTM":
                    c_last.append(res[2][d])
            layer_in = out
        results = [layer_in, torch.stack(h_last, 1)] + ([torch.stack(c_last, 1)] if c_last else [])
        live = [j for j in range(call.num_outputs) if call.has_grad(j)]
        found = torch.autograd.grad([results[j] for j in live], list(us.values()), [call.grad(j) for j in live],
                                    allow_unused=True)
    forms = Forms()
    for (n, u), g in zip(us.items(), found):
        b = torch.zeros_like(u) if g is None else g
        bw = b
        if module.mode == "GRU":  # the hidden side of n enters times r
            w = F.linear(prevs[n], getattr(module, f"weight_hh_{n}").detach(),
                         getattr(module, f"bias_hh_{n}").detach() if module.bias else None)
            r = torch.sigmoid(u.detach()[..., :hidden] + w[..., :hidden])
            bw = torch.cat([b[..., : 2 * hidden], b[..., 2 * hidden :] * r], 2)
        forms.weights[f"weight_ih_{n}"] = [Block(0, inputs[n], b)]
        forms.weights[f"weight_hh_{n}"] = [Block(0, prevs[n], bw)]
        if module.bias:
            s = b.sum(1)
            forms.sums[f"bias_ih_{n}"] = [(0, s)]
            forms.sums[f"bias_hh_{n}"] = [(0, s if bw is b else bw.sum(1))]
    return forms


@DEFAULT.register(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentRule(LinearFormRule):
    """nn.RNN, nn.LSTM and nn.GRU: batch_first either way, any num_layers, bidirectional, bias on or off,
    LSTM proj_size, with or without an initial state, gradients from output, h_n and c_n alike."""

    reproduces = (nn.RNN, nn.LSTM, nn.GRU)
    #: the top layer's outputs are every step's hidden state: the written-out backward takes them from the call
    keeps_outputs = True

    def knows(self, module: nn.Module, name: str) -> bool:
        return name in getattr(module, "_flat_weights_names", ())

    def forms(self, module: nn.Module, call: Call, names: Collection[str]) -> Forms:
        return _forms(module, call)  # type: ignore[arg-type]
