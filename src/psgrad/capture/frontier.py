"""Which captured gradient edges the capture's backward asks autograd for.

NOTE [the backward's inputs]
The capture's backward is ``torch.autograd.grad(loss, inputs=edges)`` over the gradient edges of the captured
outputs: autograd then runs only the nodes on a path from the loss to one of them, so that the model's parameter
gradients (a convolution's weight gradient, an ``AccumulateGrad``) are never computed; the rules make the
per-sample ones from the captured tensors, whose gradients reach the capture's tensor hooks. But autograd keeps
every gradient it is asked for until the backward ends, and those are the output gradients of every captured call,
about the size of the activations: on ResNet-9 at batch 100 the resident memory rose by some 250 MB over the
backward where a plain one frees as it goes.

A node that is upstream (in the backward) of another captured edge's node lies on a path to that edge, so
autograd runs it, its input gradients are complete, and its tensor hooks fire, without asking for its own edge.
So the backward asks only for the edges whose node reaches no other captured edge's node through the graph's
``next_functions`` (one edge per such node; the others of the same node are met by its hooks all the same): in a
chain of layers, the first layer's output alone. Every captured node either is one of those or reaches one, so
the nodes run, and the gradients that reach the hooks, are those of asking for every edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def frontier(edges: Sequence[Any]) -> list[Any]:
    """The edges among ``edges`` (``torch.autograd.graph.GradientEdge``) whose node reaches no other edge's node
    (NOTE [the backward's inputs]), one per node, in their order."""
    captured = {id(e.node) for e in edges}
    clear: dict[int, Any] = {}  # nodes known to reach no captured node (held, so that their ids stay theirs)

    def reaches(start: Any) -> bool:
        """Whether a captured node lies strictly below ``start``."""
        stack, seen = [start], {}
        while stack:
            for child, _ in stack.pop().next_functions:
                if child is None:
                    continue
                if id(child) in captured:
                    return True
                if id(child) in clear or id(child) in seen:
                    continue
                seen[id(child)] = child
                stack.append(child)
        clear.update(seen)  # the whole walk met none: none of it reaches one
        return False

    keep, chosen = [], set()
    for e in edges:
        if id(e.node) not in chosen and not reaches(e.node):
            chosen.add(id(e.node))
            keep.append(e)
    return keep
