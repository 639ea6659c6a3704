"""The rule contract, the materializing defaults every rule inherits, and the products rules share.

A rule turns the captured calls (:class:`~psgrad.rules.call.Call`) of one module into, for the parameters it
owns (by local name):
- ``grad_sample``: per-sample gradients ``[B, *p.shape]``, written (or added) into given buffers;
- ``norm_sample``: per-sample squared norms ``[B]`` of the sum over all calls, plus a cache the rule owns;
- ``clipped_sum``: ``sum_i c_i g_i`` given the clipping factors ``c``, reusing that cache.
- ``reduce``: each parameter handed to a :class:`~psgrad.rules.sink.Sink` (attribution's dot products, Gram
  matrices, projections), materialized by default, as its linear form by :class:`~psgrad.rules.forms.LinearFormRule`.
Only ``grad_sample`` is required. The defaults of the other two materialize it per module (transiently) and
keep it in a :class:`PerSample` cache; a rule that keeps them declares ``keeps_per_sample = True`` (inherited),
which lets an engine sum several such modules' clipped sums at once; a rule with its own clipped sum declares
``keeps_per_sample = False``.

Which modules a rule serves is declared, not coded per rule (DESIGN.md, "A rule applies only to what it was
written for"): ``reproduces`` names the classes whose computation the rule's formula is, ``computation`` their
methods that the formula relies on (``forward`` at least: a subclass that overrides one computes something
else), ``parameters`` the module's own parameters it knows. :meth:`Rule.applicability` applies them, and also
declines a module with parametrizations (its parameters are not the tensors the formula uses) or with forward
hooks of its own (they may change what the module returns); the registry
(:meth:`psgrad.rules.registry.Registry.resolve`) and :meth:`Rule.check` both use it. A rule adds what it must
see of one call (its batch layout, its arguments) in :meth:`Rule.check_call`. Everything a rule declines goes to
the generic rule, exact and per module. Rules know nothing of engines or capture.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._memory import alloc as _alloc
from .._memory import stream as _stream
from .call import Call
from .sink import Sink


@dataclass
class PerSample:
    """The cache of the default :meth:`Rule.norm_sample`: per-sample gradients ``{local name: [B, *shape]}``."""

    grads: dict[str, Tensor]


class Rule:
    #: the classes whose computation this rule's formula is (empty: only the types it is registered for, as given)
    reproduces: ClassVar[tuple[type[nn.Module] | str, ...]] = ()  # a str: a class of another library, by name
    #: methods of those classes that the formula relies on; a subclass overriding one is not served
    computation: ClassVar[tuple[str, ...]] = ("forward",)
    #: the module's own parameters this rule knows (None: any); a module with others is not served
    parameters: ClassVar[frozenset[str] | None] = None
    #: for classes of other libraries: ``{method: digest of its source}`` (:func:`source_digest`) that the
    #: installed class must match, so that a changed release takes the generic rule instead of a stale formula
    digests: ClassVar[dict[str, str]] = {}
    #: for a rule registered by code: whose code that is, in words (the README's rules table)
    code_of: ClassVar[str] = ""
    #: for a rule registered by code that overrides a stock layer's forward: that layer. The module must be one,
    #: and the forward after the registered code's in its class hierarchy (what ``super().forward`` calls) its own
    code_base: ClassVar[type[nn.Module] | None] = None
    #: whether the rule also covers the parameters of the module's children (e.g. MultiheadAttention's
    #: out_proj, whose forward is never called)
    claims_children: ClassVar[bool] = False
    #: whether ``norm_sample`` returns a :class:`PerSample` cache and ``clipped_sum`` is the default weighted sum
    keeps_per_sample: ClassVar[bool] = True
    #: whether the formula also holds where the batch is merged with other rows (a row-wise layer on
    #: ``x.reshape(B * T, d)``, seen through :meth:`Call.arg` as ``[B, T, d]``); other rules decline such calls
    handles_merged: ClassVar[bool] = False
    #: whether the rule knows how a call maps inputs that do not follow the batch (:class:`~psgrad.rules.call.Ragged`)
    handles_ragged: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.keeps_per_sample and cls.clipped_sum is not Rule.clipped_sum:
            raise TypeError(f"{cls.__name__} has its own clipped_sum: declare keeps_per_sample = False")

    @property
    def name(self) -> str:
        """The rule's name in reports (its class name)."""
        return type(self).__name__

    def applicability(self, module: nn.Module) -> str | None:
        """None if this rule's formula is what ``module`` computes, else why not (see the module docstring)."""
        cls = type(module)
        base = cls
        if self.reproduces:
            base = next((c for c in cls.__mro__ if any(_is(c, r) for r in self.reproduces)), None)
            if base is None:
                names = ", ".join(r if isinstance(r, str) else r.__name__ for r in self.reproduces)
                return f"{cls.__name__} is not a {names}"
            for method in self.computation:
                if getattr(cls, method, None) is not getattr(base, method, None):
                    return f"{method} is overridden"
        for method, digest in self.digests.items():
            if source_digest(getattr(base, method, None)) != digest:
                return f"the installed {qualified_name(base)}.{method} is not the one this rule was written for"
        if self.code_base is not None and (reason := _over_base(module, self.code_base)) is not None:
            return reason
        unknown = sorted(n for n, p in module._parameters.items() if p is not None and not self.knows(module, n))
        if unknown:  # e.g. the weight rebuilt from other parameters by a hook: not this rule's formula
            return f"{cls.__name__} owns parameters {unknown} that the rule does not know"
        return foreign_computation(module)

    def knows(self, module: nn.Module, name: str) -> bool:
        """Whether ``name`` is one of the module's own parameters that the rule's formula covers."""
        return self.parameters is None or name in self.parameters

    def check(self, module: nn.Module, call: Call | None) -> str | None:
        """None if this rule can handle ``call`` of ``module``, else why not (the generic rule then takes it):
        :meth:`applicability`, calls with the batch merged into rows where the rule does not handle them, then
        :meth:`check_call`."""
        reason = self.applicability(module)
        if reason is None and call is not None and not self.handles_merged and call.merged():
            reason = "the batch is merged with other rows in a tensor of the call"
        if reason is None and call is not None and not self.handles_ragged:
            reason = call.ragged()
        return reason or self.check_call(module, call)

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        """What this rule must see of one call (batch layout, arguments); None if it can handle it."""
        return None

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        """Write (``accumulate=False``) or add the per-sample gradients of ``call`` into ``dest``."""
        raise NotImplementedError

    def norm_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> tuple[dict[str, Tensor], Any]:
        """Per-sample squared norms of each parameter's gradient summed over ``calls``, and a cache for
        :meth:`clipped_sum`. Default: materialize the per-sample gradients (kept as a :class:`PerSample`)."""
        grads = materialize(self, module, calls, names)
        return {n: sq_norms(g) for n, g in grads.items()}, PerSample(grads)

    def clipped_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], c: Tensor, cache: Any
    ) -> dict[str, Tensor]:
        """``sum_i c_i g_i`` for each parameter in ``names``; ``cache`` is what :meth:`norm_sample` returned.
        Default: the weighted sum of the cached per-sample gradients."""
        return {n: weighted_sum(c, cache.grads[n]) for n in names}

    def reduce(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], sink: Sink) -> None:
        """Hand each parameter in ``names`` (its per-sample gradient summed over ``calls``) to ``sink``
        (:mod:`psgrad.rules.sink`). Default: materialized, one parameter at a time."""
        for name in names:
            sink.grads(name, materialize_one(self, module, calls, name))


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _over_base(module: nn.Module, base: type[nn.Module]) -> str | None:
    """None if ``module`` is a ``base`` whose forward, after the overriding one, is ``base``'s own."""
    if not isinstance(module, base):
        return f"{type(module).__name__} is not an nn.{base.__name__}"
    mro = type(module).__mro__
    owner = next(i for i, c in enumerate(mro) if "forward" in c.__dict__)
    after = next((c for c in mro[owner + 1:] if "forward" in c.__dict__), None)
    return None if after is base else f"its super().forward is not {base.__name__}'s"


