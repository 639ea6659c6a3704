"""Clipping factors for DP-SGD, computed from per-sample squared norms.

``flat``: c_i = min(1, C / ||g_i||), and c_i = 1 where ||g_i|| = 0.
``per_layer``: parameters fall into groups (one per module that owns parameters); group k is clipped to its
    own bound C_k with the flat rule applied to that group's norm. A scalar C gives each of the G groups
    C / sqrt(G), so the whole clipped gradient still has norm <= C.
``automatic`` (normalisation, Bu et al. 2022, "Automatic clipping"): c_i = C / (||g_i|| + gamma).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import PsgradError

MODES = ("flat", "per_layer", "automatic")


@dataclass(frozen=True)
class ClipSpec:
    mode: str
    max_norm: float | Mapping[str, float]
    gamma: float = 0.01
    groups: Mapping[str, str] = field(default_factory=dict)  # parameter name -> group name
    #: the bound on the norm of a whole clipped gradient: C, or sqrt(sum C_k^2) over per-layer bounds
    bound: float = math.nan
    #: bool [B] or None: rows whose factor is set to 0 where False (the padding of a captured call, NOTE [captured
    #: calls] in psgrad.api.graphed); ``where``, not a product, so that a non-finite norm there cannot leak
    valid: Tensor | None = field(default=None, compare=False)

    @classmethod
    def make(cls, mode: str, max_norm, gamma: float, groups: Mapping[str, str], where: str) -> ClipSpec:
        """Validate the clipping settings (every public entry point uses this) and build the spec; ``groups``
        maps each parameter name to its group (see :func:`psgrad.parameter_groups`)."""
        if mode not in MODES:
            raise PsgradError(f"{where}: unknown clipping {mode!r}; valid: {', '.join(MODES)}")
        group_names = sorted(set(groups.values()))
        if isinstance(max_norm, Mapping):
            if mode != "per_layer":
                raise PsgradError(f"{where}: a dict of bounds needs clipping='per_layer'")
            missing = [g for g in group_names if g not in max_norm]
            unknown = [g for g in max_norm if g not in group_names]
            if missing or unknown:
                raise PsgradError(
                    f"{where}: per_layer bounds must name every group exactly; missing {missing}, unknown {unknown}; "
                    f"the groups are {group_names}"
                )
            bad = {g: v for g, v in max_norm.items() if not _positive(v)}
            if bad:
                raise PsgradError(f"{where}: max_norm bounds must be positive finite numbers, got {bad}")
            max_norm = {g: float(v) for g, v in max_norm.items()}
        elif not _positive(max_norm):
            raise PsgradError(f"{where}: max_norm must be a positive finite number (the clipping bound C), got {max_norm!r}")
        if mode == "automatic" and not (_positive(gamma)):
            raise PsgradError(f"{where}: gamma must be positive for automatic clipping, got {gamma!r}")
        if isinstance(max_norm, Mapping):
            bound = math.sqrt(sum(v * v for v in max_norm.values()))
        else:
            bound = float(max_norm)
            if mode == "per_layer":
                scalar = bound / math.sqrt(len(group_names))
                max_norm = {g: scalar for g in group_names}
        return cls(mode, max_norm if isinstance(max_norm, Mapping) else bound, gamma, dict(groups), bound)

    def total_norm(self, sq_norms: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(sq_norms.values())).double().sum(0).sqrt()

    def factors(self, sq_norms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The clipping factor [B] for each parameter name (equal within a group)."""
        if self.mode == "per_layer":
            group_sq: dict[str, Tensor] = {}
            for name, s in sq_norms.items():
                g = self.groups[name]
                group_sq[g] = group_sq[g] + s.double() if g in group_sq else s.double()
            per_group = {g: self._masked(flat_factors(s.sqrt(), float(self.max_norm[g])))
                         for g, s in group_sq.items()}
            return {name: per_group[self.groups[name]] for name in sq_norms}
        norm = self.total_norm(sq_norms)
        if self.mode == "flat":
            c = flat_factors(norm, float(self.max_norm))
        else:
            c = float(self.max_norm) / (norm + self.gamma)
        return dict.fromkeys(sq_norms, self._masked(c))

    def _masked(self, c: Tensor) -> Tensor:
        return c if self.valid is None else torch.where(self.valid, c, torch.zeros((), dtype=c.dtype, device=c.device))


def _positive(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def flat_factors(norm: Tensor, bound: float) -> Tensor:
    """``min(1, bound / norm)``, and 1 where the norm is 0."""
    return torch.where(norm > 0, (bound / norm).clamp(max=1.0), torch.ones_like(norm))
