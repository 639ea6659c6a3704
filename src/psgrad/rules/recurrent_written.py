"""The gate gradients of nn.LSTM, nn.GRU and nn.RNN by their backward recurrences written out, on the CPU.

NOTE [recurrent backward written out]
The recurrent rule needs ``U = dL/du`` and ``W = dL/dw`` for every example, step and gate pre-activation, with
``u_t = x_t W_ih^T + b_ih`` and ``w_t = h_{t-1} W_hh^T + b_hh`` (NOTE [the recurrence by PyTorch's own kernel] in
:mod:`psgrad.rules.recurrent`). PyTorch's fused layer gives them only when the layer is run on ``u`` with identity
input weights, and on the CPU that identity costs a ``[G, G]`` product per row forward and another backward (G
gates: 4H, 3H, H): for lstm-text four times the layer's own input product. Written out, the backward needs per
step one ``[B, G] x [G, H]`` product and a few elementwise operations on time-first tensors:

- forward (no autograd): every ``h_t`` from the call's own output for the last layer, from PyTorch's fused layer
  on the layer's input below it; ``u`` and ``w`` of all
  steps follow at once, then the gates (an LSTM's cell state ``c_t = f_t c_{t-1} + i_t g_t`` step by step), and
  from them per step the coefficients that turn ``dh_t`` (and an LSTM's ``dc_t``) into the step's ``U_t, W_t``;
- backward, t from the last step down, ``dh_t = dL/dout_t + W_{t+1} W_hh`` (+ a GRU's ``z_{t+1} dh_{t+1}``;
  plus dL/dh_n at the last step), and per mode:
  - LSTM: ``dc_t = dh_t o_t (1 - tanh^2 c_t) + dc_{t+1} f_{t+1}`` (plus dL/dc_n at the last step), ``U_t = W_t =
    [dc_t g_t i_t (1 - i_t), dc_t c_{t-1} f_t (1 - f_t), dc_t i_t (1 - g_t^2), dh_t tanh(c_t) o_t (1 - o_t)]``;
  - GRU (``r, z, n`` with ``n = tanh(u^n + r w^n)``, ``h_t = (1 - z) n + z h_{t-1}``): with
    ``a = dh_t (1 - z)(1 - n^2)``, ``U_t = [a w^n r (1 - r), dh_t (h_{t-1} - n) z (1 - z), a]`` and ``W_t`` the same
    but ``a r`` for n;
  - RNN: ``U_t = W_t = dh_t act'(u_t + w_t)`` (tanh: ``1 - h_t^2``; relu: ``h_t > 0``);
- layers from the top down: the lower layer's output gradient is ``U W_ih`` summed over directions; a reverse
  direction is the forward recurrence on the time-reversed sequence.
It is the same arithmetic as autograd's through the step function (the derivatives of sigmoid and tanh taken from
their outputs), in another order: within float rounding of it. Off the CPU the fused layer is kept: there the
time goes to launching kernels, one per step and operation here.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from .call import Call
from .forms import Block, Forms

#: PyTorch's fused layers by mode (the same calls as nn.RNNBase.forward makes)
FUSED_LAYERS = {"LSTM": torch._VF.lstm, "GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh, "RNN_RELU": torch._VF.rnn_relu}


def _lstm_forward(x: Tensor, h0: Tensor, c0: Tensor, weights: list[Tensor], bias: bool, out: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """One direction over ``x [B, T, D]`` from ``(h0, c0) [B, H]`` (its outputs ``out``, where known, else run
    here): its outputs and previous states
    ``[B, T, H]``, and the coefficients of its backward, time first ``[T, B, 6, H]``: per step ``g i (1 - i)``,
    ``c_prev f (1 - f)``, ``i (1 - g^2)`` (the input, forget and cell gates' factors of ``dc``), ``tanh(c) o (1 - o)``
    (the output gate's factor of ``dh``), ``o (1 - tanh^2 c)`` (``dc`` from ``dh``) and ``f``."""
    steps = x.shape[1]
    w_ih, w_hh = weights[0], weights[1]
    if out is None:
        out = FUSED_LAYERS["LSTM"](x, (h0[None], c0[None]), weights, bias, 1, 0.0, False, False, True)[0]
    h_prev = torch.cat([h0[:, None], out[:, :-1]], 1)
    z = torch.matmul(x.transpose(0, 1), w_ih.t())  # time first [T, B, 4H]: each step's rows contiguous
    z.add_(torch.matmul(h_prev.transpose(0, 1), w_hh.t()))
    if bias:
        z.add_(weights[2] + weights[3])
    z = z.view(steps, x.shape[0], 4, -1)
    i, f, o = z[:, :, 0].sigmoid(), z[:, :, 1].sigmoid(), z[:, :, 3].sigmoid()
    g = z[:, :, 2].tanh()
    ig = i * g
    c = torch.empty_like(ig)
    state = c0
    for t in range(steps):
        state = torch.addcmul(ig[t], f[t], state)
        c[t] = state
    c_prev = torch.cat([c0[None], c[:-1]], 0)
    tc = c.tanh_()
    coef = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tc * o * (1 - o),
                        o * (1 - tc * tc), f], 2)
    return out, h_prev, coef