def _is(cls: type, reproduced: type | str) -> bool:
    return cls is reproduced if isinstance(reproduced, type) else qualified_name(cls) == reproduced


@functools.cache
def source_digest(fn: Any) -> str | None:
    """A digest of a function's code that ignores formatting, comments, its docstring, name and decorators (the
    dump of its syntax tree); None where the source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    node.name, node.decorator_list = "f", []
    if node.body and isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant):
        node.body = node.body[1:]
    return hashlib.sha256(ast.dump(node).encode()).hexdigest()[:16]


def foreign_computation(module: nn.Module) -> str | None:
    """Why ``module`` may compute more than its class says, or None: parametrizations (``parametrize``,
    ``weight_norm``), forward or forward-pre hooks of its own (old-style ``weight_norm``/``spectral_norm``
    recompute the weight in one; a user's hook may change the output), or global module hooks."""
    if parametrize.is_parametrized(module):
        return f"{type(module).__name__} has parametrizations ({', '.join(module.parametrizations)})"
    own = [kind for kind, hooks in (("forward pre-hooks", module._forward_pre_hooks), ("forward hooks", module._forward_hooks))
           if hooks]
    if own:
        return f"{type(module).__name__} has {' and '.join(own)} of its own"
    if _global_hooks():
        return "global module forward hooks are registered"
    return None


def _global_hooks() -> bool:
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


#: elements of the squares :func:`sq_norms` forms at once: a bounded temporary, not one as large as ``g``
SQ_NORMS_CHUNK = 1 << 22


def sq_norms(g: Tensor) -> Tensor:
    """Per-sample squared norms ``[B]`` of per-sample gradients ``[B, *shape]`` (any shape, scalars too)."""
    # pow-sum, not vector_norm: slightly slower, but its cascaded summation keeps the norms of large per-sample
    # gradients far closer to the float64 truth (benchmarks/README.md, "squared norms"); in chunks of examples, so
    # that the squares of a [B, V, d] gradient (a tied embedding's) are never all held at once
    flat = g.reshape(g.shape[0], -1)
    per = max(1, SQ_NORMS_CHUNK // max(1, flat.shape[1]))
    if per >= flat.shape[0]:
        return flat.pow(2).sum(1)
    return torch.cat([part.pow(2).sum(1) for part in flat.split(per)])


def weighted_sum(c: Tensor, per_sample: Tensor) -> Tensor:
    """``sum_i c_i g_i`` over the batch dimension of per-sample values ``[B, *shape]`` (in their dtype)."""
    return (c.to(per_sample.dtype) @ per_sample.reshape(per_sample.shape[0], -1)).view(per_sample.shape[1:])


#: per-sample tensors up to this many elements per example are summed together by :func:`weighted_sums`
SMALL_PER_SAMPLE = 4096


def weighted_sums(c: Tensor, per_sample: Sequence[Tensor]) -> list[Tensor]:
    """:func:`weighted_sum` of several per-sample tensors of one dtype and device, as one matrix product over
    their concatenation (small tensors, e.g. norm layers' ``[B, C]``: one operation instead of one per tensor).
    The results are views into one tensor."""
    if len(per_sample) == 1:
        return [weighted_sum(c, per_sample[0])]
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in per_sample], 1)
    total = c.to(flat.dtype) @ flat
    return [part.view(g.shape[1:]) for part, g in zip(total.split([g[0].numel() for g in per_sample]), per_sample)]


