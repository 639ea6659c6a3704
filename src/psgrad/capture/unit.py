"""The unit of capture: a module whose calls are recorded, and the flattening of its calls' arguments."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedModelError
from ..rules.call import Call


@dataclass(eq=False)
class Unit:
    """A module whose calls are captured; ``params`` (``{result name: parameter}``) are the parameters it
    differentiates, whose every use must lie inside one of its calls (NOTE [parameters used outside their
    module] in :mod:`psgrad.capture.uses`); ``label`` names it in messages."""

    module: nn.Module
    label: str
    params: dict[str, nn.Parameter]
    calls: list[Call] = field(default_factory=list)
    path: str = ""  # in named_modules()
    #: ``{local name: parameter}`` of the module's own parameters that the capture follows through its calls
    #: (NOTE [bare parameters] in :mod:`psgrad.rules.bare`); empty for every other unit
    bare: dict[str, nn.Parameter] = field(default_factory=dict)
    #: ``{local name: weight}`` whose ``F.linear`` calls inside the unit's calls are recorded (the rule's
    #: ``inner_linears``; NOTE [linear calls inside a layer] in :mod:`psgrad.capture.inner`)
    inner: dict[str, nn.Parameter] = field(default_factory=dict)
    #: whether the calls keep their outputs' values (the rule's ``keeps_outputs``; :meth:`Call.output`)
    keep_outputs: bool = False
    #: the dimensions along which the module mixes positions (the rule's ``mixes_dims``); an output whose merged
    #: layout its values cannot tell takes its input's along any other (NOTE [batches merged into rows]); None:
    #: unknown
    mixes_dims: tuple[int, ...] | None = None


class NeedsParent(UnsupportedModelError):
    """A unit's calls cannot be separated by example where the unit is (its output has no batch dimension and
    cannot be expanded, or its parameters are used outside its calls); its parent module may be the unit instead
    (NOTE [hoisting to the parent] in :mod:`psgrad.engines.plan`). Left unhandled, it is a refusal."""

    def __init__(self, message: str, units: list[Unit]):
        super().__init__(message)
        self.units = units


@functools.cache
def tensor_args_spec(n: int) -> Any:
    """The pytree spec of ``(args, {})`` for ``n`` tensor arguments."""
    return tree_flatten((tuple(range(n)), {}))[1]


_LEAF_SPEC = tree_flatten(0)[1]


def flatten_call(args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
    """``tree_flatten((args, kwargs))``, without walking pytree for the common call of tensor arguments only."""
    if not kwargs and all(type(a) is Tensor or type(a) is nn.Parameter for a in args):
        return list(args), tensor_args_spec(len(args))
    return tree_flatten((args, kwargs))


def flatten_output(output: Any) -> tuple[list[Any], Any]:
    """``tree_flatten(output)``, without walking pytree for a single tensor."""
    if type(output) is Tensor:
        return [output], _LEAF_SPEC
    return tree_flatten(output)
