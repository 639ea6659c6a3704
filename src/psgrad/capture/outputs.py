"""What the recording pass hands on as a call's outputs, so that each output's hook receives the gradient of the uses
after the call, and only those.

NOTE [outputs the module itself consumes]
A hook on an output tensor receives the gradient of every use of that tensor, and a module may use a tensor it
returns: an attention layer returns its attention weights and multiplies them with the values itself. Its output
gradient would then hold the module's own use on top of the uses after it, and a rule fed both (the generic rule's
vjp of the call with every output's gradient) counts that use twice (LongT5's relative position bias came out
exactly twice the truth); so may a module that returns one tensor twice (DeBERTa's encoder, its last hidden state
also among all of them: each hook gets the whole gradient). So each output that a node made during the call
consumes, and every occurrence of a repeated output, is handed on as an alias (``view_as``): the uses after the call
see the alias, whose gradient the hook and the edge take, and the module's own use keeps the original. Found by
walking back from the outputs through the nodes made during the call (only for calls with two or more outputs: a
single output consumed inside would feed nothing the call returns).

NOTE [outputs that are views, modified in place]
A hook on an output keeps receiving the gradient of the value the module produced when an in-place op follows (NOTE
[why capture output gradients with tensor hooks] in :mod:`psgrad.capture.record`), for an output with storage of its
own. A module's output can be a view (``nn.Linear`` on a 3-d input returns a view of a 2-d product), and an in-place
op on a view rewrites the history of its base: the gradient then reaches the layer through the base and never
through the node the hook and the edge were taken on (Longformer's ``q = self.query_global(h); q /= sqrt(d)`` got
all-zero gradients). So the forward notes each output that is a view with its version counter; where one changed by
the end of the forward, the module is remembered (weakly, in ``COPY_OUTPUTS``) and the forward runs again, handing
on a copy of that module's view outputs, a tensor of its own whose in-place ops keep the hook's node in the graph. A
view modified after the forward (by the loss function) is refused.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor, nn

from .uses import graph_edges

#: modules whose view outputs the forward copies (NOTE [outputs that are views, modified in place]); weakly held
COPY_OUTPUTS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class NeedsCopies(Exception):
    """Raised at the end of the recording pass: these modules' view outputs were modified in place."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__(f"{len(modules)} module(s) had view outputs modified in place")
        self.modules = modules


def consumed_inside(outs: list[Any], start: int) -> set[int]:
    """The indices of the outputs that an autograd node made during the call consumes (NOTE [outputs the module
    itself consumes]): found by walking back from every output through the nodes made since ``start``."""
    nodes: dict[tuple[int, int], int] = {}
    found: set[int] = set()
    for j, t in enumerate(outs):
        if isinstance(t, Tensor) and t.grad_fn is not None:
            key = (id(t.grad_fn), t.output_nr)
            if key in nodes:  # the same tensor returned twice (a last hidden state, and again among all of them):
                found.update((nodes[key], j))  # each gets an alias, and neither hook sees the other's uses
            else:
                nodes[key] = j
    if len(nodes) < 2:  # a single output consumed inside would feed nothing the call returns
        return found
    roots = [t.grad_fn for t in outs if isinstance(t, Tensor) and t.grad_fn is not None]
    for _, nxt, nr in graph_edges(roots, lambda node: node._sequence_nr() >= start):
        j = nodes.get((id(nxt), nr))
        if j is not None and not hasattr(nxt, "variable") and nxt._sequence_nr() >= start:
            found.add(j)
    return found
