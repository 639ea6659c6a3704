"""Opacus as a peer: its per-sample gradients (the ``opacus`` engine), its DP step (the bench's ``opacus-dp`` rows)
and its PrivacyEngine (``psgrad train --peer opacus``), each faithful to what Opacus computes, right or wrong.

Opacus records activations only for modules in training mode. The modules it hooks are switched to training
mode for the call (:func:`train_hooked_modules`; only their own flag, not their children's), except those whose
computation depends on the mode (BatchNorm and InstanceNorm with running statistics, attention and recurrent
layers with dropout); every other module (Dropout, the modules Opacus does not hook) keeps its mode, and the
caller restores them all.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..batch import Batch, LossFn, as_args_kwargs, check_losses
from ..errors import require

EXTRA = "peers"


def opacus(purpose: str) -> Any:
    """The ``opacus`` package, or MissingDependencyError with the install hint, naming ``purpose``."""
    return require("opacus", EXTRA, purpose)


def missing() -> str | None:
    """None where Opacus can be imported, else what to install."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        return f"needs opacus: pip install 'psgrad[{EXTRA}]'"
    return None


def _mode_dependent(m: nn.Module) -> bool:
    """Whether ``m``'s own computation differs between training and eval mode (as far as psgrad knows)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
        return True
    return isinstance(m, (nn.MultiheadAttention, nn.RNNBase, nn.Dropout)) and getattr(m, "dropout", getattr(m, "p", 0)) > 0


def train_hooked_modules(modules: Any) -> None:
    """Set ``training`` on each module Opacus hooks (not on its children), unless its computation depends on the
    mode; the caller restores the modes."""
    for m in modules:
        if not _mode_dependent(m):
            m.training = True


def per_sample_grads(
    model: nn.Module, loss_fn: LossFn, batch: Batch, params: Mapping[str, nn.Parameter], strict: bool = True
) -> tuple[dict[str, Tensor], Tensor]:
    """Opacus's ``GradSampleModule`` per-sample gradients (zeros for parameters it gives none) and the losses;
    every hook and attribute it adds is removed afterwards (the caller restores the modes)."""
    grad_sample = opacus("the opacus engine").grad_sample
    gsm = grad_sample.GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=strict)
    try:
        hooked = getattr(gsm, "iterate_submodules", None)
        train_hooked_modules(hooked(model) if hooked else
                             (m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))))
        args, kwargs = as_args_kwargs(batch.inputs)
        losses = check_losses(loss_fn(gsm(*args, **kwargs), batch.targets), batch.size, "opacus engine")
        with warnings.catch_warnings():  # Opacus's own full backward hooks warn when inputs need no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        grads = {}
        for name, p in params.items():
            sample = getattr(p, "grad_sample", None)
            grads[name] = torch.zeros((batch.size, *p.shape), dtype=p.dtype, device=p.device) if sample is None else sample
        return grads, losses.detach()
    finally:
        gsm._close()


class Criterion:
    """A per-sample loss as an Opacus criterion: ``reduction`` is ``"none"``, ``"sum"`` or ``"mean"``."""

    def __init__(self, loss_fn: LossFn, reduction: str = "sum") -> None:
        self.loss_fn = loss_fn
        self.reduction = reduction

    def __call__(self, outputs: Any, targets: Tensor | None) -> Tensor:
        losses = self.loss_fn(outputs, targets)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()


def dp_step(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, max_norm: float, mode: str) -> Callable:
    """Opacus's DP step with noise 0, as a callable: forward, backward and clipping (the optimizer's pre-step)
    in its ``hooks`` or ``ghost`` mode, returning the clipped sums ``{name: .grad}``. The model runs in training
    mode (Opacus records activations only there); ``step.close()`` removes Opacus's hooks and attributes and
    restores the modes."""
    engine_cls = opacus("the opacus-dp rows").PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    modes = {m: m.training for m in model.modules()}
    model.train()
    criterion = Criterion(loss_fn)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=len(inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = engine_cls().make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=0.0,
            max_grad_norm=max_norm, loss_reduction="sum", poisson_sampling=False, grad_sample_mode=mode,
        )
    if mode == "ghost":
        wrapped, dp_optimizer, dp_loss, _ = made
    else:
        wrapped, dp_optimizer, _ = made
        dp_loss = criterion
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def step() -> dict[str, Tensor]:
        dp_optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_loss(wrapped(inputs), targets).backward()
            dp_optimizer.pre_step()
        return {n: p.grad for n, p in named.items()}

    def close() -> None:
        wrapped._close()
        for m, training in modes.items():
            m.train(training)

    step.close = close  # type: ignore[attr-defined]
    return step


def private_training(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, noise_multiplier: float, max_norm: float,
    expected_batch_size: float, secure: bool, generator: torch.Generator | None,
) -> tuple[nn.Module, Any, Any]:
    """Opacus's PrivacyEngine on a loader that already samples (Poisson): the wrapped model, DP optimizer and
    loader, averaging by ``expected_batch_size`` exactly (make_private assumes a sample rate of 1 / len(loader)
    and truncates the expected batch size to an int)."""
    engine_cls = opacus("psgrad train --peer opacus").PrivacyEngine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's advice on secure mode, printed on every construction
        wrapped, dp_optimizer, loader = engine_cls(secure_mode=secure).make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_norm, poisson_sampling=False, noise_generator=generator,
        )
    dp_optimizer.expected_batch_size = expected_batch_size
    return wrapped, dp_optimizer, loader
