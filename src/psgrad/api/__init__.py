"""The public functions: validate, pick an engine, run it with the model guarded."""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import engines as _engines
from .._memory import alloc as _alloc
from ..batch import Batch, LossFn
from ..clipping import ClipSpec
from ..errors import PsgradError, UnsupportedModelError
from .checks import check_model
from .guard import ModelGuard


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
    batch, chosen = _prepare(model, inputs, targets, params, where)
    dest = _destination(out, flat, chosen, batch.size, where)
    grads, losses = _run(engine, "grads", where, model, loss_fn, batch, chosen, engine_options, out=dest)
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
    **engine_options: Any,
) -> Tensor | dict[str, Tensor]:
    """L2 norm of each example's gradient over all trainable parameters, without materializing it.

    A parameter shared by several modules, or used several times, has one gradient (the sum of its
    uses); its norm is the norm of that sum, cross terms included.

    Args:
        model, loss_fn, inputs, targets, engine, params: as in :func:`per_sample_grads`.
        by_param (bool): return ``{name: Tensor[B]}``, each parameter's own per-sample norm.

    Returns:
        ``Tensor[B]`` in float64 (norms over all parameters), or a dict of ``Tensor[B]`` with ``by_param``.

    Example::

        >>> norms = per_sample_norms(model, nn.CrossEntropyLoss(reduction="none"), x, y)  # [B]
    """
    where = "per_sample_norms"
    batch, chosen = _prepare(model, inputs, targets, params, where)
    sq, _ = _run(engine, "norms", where, model, loss_fn, batch, chosen, engine_options)
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
    **engine_options: Any,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
    """Sum over the batch of each example's clipped gradient, ``sum_i c_i g_i``: what DP-SGD adds noise to.

    Args:
        model, loss_fn, inputs, targets, engine, params: as in :func:`per_sample_grads`.
        max_norm (float | dict): the clipping bound C; with ``clipping="per_layer"`` also a dict
            ``{group: bound}``, groups being the names of the modules that own parameters.
        clipping (str): ``"flat"``: ``c_i = min(1, C / ||g_i||)`` (1 where the norm is 0);
            ``"per_layer"``: each group clipped to its bound (a scalar C gives each of G groups
            ``C / sqrt(G)``, so the total norm stays <= C); ``"automatic"``: ``c_i = C / (||g_i|| + gamma)``.
        gamma (float): the stabiliser of automatic clipping. Default: 0.01.
        return_norms (bool): also return the per-sample norms ``[B]`` (before clipping, float64).

    Returns:
        ``{name: Tensor[*param.shape]}``, the clipped sum (not divided by B), and with ``return_norms``
        a tuple ``(sums, norms)``.

    Example::

        >>> sums = clipped_grad_sum(model, nn.CrossEntropyLoss(reduction="none"), x, y, max_norm=1.0)
        >>> sums["0.weight"].shape  # [3, 4]
        torch.Size([3, 4])
    """
    where = "clipped_grad_sum"
    batch, chosen = _prepare(model, inputs, targets, params, where)
    clip = ClipSpec.make(clipping, max_norm, gamma, parameter_groups(model, chosen), where)
    sums, norms, _ = _run(engine, "clipped_sum", where, model, loss_fn, batch, chosen, engine_options, clip=clip)
    return (sums, norms) if return_norms else sums


