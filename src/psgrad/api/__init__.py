"""The public functions: validate, pick an engine, run it with the model guarded."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import engines as _engines
from .._memory import alloc as _alloc
from ..batch import LossFn
from ..clipping import ClipSpec
from ..errors import PsgradError
from . import graphed as _graphed
from .attribution import per_sample_dots as per_sample_dots
from .attribution import per_sample_gram as per_sample_gram
from .attribution import project as project
from .buffers import destination
from .checks import prepare
from .explain import Explanation, explain_call
from .graphed import check_buckets as check_buckets
from .run import SumSink, run_engine


def empty_cache() -> None:
    """Release the large CPU result buffers psgrad keeps for reuse once callers have dropped them.

    Fresh results of ``per_sample_grads`` are carved out of blocks that are reused only after every
    tensor of an earlier result is gone (as PyTorch's CUDA caching allocator does), which saves the page
    faults of touching gigabytes of new memory on every call. Call this to hand that memory back.
    """
    _alloc.empty_cache()


def engines() -> list[str]:
    """Names of the engines available in this environment (``"auto"`` picks among them)."""
    return _engines.available()


def engine_status() -> dict[str, str | None]:
    """Every engine psgrad knows, with None where it is usable here, else the reason (e.g. what to install)."""
    return {name: engine.available() for name, engine in _engines.ENGINES.items()}


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor | None = None,
    *,
    engine: str = "auto",
    params: Iterable[str] | None = None,
    out: Mapping[str, Tensor] | Tensor | None = None,
    flat: bool = False,
    return_losses: bool = False,
    check: bool | None = None,
    cuda_graph: bool | Sequence[int] = False,
    **engine_options: Any,
) -> dict[str, Tensor] | Tensor | tuple[dict[str, Tensor] | Tensor, Tensor]:
    """Gradient of each example's own loss with respect to each trainable parameter.

    Runs the model once on the batch (or once per example, for the ``loop`` engine) and returns, for
    every parameter, a tensor whose row i is the gradient of ``loss_fn(outputs, targets)[i]``. Row i
    does not depend on the other examples or on the batch size.

    Args:
        model (nn.Module): the model, called as ``model(inputs)``, ``model(*inputs)`` (tuple) or
            ``model(**inputs)`` (dict). It is left exactly as found: modes, hooks, ``.grad``, buffers.
        loss_fn (Callable): ``loss_fn(outputs, targets)`` returning per-sample losses of shape ``[B]``,
            e.g. ``nn.CrossEntropyLoss(reduction="none")``.
        inputs (Tensor | tuple | dict): model inputs; the batch is dimension 0 of every tensor.
        targets (Tensor, optional): targets with batch dimension 0, passed to ``loss_fn``. Default: None.
        engine (str): ``"auto"`` (default: ``hooks``, falling back to ``vmap`` then ``loop`` for models an
            engine cannot handle exactly), or one of :func:`psgrad.engines`.
        params (Iterable[str], optional): parameter names to return; default: all with requires_grad.
        out (dict | Tensor, optional): buffers from an earlier call to write into. Their batch dimension
            may exceed B; the result is then views of their first B rows. A ``[B', P]`` tensor with
            ``flat=True``.
        flat (bool): return one contiguous ``[B, P]`` tensor, parameters in ``named_parameters()`` order.
        return_losses (bool): also return the per-sample losses ``[B]``.
        check (bool, optional): check that the per-sample gradients add up to the batch gradient autograd
            computes from the same forward, per parameter, and raise :class:`~psgrad.ConsistencyError` naming
            the parameters that do not (``||sum_i g_i - grad sum_i l_i|| <= tau sum_i ||g_i||``; NOTE [the
            consistency check] in ``psgrad.engines.consistency``). Default None: ``auto`` checks the first call
            for each model structure and falls back on a failure; other engines do not check.
        cuda_graph (bool | list[int]): on CUDA, capture the call as a CUDA graph per batch-size bucket and replay it
            in later calls (NOTE [captured calls] in ``psgrad.api.graphed``); a list gives the bucket sizes. Where a
            call cannot be captured, or off CUDA, it runs eagerly with one :class:`~psgrad.FallbackWarning`.
            Default: False.
        **engine_options: options of the chosen engine (e.g. ``chunk_size`` for vmap).

    Returns:
        ``{name: Tensor[B, *param.shape]}`` (or ``Tensor[B, P]`` with ``flat=True``); with
        ``return_losses=True``, a tuple ``(grads, losses)``.

    Note:
        The gradient of example i is that of its own loss: with a mean-reduced training loss, the
        gradient of the batch loss is the *mean* of these rows, not their sum.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> g = per_sample_grads(model, nn.CrossEntropyLoss(reduction="none"), x, y)
        >>> g["0.weight"].shape  # [B, 3, 4]
        torch.Size([8, 3, 4])
    """
    where = "per_sample_grads"
    batch, chosen = prepare(model, inputs, targets, params, where)
    if cuda_graph is not False:
        replayed = _graphed.grads(where, model, loss_fn, batch, chosen, engine, engine_options, check, out, flat,
                                  cuda_graph)
        if replayed is not None:
            return replayed if return_losses else replayed[0]
    dest = destination(out, flat, chosen, batch.size, where)
    grads, losses = run_engine(engine, "grads", where, model, loss_fn, batch, chosen, engine_options, check, out=dest)
    result: dict[str, Tensor] | Tensor = grads
    if flat:
        result = dest.flat  # type: ignore[union-attr]
    return (result, losses) if return_losses else result


def per_sample_norms(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor | None = None,
    *,
    engine: str = "auto",
    params: Iterable[str] | None = None,
    by_param: bool = False,
    check: bool | None = None,
    **engine_options: Any,
) -> Tensor | dict[str, Tensor]:
    """L2 norm of each example's gradient over all trainable parameters, without materializing it.

    A parameter shared by several modules, or used several times, has one gradient (the sum of its
    uses); its norm is the norm of that sum, cross terms included.

    Args:
        model, loss_fn, inputs, targets, engine, params, check: as in :func:`per_sample_grads` (the check is
            on the sums of the per-sample gradients the norms are computed from, not on the norms themselves).
        by_param (bool): return ``{name: Tensor[B]}``, each parameter's own per-sample norm.

    Returns:
        ``Tensor[B]`` in float64 (norms over all parameters), or a dict of ``Tensor[B]`` with ``by_param``.

    Example::

        >>> norms = per_sample_norms(model, nn.CrossEntropyLoss(reduction="none"), x, y)  # [B]
    """
    where = "per_sample_norms"
    batch, chosen = prepare(model, inputs, targets, params, where)
    sq, _ = run_engine(engine, "norms", where, model, loss_fn, batch, chosen, engine_options, check)
    if by_param:
        return {n: s.sqrt() for n, s in sq.items()}
    return torch.stack([s.double() for s in sq.values()]).sum(0).sqrt()


def clipped_grad_sum(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor | None,
    max_norm: float | Mapping[str, float],
    *,
    engine: str = "auto",
    params: Iterable[str] | None = None,
    clipping: str = "flat",
    gamma: float = 0.01,
    return_norms: bool = False,
    return_losses: bool = False,
    check: bool | None = None,
    on_sum: Callable[[str, Tensor], None] | None = None,
    cuda_graph: bool | Sequence[int] = False,
    **engine_options: Any,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
    """Sum over the batch of each example's clipped gradient, ``sum_i c_i g_i``: what DP-SGD adds noise to.

    Args:
        model, loss_fn, inputs, targets, engine, params, check: as in :func:`per_sample_grads` (the check is on
            the unclipped sums ``sum_i g_i`` taken from the same per-layer caches as the clipped ones).
        max_norm (float | dict): the clipping bound C; with ``clipping="per_layer"`` also a dict
            ``{group: bound}``, groups being the names of the modules that own parameters.
        clipping (str): ``"flat"``: ``c_i = min(1, C / ||g_i||)`` (1 where the norm is 0);
            ``"per_layer"``: each group clipped to its bound (a scalar C gives each of G groups
            ``C / sqrt(G)``, so the total norm stays <= C); ``"automatic"``: ``c_i = C / (||g_i|| + gamma)``.
        gamma (float): the stabiliser of automatic clipping. Default: 0.01.
        return_norms (bool): also return the per-sample norms ``[B]`` (before clipping, float64).
        return_losses (bool): also return the per-sample losses ``[B]``.
        on_sum (Callable, optional): ``on_sum(name, sum)``, called once per parameter with the tensor that the
            result will hold, as soon as that sum is complete: with the hooks engine layer by layer while the
            later layers' sums are still being computed (to start communicating them early), with the others
            when all are done. A call that has handed out sums does not fall back to another engine. With
            ``cuda_graph``, when all are done.
        cuda_graph (bool | list[int]): as in :func:`per_sample_grads`; the padding rows of a bucket get clipping
            factor 0.

    Returns:
        ``{name: Tensor[*param.shape]}``, the clipped sum (not divided by B); with ``return_norms`` and/or
        ``return_losses``, a tuple of it and those, in that order (``(sums, norms, losses)``).

    Example::

        >>> sums = clipped_grad_sum(model, nn.CrossEntropyLoss(reduction="none"), x, y, max_norm=1.0)
        >>> sums["0.weight"].shape  # [3, 4]
        torch.Size([3, 4])
    """
    where = "clipped_grad_sum"
    batch, chosen = prepare(model, inputs, targets, params, where)
    clip = ClipSpec.make(clipping, max_norm, gamma, parameter_groups(model, chosen), where)
    if on_sum is not None and not callable(on_sum):
        raise PsgradError(f"{where}: on_sum must be a function of (name, tensor), got {type(on_sum).__name__}")
    sink = None if on_sum is None else SumSink(on_sum)
    replayed = None
    if cuda_graph is not False:
        replayed = _graphed.clipped(where, model, loss_fn, batch, chosen, engine, engine_options, check, clip, sink,
                                    cuda_graph)
    if replayed is not None:
        sums, norms, losses = replayed
    else:
        sums, norms, losses = run_engine(engine, "clipped_sum", where, model, loss_fn, batch, chosen, engine_options,
                                         check, clip=clip, on_sum=sink)
    extra = (norms,) * return_norms + (losses,) * return_losses
    return (sums, *extra) if extra else sums


def explain(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor | None = None,
    *,
    params: Iterable[str] | None = None,
    **engine_options: Any,
) -> Explanation:
    """Which path each module with parameters takes in the hooks engine, and why, from one call on this batch.

    Args:
        model, loss_fn, inputs, targets, params: as in :func:`per_sample_grads`.
        **engine_options: options of the hooks engine (e.g. ``registry``).

    Returns:
        An :class:`~psgrad.api.explain.Explanation`, a list with one record per module with parameters:
        ``path`` (its name in ``named_modules()``), ``type``, ``rule`` (the rule's name, ``"generic"``,
        ``"refused"``, or which unit differentiates its parameters), ``reason`` (why not a fast rule, or why
        refused), ``calls`` and ``generic_seconds`` (time in the generic rule for it, this call). It prints as a
        table. The call also runs the consistency check; a module whose rule fails it is reported as refused.

    Example::

        >>> print(psgrad.explain(model, nn.CrossEntropyLoss(reduction="none"), x, y))
    """
    where = "explain"
    batch, chosen = prepare(model, inputs, targets, params, where)
    unknown = sorted(set(engine_options) - _engines.ENGINES["hooks"].options)
    if unknown:
        raise TypeError(f"{where}: unexpected option(s) {unknown}; the hooks engine's options: "
                        f"{', '.join(sorted(_engines.ENGINES['hooks'].options))}")
    return explain_call(model, loss_fn, batch, chosen, engine_options)


def parameter_groups(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{parameter name: group}`` where a group is the name of the module owning the parameter."""
    return {n: n.rpartition(".")[0] for n in names}
