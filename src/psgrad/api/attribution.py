"""The attribution primitives: exact per-sample dot products, Gram matrices and random projections, computed
parameter by parameter from what the engine captures (the sinks of :mod:`psgrad.api.sinks`), never holding the
``B x P`` per-sample gradients."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..batch import Batch, LossFn
from ..errors import PsgradError
from ..projection import Projector
from .checks import prepare
from .run import run_engine
from .sinks import Dots, Gram, Projected, split_flat


def per_sample_dots(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor | None,
    query: Mapping[str, Tensor] | Tensor,
    *,
    engine: str = "auto",
    params: Iterable[str] | None = None,
    check: bool | None = None,
    **engine_options: Any,
) -> Tensor:
    """Dot products of each example's gradient with each of Q query vectors, ``<g_i, q_j>``, exactly.

    Args:
        model, loss_fn, inputs, targets, engine, params, check: as in :func:`psgrad.per_sample_grads`.
        query (dict | Tensor): ``{name: Tensor[Q, *param.shape]}`` for every parameter in ``params``, or one
            ``Tensor[Q, P]`` with columns in the ``flat=True`` order of those parameters.

    Returns:
        ``Tensor[B, Q]`` in float64 (sums over parameters accumulated in float64).

    Per layer the cheaper of materializing that layer's per-sample gradients and a per-layer form (NOTE
    [attribution costs] in ``psgrad.api.sinks``); the ``[B, P]`` matrix is never held (with the hooks engine).

    Example::

        >>> q = psgrad.per_sample_grads(model, loss_fn, xq, yq, flat=True)    # [Q, P]
        >>> scores = psgrad.per_sample_dots(model, loss_fn, x, y, q)          # [B, Q]
    """
    where = "per_sample_dots"
    batch, chosen = prepare(model, inputs, targets, params, where)
    sink = Dots(batch.size, _queries(query, chosen, where))
    _reduce(engine, where, model, loss_fn, batch, chosen, engine_options, check, sink)
    return sink.result(_device(chosen))


def per_sample_gram(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor | None = None,
    other: tuple[Any, Tensor | None] | None = None,
    *,
    engine: str = "auto",
    params: Iterable[str] | None = None,
    check: bool | None = None,
    **engine_options: Any,
) -> Tensor:
    """Inner products of per-sample gradients, ``<g_i, g_j>``: within the batch, or against a second batch.

    Args:
        model, loss_fn, inputs, targets, engine, params, check: as in :func:`psgrad.per_sample_grads`.
        other (tuple, optional): ``(inputs2, targets2)``, a second batch of B' examples.

    Returns:
        ``Tensor[B, B]`` (or ``[B, B']`` against ``other``) in float64.

    Against ``other`` both batches run through the model as one batch of B + B' (each example's loss is its
    own, so nothing changes for it); where they cannot be joined (other shapes), the second batch's
    per-sample gradients are materialized and the scores are :func:`per_sample_dots` with them. Per layer
    the cheaper of a ghost product and materializing the layer (NOTE [attribution costs] in
    ``psgrad.api.sinks``). With ``other``, the diagonal of the self-Gram is the squared per-sample norm.

    Example::

        >>> scores = psgrad.per_sample_gram(model, loss_fn, x, y, other=(x_test, y_test))   # [B, B']
    """
    where = "per_sample_gram"
    batch, chosen = prepare(model, inputs, targets, params, where)
    if other is None:
        sink = Gram(batch.size, None)
        _reduce(engine, where, model, loss_fn, batch, chosen, engine_options, check, sink)
        return sink.result(_device(chosen))
    if not isinstance(other, (tuple, list)) or len(other) != 2:
        raise PsgradError(f"{where}: other must be a pair (inputs, targets), got {type(other).__name__}")
    second = Batch.make(other[0], other[1], where)
    joined = batch.concat(second)
    if joined is None:
        queries = _engine_grads(engine, where, model, loss_fn, second, chosen, engine_options, check)
        sink = Dots(batch.size, queries)
        _reduce(engine, where, model, loss_fn, batch, chosen, engine_options, check, sink)
        return sink.result(_device(chosen))
    sink = Gram(joined.size, batch.size)
    _reduce(engine, where, model, loss_fn, joined, chosen, engine_options, check, sink)
    return sink.result(_device(chosen))


def project(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor | None,
    projector: Projector,
    *,
    engine: str = "auto",
    check: bool | None = None,
    **engine_options: Any,
) -> Tensor:
    """Each example's gradient projected to ``projector.dim`` features, ``z_i = M^T g_i``, exactly for the
    projector's matrix ``M = projector.dense()`` (NOTE [projections] in ``psgrad.projection``).

    Args:
        model, loss_fn, inputs, targets, engine, check: as in :func:`psgrad.per_sample_grads`; the parameters
            are the projector's.
        projector (Projector): made for this model.

    Returns:
        ``Tensor[B, dim]`` in the parameters' dtype. ``E[<z_i, z_j>] = <g_i, g_j>``.

    Example::

        >>> proj = psgrad.Projector(model, 1024, kind="kronecker", seed=0)
        >>> z = psgrad.project(model, loss_fn, x, y, proj)
    """
    where = "project"
    if not isinstance(projector, Projector):
        raise PsgradError(f"{where}: projector must be a psgrad.Projector, got {type(projector).__name__}")
    chosen_names = list(projector.check_model(model, where))
    batch, chosen = prepare(model, inputs, targets, chosen_names, where)
    sink = Projected(batch.size, projector)
    _reduce(engine, where, model, loss_fn, batch, chosen, engine_options, check, sink)
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in chosen.values()])
    return sink.result(_device(chosen)).to(dtype)


# ---------------------------------------------------------------------------------------------------
def _reduce(engine, where, model, loss_fn, batch, chosen, options, check, sink) -> None:
    run_engine(engine, "reduce", where, model, loss_fn, batch, chosen, options, check, sink=sink, context=where)


def _engine_grads(engine, where, model, loss_fn, batch, chosen, options, check) -> dict[str, Tensor]:
    grads, _ = run_engine(engine, "grads", where, model, loss_fn, batch, chosen, options, check, out=None)
    return grads


def _device(chosen: Mapping[str, nn.Parameter]) -> torch.device:
    return next(iter(chosen.values())).device


def _queries(query: Any, chosen: Mapping[str, nn.Parameter], where: str) -> dict[str, Tensor]:
    """The queries as ``{name: [Q, *shape]}`` for exactly the chosen parameters, checked."""
    shapes = {n: tuple(p.shape) for n, p in chosen.items()}
    if isinstance(query, Tensor):
        total = sum(math.prod(s) for s in shapes.values())
        if query.dim() != 2 or query.shape[1] != total:
            raise PsgradError(f"{where}: a flat query must be [Q, P] with P = {total} (the parameters' values in "
                              f"flat=True order), got shape {list(query.shape)}")
        query = split_flat(query, shapes)
    elif isinstance(query, Mapping):
        missing, extra = sorted(set(shapes) - set(query)), sorted(set(query) - set(shapes))
        if missing or extra:
            raise PsgradError(f"{where}: query must have one entry per parameter asked for; missing {missing[:5]}, "
                              f"not asked for {extra[:5]} (pass params= to choose the parameters)")
    else:
        raise PsgradError(f"{where}: query must be a dict of tensors or a [Q, P] tensor, got {type(query).__name__}")
    sizes = set()
    for name, q in query.items():
        if not isinstance(q, Tensor) or tuple(q.shape[1:]) != shapes[name] or q.dim() != len(shapes[name]) + 1:
            got = list(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise PsgradError(f"{where}: query[{name!r}] must be [Q, {', '.join(map(str, shapes[name]))}], got {got}")
        sizes.add(q.shape[0])
    if len(sizes) != 1:
        raise PsgradError(f"{where}: the query tensors disagree on Q (dimension 0): {sorted(sizes)}")
    if 0 in sizes:
        raise PsgradError(f"{where}: the query set is empty (Q = 0)")
    return {n: query[n].detach() for n in shapes}