def materialize(rule: Rule, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
    """Per-sample gradients of ``names`` summed over ``calls``, in fresh tensors."""
    b = calls[0].batch_size
    dest = {}
    for n in names:
        p = module.get_parameter(n)
        dest[n] = torch.empty((b, *p.shape), dtype=p.dtype, device=p.device)
    for i, call in enumerate(calls):
        rule.grad_sample(module, call, dest, accumulate=i > 0)
    return dest


def materialize_one(rule: Rule, module: nn.Module, calls: Sequence[Call], name: str) -> Tensor:
    """Per-sample gradients of one parameter summed over ``calls``, in a reused scratch block for a consumer that
    is done with them before the next such call (a fresh tensor where it still holds the last one; NOTE [scratch
    for temporaries] in :mod:`psgrad._memory.alloc`): gigabytes of fresh pages per call cost page faults."""
    p = module.get_parameter(name)
    dest = {name: _alloc.scratch("reduce", (calls[0].batch_size, *p.shape), p.dtype, p.device)}
    for i, call in enumerate(calls):
        rule.grad_sample(module, call, dest, accumulate=i > 0)
    return dest[name]


def put(dest: Tensor, value: Tensor, accumulate: bool) -> None:
    """``dest = value`` or ``dest += value``, in place."""
    if accumulate:
        dest.add_(value)
    else:
        dest.copy_(value)


def write_products(dest: Tensor, x: Tensor, y: Tensor, accumulate: bool) -> None:
    """``dest[i] (+)= x[i] @ y[i]`` for ``x: [N, p, T]``, ``y: [N, T, d]`` into ``dest: [N, p, d]`` (a view of the
    caller's buffer): with streaming stores where T is short and the result large (NOTE [streaming writes] in
    :mod:`psgrad._memory.stream`), else one batched product straight into ``dest``."""
    if accumulate:
        dest.baddbmm_(x, y)
    elif not _stream.products_into(dest, x, y):
        # even for T = 1 (outer products) a batched GEMM: it writes the result faster than an elementwise
        # product does, with no temporary
        torch.bmm(x, y, out=dest)


def linear_form_norms(a: Tensor, b: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | Tensor]:
    """Per-sample ``||b_i^T a_i||_F^2`` for ``a: [B, T, d]``, ``b: [B, T, p]``, the cheaper way, and a cache.

    T = 1: ``||a_i|| ||b_i||`` (Goodfellow 2015). Otherwise the ghost norm ``<a_i a_i^T, b_i b_i^T>``
    (Li et al. 2021) costs O(T^2 (p + d)) against O(T p d) for materializing ``b_i^T a_i``; following
    Bu et al. (2022) the ghost norm is used iff 2 T^2 <= p d. When materialized, the per-sample
    gradients ``[B, p, d]`` are returned as the cache, so that the clipped sum is a weighted sum of them
    and ``a`` and ``b`` can be freed; otherwise the cache is ``(a, b)``.
    """
    t, d, p = a.shape[1], a.shape[2], b.shape[2]
    if t == 1:
        return a.pow(2).sum((1, 2)) * b.pow(2).sum((1, 2)), (a, b)
    if ghost_is_cheaper(t, p, d):
        out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
        for rows in ghost_chunks(a.shape[0], t * t * a.element_size()):
            ar, br = a[rows], b[rows]
            out[rows] = ghost_sq_norms(torch.bmm(ar, ar.transpose(1, 2)), torch.bmm(br, br.transpose(1, 2)))
        return out, (a, b)
    g = torch.bmm(b.transpose(1, 2), a)
    return sq_norms(g), g


#: bytes of one ghost-norm Gram temporary at most: its ``[B, T, T]`` products are made for as many examples at a
#: time as fit (with T = 1024 positions they were the largest allocation of a clipped sum: 400 MB for a batch of 100)
GHOST_CHUNK_BYTES = 32 << 20


def ghost_chunks(batch: int, per_example_bytes: int, budget: int | None = None) -> list[slice]:
    """Slices of ``batch`` items (examples, or rows), each as many as keep one temporary within ``budget`` bytes (by
    default one Gram temporary within ``GHOST_CHUNK_BYTES``)."""
    step = max(1, (GHOST_CHUNK_BYTES if budget is None else budget) // max(1, per_example_bytes))
    return [slice(s, min(batch, s + step)) for s in range(0, batch, step)]


#: bytes of one parameter's per-sample gradients that a reduction materializes at once, where its sink takes them a
#: few rows at a time (:meth:`psgrad.rules.sink.Sink.takes_rows`): ResNet-9's 256-channel 3x3 layers hold 236 MB for
#: a batch of 100, half a plain step's peak, and making them takes about twice that again. Parts of the rows keep
#: every example, so the sink's products with them are as large as before and read the sink's own operands (a
#: query's rows, a projection block) once, as whole (benchmarks/README.md).
REDUCE_CHUNK_BYTES = 32 << 20


def reduce_chunks(sink: Sink, name: str, batch: int, shape: tuple[int, ...], element_size: int) -> list[slice] | None:
    """The slices of rows (the first dimension of a parameter of ``shape``) in which parameter ``name`` is
    materialized for ``sink``, or None for all at once (the sink takes them only whole, or they fit in
    ``REDUCE_CHUNK_BYTES``)."""
    row_bytes = batch * math.prod(shape[1:]) * element_size
    if len(shape) < 2 or shape[0] * row_bytes <= REDUCE_CHUNK_BYTES or not sink.takes_rows(name):
        return None
    return ghost_chunks(shape[0], row_bytes, REDUCE_CHUNK_BYTES)


def ghost_is_cheaper(t: int, p: int, d: int) -> bool:
    """Whether the ghost norm of ``b^T a`` (``a: [T, d]``, ``b: [T, p]``) is the cheaper way: 2 T^2 <= p d
    (Bu et al. 2022)."""
    return 2 * t * t <= p * d


def ghost_sq_norms(aa: Tensor, bb: Tensor) -> Tensor:
    """``<a_i a_i^T, b_i b_i^T>`` per sample from the two Gram matrices ``[B, T, T]``: ``||b_i^T a_i||_F^2``.
    ``aa`` is a temporary of the caller's and is overwritten (with the product)."""
    return aa.mul_(bb).sum((1, 2))


def linear_form_clipped(c: Tensor, cache: tuple[Tensor, Tensor] | Tensor) -> Tensor:
    """``sum_i c_i b_i^T a_i`` as ``[p, d]``, from the cache of :func:`linear_form_norms`: one ordinary
    weight-gradient product with scaled output gradients (book-keeping, Bu et al. 2023), or a weighted sum
    of the per-sample gradients where they were materialized."""
    if isinstance(cache, Tensor):
        return weighted_sum(c, cache)
    a, b = cache
    bs = b * c.to(b.dtype).view(-1, 1, 1)
    return bs.reshape(-1, b.shape[2]).t().mm(a.reshape(-1, a.shape[2]))
