"""Sparse MeZO's perturbation (arXiv 2402.15751): perturb only a block's smallest-magnitude
weights, u_b = z_b ⊙ [|θ_b| ≤ τ_b]; or, with ``keep="largest"``, only its largest, u_b = z_b ⊙
[|θ_b| > τ_b] (at 135M on tweets, bench/ceiling_predict.py predicts the largest to gain and the
smallest to lose per step against isotropic directions).

τ_b is the quantile of |θ_b| at the start (one float per block) that leaves ``fraction`` of the
block perturbed; the mask itself is never stored: it is recomputed from the weights chunk by
chunk wherever a direction is made, so it follows the weights as they move. Masked directions
are shorter (‖u_b‖² ≈ fraction·d_b); lr and eps are tuned for it as for any method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoft.errors import ZoftError
from zoft.perturbations import Isotropic
from zoft.registry import register


@dataclass
class MagnitudeMaskConfig:
    fraction: float = field(default=0.25, metadata={"help": "magnitude mask: share of each block's weights perturbed"})
    keep: str = field(default="smallest", metadata={"help": "magnitude mask: perturb the 'smallest' or 'largest' weights"})

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ZoftError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.keep not in ("smallest", "largest"):
            raise ZoftError(f"keep must be 'smallest' or 'largest', got {self.keep!r}")


@dataclass
class MaskState:
    thresholds: torch.Tensor  # [num_blocks]: τ_b


@register("perturbation", "magnitude_mask", MagnitudeMaskConfig)
class MagnitudeMask(Isotropic):
    name = "magnitude_mask"

    def init(self, blocks) -> MaskState:
        share = self.cfg.fraction if self.cfg.keep == "smallest" else 1 - self.cfg.fraction
        with torch.no_grad():
            tau = [b.param.detach().abs().flatten().float().kthvalue(min(b.numel, max(1, round(share * b.numel)))).values
                   for b in blocks]
        return MaskState(torch.stack(tau).cpu())

    def shaper(self, state: MaskState):
        tau, largest = state.thresholds.tolist(), self.cfg.keep == "largest"

        def keep(block, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            magnitude = weights.abs()
            kept = magnitude > tau[block.index] if largest else magnitude <= tau[block.index]
            return z * kept.to(z.dtype)

        return keep
