"""Capture each unit's inputs and output gradients for one forward and one backward.

Three parts, each with its NOTE:
- :mod:`~psgrad.capture.probe`: small forwards without autograd that return a :class:`~psgrad.capture.probe.Layout`,
  where every captured tensor holds the batch (NOTE [where is the batch], NOTE [outputs broadcast from a batch
  of one]);
- :mod:`~psgrad.capture.record`: the real forward, which builds one :class:`~psgrad.rules.call.Call` per call of
  each unit, and the backward, which hands each call to the engine as soon as its output gradients are in
  (NOTE [why capture output gradients with tensor hooks]);
- :mod:`~psgrad.capture.uses`: the check that every use of a parameter lies inside its unit's calls
  (NOTE [parameters used outside their module]);
- :mod:`~psgrad.capture.merged`: batches merged into rows, told apart by the probe's values (NOTE [batches
  merged into rows]);
- :mod:`~psgrad.capture.outputs`: the outputs handed on, so that each hook sees the uses after the call only (NOTE
  [outputs the module itself consumes], NOTE [outputs that are views, modified in place]);
- :mod:`~psgrad.capture.state`: objects a call was given, kept as they were when it began, for the generic rule's
  re-runs (NOTE [state passed to a call]);
- :mod:`~psgrad.capture.layouts`: probe layouts kept for later calls on inputs of the same kind (NOTE [reusing the
  probe's layout]);
- :mod:`~psgrad.capture.held`: process-wide settings (``F.linear`` for NOTE [linear calls inside a layer], the
  MHA fast path for the probe) changed while any caller in any thread needs them.

:class:`Capture` is a context manager over the three; leaving it removes every hook and drops every captured
tensor, also on error, so nothing stays on the user's modules or parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..batch import Batch
from ..errors import UnsupportedModelError
from ..rules.precision import uncached
from . import layouts, merged
from .outputs import COPY_OUTPUTS, NeedsCopies
from .probe import Layout, probe
from .record import OnReady, Recorder
from .unit import Unit


class Capture:
    """``with Capture(units, B) as c: c.probe(model, batch); out = c.forward(model, batch); c.backward(loss, on_ready)``."""

    def __init__(self, units: Sequence[Unit], batch_size: int):
        self.units = list(units)
        self.batch_size = batch_size
        self._recorder: Recorder | None = None
        self._layout: Layout | None = None
        self._key: tuple | None = None
        self._reused = False

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._recorder is not None:
            self._recorder.release()
            self._recorder = None

    def probe(self, model: nn.Module, batch: Batch, reuse: bool = True) -> Layout:
        """Locate the batch in every captured tensor (see :func:`~psgrad.capture.probe.probe`), or take the layout
        an earlier call found for this model on inputs of this kind (NOTE [reusing the probe's layout])."""
        self._key = layouts.key(model, batch, self.units)
        layout = layouts.find(model, self._key) if reuse else None
        self._reused = layout is not None
        if layout is None:
            with uncached():  # NOTE [mixed precision]
                layout = probe(model, batch, self.units, self.batch_size)
            layouts.keep(model, self._key, layout)
        self._layout = layout
        self._recorder = Recorder(self.units, layout, self.batch_size)
        return layout

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """The model's outputs on the whole batch, every unit's calls recorded (after :meth:`probe`). Where a unit
        merges the batch into rows and the probe kept no values for it, the probe runs again keeping them, and
        so does the forward (once; NOTE [batches merged into rows])."""
        assert self._recorder is not None, "Capture.probe must run before Capture.forward"
        for _ in range(4):  # a kept layout replaced, values kept, view outputs copied: each at most once
            try:
                with uncached():  # NOTE [mixed precision]
                    output = self._recorder.forward(model, batch)
                if self._reused and not layouts.matches(self._layout, self.units):  # type: ignore[arg-type]
                    raise UnsupportedModelError("the calls differ from the kept layout's")
                return output
            except merged.NeedsValues as exc:
                merged.KEEP_VALUES.update(exc.modules)
            except NeedsCopies as exc:  # NOTE [outputs that are views, modified in place]
                COPY_OUTPUTS.update(exc.modules)
            except UnsupportedModelError:  # NOTE [reusing the probe's layout]: a fresh probe decides
                if not self._reused:
                    raise
                layouts.drop(model, self._key)
            self._recorder.release()
            self.probe(model, batch, reuse=False)
        raise AssertionError("the forward asked to be run again more often than it can")

    def backward(
        self, loss: Tensor, on_ready: OnReady | None = None, also: Sequence[Tensor] = ()
    ) -> list[Tensor | None]:
        """Backward of ``loss``, calling ``on_ready(unit, call)`` once per recorded call; returns the gradients of
        ``loss`` with respect to ``also`` from the same backward."""
        assert self._recorder is not None, "Capture.forward must run before Capture.backward"
        return self._recorder.backward(loss, on_ready, also)


__all__ = ["Capture", "Layout", "OnReady", "Unit", "probe"]
