"""What a reduction over per-sample gradients receives from the rules: one parameter at a time, either
materialized or, where the rule has it, as the linear form it is made of.

A :class:`Sink` stands for any quantity that is a sum over parameters of something computed from one
parameter's per-sample gradients alone: dot products with queries, Gram matrices, random projections. The rule
of a module hands each of its parameters (by local name) to :meth:`Sink.grads` as ``[B, *shape]``, or first
offers it to :meth:`Sink.weight_form` / :meth:`Sink.sum_form` as the blocks that make it up (see
:mod:`psgrad.rules.forms`); a sink that returns False there gets it materialized. Sinks decide what is cheaper;
rules decide nothing about cost. Rules know nothing of engines, which adapt the names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


class Sink:
    """The receiving end of :meth:`psgrad.rules.base.Rule.reduce`."""

    def reset(self) -> None:
        """Forget everything received: an engine calls it before each attempt (a retry starts afresh)."""

    def grads(self, name: str, g: Tensor, rows: slice | None = None) -> None:
        """The per-sample gradients ``[B, *shape]`` of parameter ``name`` (summed over its calls); with ``rows``
        (only where :meth:`takes_rows` says so), only rows ``rows`` of the parameter (its first dimension, the output
        channels of a weight), ``[B, len(rows), *shape[1:]]``."""
        raise NotImplementedError

    def takes_rows(self, name: str) -> bool:
        """Whether parameter ``name`` may arrive a few of its rows at a time (:meth:`grads` with ``rows``, each row
        once, for every example): a rule that materializes a large gradient then never holds all of it. Every
        quantity here is a sum over the parameter's entries, so a sink can take them unless it keeps the whole
        gradient (the traker projection)."""
        return False

    def weight_form(self, name: str, blocks: Sequence[Any]) -> bool:
        """Parameter ``name`` (2-D) as :class:`~psgrad.rules.forms.Block` s: rows ``offset : offset + p`` of
        example i's gradient are ``b_i^T a_i``; rows no block covers are zero. True if consumed."""
        return False

    def sum_form(self, name: str, sums: Sequence[tuple[int, Tensor]]) -> bool:
        """Parameter ``name`` (1-D) as ``(offset, s [B, p])`` parts: entries ``offset : offset + p`` of example
        i's gradient are ``s_i``; entries no part covers are zero. True if consumed."""
        return False

    def rows_form(self, name: str, idx: Tensor, b: Tensor, rows: int) -> bool:
        """Parameter ``name`` (2-D, ``[rows, d]``) looked up by rows: example i's gradient is
        ``sum_t e_{idx[i, t]} b[i, t]^T`` for ``idx: [B, T]`` (int64) and ``b: [B, T, d]`` (an embedding). True
        if consumed."""
        return False


class Renamed(Sink):
    """A sink seen through other names: a rule's local parameter names mapped to the sink's."""

    def __init__(self, sink: Sink, names: dict[str, str]) -> None:
        self.sink, self.names = sink, names

    def reset(self) -> None:
        self.sink.reset()

    def grads(self, name: str, g: Tensor, rows: slice | None = None) -> None:
        self.sink.grads(self.names[name], g, rows)

    def takes_rows(self, name: str) -> bool:
        return self.sink.takes_rows(self.names[name])

    def weight_form(self, name: str, blocks: Sequence[Any]) -> bool:
        return self.sink.weight_form(self.names[name], blocks)

    def sum_form(self, name: str, sums: Sequence[tuple[int, Tensor]]) -> bool:
        return self.sink.sum_form(self.names[name], sums)

    def rows_form(self, name: str, idx: Tensor, b: Tensor, rows: int) -> bool:
        return self.sink.rows_form(self.names[name], idx, b, rows)