def _lstm_backward(w_hh: Tensor, coef: Tensor, grad_out: Tensor | None, grad_h: Tensor | None,
                   grad_c: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(U, W)``, both ``[B, T, 4H]`` (the same tensor), of one direction from the coefficients of
    :func:`_lstm_forward` and the gradients of its outputs ``[B, T, H]``, last ``h`` and last ``c`` (any of them
    None: zero)."""
    steps, bsz, _, hidden = coef.shape
    u = torch.empty(steps, bsz, 4, hidden, dtype=coef.dtype, device=coef.device)  # time first, as coef
    zero = coef.new_zeros(bsz, hidden)
    dh = zero if grad_h is None else grad_h
    dc = zero if grad_c is None else grad_c
    for t in reversed(range(steps)):
        k = coef[t]
        if t < steps - 1:
            dh = torch.mm(u[t + 1].view(bsz, 4 * hidden), w_hh)
            dc = dc * coef[t + 1, :, 5]
        if grad_out is not None:
            dh = dh + grad_out[:, t]
        dc = torch.addcmul(dc, dh, k[:, 4])
        torch.mul(k[:, :3], dc[:, None], out=u[t, :, :3])
        torch.mul(k[:, 3], dh, out=u[t, :, 3])
    u = u.transpose(0, 1).reshape(bsz, steps, 4 * hidden)
    return u, u


def _gated_forward(mode: str, x: Tensor, h0: Tensor, c0: Tensor, weights: list[Tensor], bias: bool,
                   out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A GRU or RNN direction over ``x [B, T, D]`` from ``h0 [B, H]``: its outputs and previous states
    ``[B, T, H]``, and time first ``[T, B, 2 G/H + 1, H]`` the factors of ``dh_t`` that give ``U_t`` (G/H of them),
    ``W_t`` (as many) and the direct part of ``dh_{t-1}`` (a GRU's ``z``; an RNN's 0)."""
    steps, bsz = x.shape[1], x.shape[0]
    if out is None:
        out = FUSED_LAYERS[mode](x, h0[None], weights, bias, 1, 0.0, False, False, True)[0]
    h_prev = torch.cat([h0[:, None], out[:, :-1]], 1)
    u = torch.matmul(x.transpose(0, 1), weights[0].t())  # time first [T, B, G]
    w = torch.matmul(h_prev.transpose(0, 1), weights[1].t())
    if bias:
        u.add_(weights[2])
        w.add_(weights[3])
    if mode == "GRU":
        u, w = u.view(steps, bsz, 3, -1), w.view(steps, bsz, 3, -1)
        r = (u[:, :, 0] + w[:, :, 0]).sigmoid_()
        z = (u[:, :, 1] + w[:, :, 1]).sigmoid_()
        n = torch.addcmul(u[:, :, 2], r, w[:, :, 2]).tanh_()
        a = (1 - z) * (1 - n * n)
        gr = a * w[:, :, 2] * r * (1 - r)
        gz = (h_prev.transpose(0, 1) - n) * z * (1 - z)
        return out, h_prev, torch.stack([gr, gz, a, gr, gz, a * r, z], 2)
    h = out.transpose(0, 1)  # [T, B, H]
    slope = 1 - h * h if mode == "RNN_TANH" else (h > 0).to(h.dtype)
    return out, h_prev, torch.stack([slope, slope, torch.zeros_like(slope)], 2)


def _gated_backward(w_hh: Tensor, coef: Tensor, grad_out: Tensor | None, grad_h: Tensor | None,
                    grad_c: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(U, W)``, each ``[B, T, G]``, of a GRU or RNN direction from the factors of :func:`_gated_forward` and the
    gradients of its outputs ``[B, T, H]`` and last ``h`` (None: zero)."""
    steps, bsz, width, hidden = coef.shape
    gates = (width - 1) // 2
    uw = torch.empty(steps, bsz, 2 * gates, hidden, dtype=coef.dtype, device=coef.device)  # time first
    dh = coef.new_zeros(bsz, hidden) if grad_h is None else grad_h
    for t in reversed(range(steps)):
        if t < steps - 1:
            dh = torch.addmm(dh * coef[t + 1, :, -1], uw[t + 1, :, gates:].reshape(bsz, gates * hidden), w_hh)
        if grad_out is not None:
            dh = dh + grad_out[:, t]
        torch.mul(coef[t, :, :-1], dh[:, None], out=uw[t])
    uw = uw.transpose(0, 1)
    return (uw[:, :, :gates].reshape(bsz, steps, gates * hidden),
            uw[:, :, gates:].reshape(bsz, steps, gates * hidden))


def initial_states(module: nn.RNNBase, x: Tensor, hx: Any) -> tuple[Tensor, Tensor]:
    """The call's initial ``(h0, c0)`` ``[layers dirs, B, H]`` (zeros where not given; ``c0`` read by LSTMs only),
    detached, for ``x [B, T, D]`` batch first."""
    h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
    zeros = x.new_zeros((2 if module.bidirectional else 1) * module.num_layers, x.shape[0], module.hidden_size)
    return (zeros if h0 is None else h0.detach()), (zeros if c0 is None else c0.detach())


def written_forms(module: nn.RNNBase, call: Call, x: Tensor, hx: Any) -> Forms:
    """The forms of one call of an LSTM (without proj_size), GRU or RNN on the CPU (NOTE [recurrent backward written
    out]); ``x`` is the call's input batch first ``[B, T, D]``, ``hx`` its initial state(s) or None."""
    hidden, dirs = module.hidden_size, 2 if module.bidirectional else 1
    h0, c0 = initial_states(module, x, hx)
    names = [[f"l{layer}", f"l{layer}_reverse"][:dirs] for layer in range(module.num_layers)]
    if module.mode == "LSTM":
        forward, backward = _lstm_forward, _lstm_backward
    else:
        forward, backward = functools.partial(_gated_forward, module.mode), _gated_backward

    def weights(n: str) -> list[Tensor]:
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if module.bias else ("weight_ih", "weight_hh")
        return [getattr(module, f"{k}_{n}").detach() for k in kinds]

    top = call.output(0)  # the last layer's outputs [B, T, dirs H], as the module returned them
    if top is not None and top.shape[2] != dirs * hidden:
        top = None
    with torch.no_grad():
        inputs, steps = [], []  # per layer: its input; per layer and direction: (h_prev, coef)
        layer_in = x.detach()
        for layer, layer_names in enumerate(names):
            outs = []
            for d, n in enumerate(layer_names):
                k = layer * dirs + d
                seq = layer_in.flip(1) if d else layer_in
                known = None
                if top is not None and layer == module.num_layers - 1:
                    known = top[..., d * hidden:(d + 1) * hidden]
                    known = known.flip(1) if d else known
                out, h_prev, coef = forward(seq, h0[k], c0[k], weights(n), module.bias, out=known)
                outs.append(out.flip(1) if d else out)
                steps.append((h_prev, coef))
            inputs.append(layer_in)
            layer_in = torch.cat(outs, 2) if dirs > 1 else outs[0]
        # the call's gradients hold the batch first: output [B, T, dirs H], h_n and c_n [B, layers dirs, H]
        grad_seq = call.grad(0) if call.has_grad(0) else None
        grad_h = call.grad(1) if call.has_grad(1) else None
        grad_c = call.grad(2) if call.num_outputs > 2 and call.has_grad(2) else None
        forms = Forms()
        for layer in reversed(range(module.num_layers)):
            below = None
            for d, n in enumerate(names[layer]):
                k = layer * dirs + d
                h_prev, coef = steps[k]
                g_out = None if grad_seq is None else grad_seq[..., d * hidden:(d + 1) * hidden]
                g_out = g_out.flip(1) if d and g_out is not None else g_out
                w = weights(n)
                u, w_grad = backward(w[1], coef, g_out, None if grad_h is None else grad_h[:, k],
                                     None if grad_c is None else grad_c[:, k])
                if d:
                    u, w_grad, h_prev = u.flip(1), w_grad.flip(1), h_prev.flip(1)
                forms.weights[f"weight_ih_{n}"] = [Block(0, inputs[layer], u)]
                forms.weights[f"weight_hh_{n}"] = [Block(0, h_prev, w_grad)]
                if module.bias:
                    s = u.sum(1)
                    forms.sums[f"bias_ih_{n}"] = [(0, s)]
                    forms.sums[f"bias_hh_{n}"] = [(0, s if w_grad is u else w_grad.sum(1))]
                if layer:
                    part = torch.matmul(u, w[0])
                    below = part if below is None else below + part
            grad_seq = below
    return forms