def parameter_groups(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{parameter name: group}`` where a group is the name of the module owning the parameter."""
    return {n: n.rpartition(".")[0] for n in names}


# ---------------------------------------------------------------------------------------------------
def _prepare(model, inputs, targets, params, where) -> tuple[Batch, dict[str, nn.Parameter]]:
    check_model(model, where)
    batch = Batch.make(inputs, targets, where)
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    else:
        if isinstance(params, str):
            raise PsgradError(f"{where}: params must be a list of parameter names, not a string")
        params = list(params)
        unknown = [n for n in params if n not in named]
        if unknown:
            raise PsgradError(f"{where}: unknown parameter names {unknown}; see model.named_parameters()")
        frozen = [n for n in params if not named[n].requires_grad]
        if frozen:
            raise PsgradError(f"{where}: parameters {frozen} have requires_grad=False")
        if not params:
            raise PsgradError(f"{where}: params is empty")
        chosen = {n: named[n] for n in named if n in set(params)}
    return batch, chosen


class _Dest(dict):
    flat: Tensor | None = None


def _destination(out, flat, params, size, where) -> _Dest | None:
    """Views of the caller's buffers (first ``size`` rows), or a fresh flat buffer, or None."""
    if flat:
        total = sum(p.numel() for p in params.values())
        first = next(iter(params.values()))
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise PsgradError(f"{where}: flat=True needs parameters of one dtype, found {sorted(map(str, dtypes))}")
        if out is None:
            buf = _alloc.results({"flat": (size, total)}, first.dtype, first.device)["flat"]
        else:
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != total or out.shape[0] < size:
                shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise PsgradError(f"{where}: with flat=True, out must be a tensor of shape [>= {size}, {total}], got {shape}")
            _check_buffer(out, first, where, "out")
            buf = out[:size]
        dest = _Dest()
        offset = 0
        for n, p in params.items():
            dest[n] = buf[:, offset : offset + p.numel()].view(size, *p.shape)
            offset += p.numel()
        dest.flat = buf
        return dest
    if out is None:
        return None
    if not isinstance(out, Mapping):
        raise PsgradError(f"{where}: out must be the dict returned by an earlier call (or a tensor with flat=True)")
    missing = [n for n in params if n not in out]
    extra = [n for n in out if n not in params]
    if missing or extra:
        raise PsgradError(f"{where}: out does not match the parameters: missing {missing}, unexpected {extra}")
    dest = _Dest()
    for n, p in params.items():
        buf = out[n]
        if not isinstance(buf, Tensor) or buf.dim() != p.dim() + 1 or buf.shape[1:] != p.shape or buf.shape[0] < size:
            shape = list(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
            raise PsgradError(f"{where}: out['{n}'] has shape {shape}, expected [>= {size}, {', '.join(map(str, p.shape))}]")
        _check_buffer(buf, p, where, f"out['{n}']")
        dest[n] = buf[:size]
    return dest


def _check_buffer(buf: Tensor, p: Tensor, where: str, label: str) -> None:
    if buf.dtype != p.dtype or buf.device != p.device:
        raise PsgradError(
            f"{where}: {label} is {buf.dtype} on {buf.device} but the parameter is {p.dtype} on {p.device}"
        )
    if buf.requires_grad:
        raise PsgradError(f"{where}: {label} requires grad; pass a plain buffer")
    if torch._debug_has_internal_overlap(buf) == 1:  # e.g. an expanded tensor: several elements share memory
        raise PsgradError(f"{where}: {label} has elements that share memory (an expanded view?); pass a plain buffer")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """NOTE [no garbage collection during a call]: one call creates thousands of small Python objects (the model
    guard's records, calls, closures, hook handles), enough to trigger collections, now and then a full one that
    walks every object of the process and costs a large part of a call (benchmarks/README.md, "Measurements behind
    choices in the code"). Reference counting frees everything a call makes, so with
    the collector paused for the call (and restored as it was) those objects never count towards a collection."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _run(engine_name, task, where, model, loss_fn, batch, params, options, **kw):
    if not isinstance(engine_name, str):
        raise PsgradError(f"{where}: engine must be a name, got {type(engine_name).__name__}")
    if engine_name == "auto":
        candidates = [n for n in _engines.AUTO_ORDER if _engines.ENGINES[n].available() is None]
    else:
        engine = _engines.get(engine_name, where)
        reason = engine.available()
        if reason is not None:
            raise PsgradError(f"{where}: engine {engine_name!r} is not available: {reason}")
        candidates = [engine_name]
    first = _engines.ENGINES[candidates[0]]
    unknown = sorted(set(options) - first.options)
    if unknown:
        valid = ", ".join(sorted(first.options)) or "none"
        raise TypeError(f"{where}: engine {first.name!r} got unexpected option(s) {unknown}; its options: {valid}")
    for i, name in enumerate(candidates):
        engine = _engines.ENGINES[name]
        mine = {k: v for k, v in options.items() if k in engine.options}  # auto's fallbacks drop hooks' options
        try:
            with _gc_paused(), ModelGuard(model):
                return getattr(engine, task)(model, loss_fn, batch, params, **kw, **mine)
        except UnsupportedModelError as exc:
            if engine_name != "auto" or i == len(candidates) - 1:
                raise
            warnings.warn(f"{where}: engine {name!r} cannot handle this model ({exc}); using {candidates[i + 1]!r}",
                          stacklevel=3)
    raise AssertionError("unreachable")
