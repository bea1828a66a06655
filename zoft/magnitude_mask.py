"""Sparse MeZO's perturbation (arXiv 2402.15751): perturb only a block's smallest-magnitude
weights, u_b = z_b ⊙ [|θ_b| ≤ τ_b].

τ_b is the ``fraction`` quantile of |θ_b| at the start (one float per block); the mask itself is
never stored: it is recomputed from the weights chunk by chunk wherever a direction is made,
so it follows the weights as they move. Masked directions are shorter (‖u_b‖² ≈ fraction·d_b);
lr and eps are tuned for it as for any method.
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

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ZoftError(f"fraction must be in (0, 1], got {self.fraction}")


@dataclass
class MaskState:
    thresholds: torch.Tensor  # [num_blocks]: τ_b


@register("perturbation", "magnitude_mask", MagnitudeMaskConfig)
class MagnitudeMask(Isotropic):
    name = "magnitude_mask"

    def init(self, blocks) -> MaskState:
        with torch.no_grad():
            tau = [b.param.detach().abs().flatten().float().kthvalue(max(1, round(self.cfg.fraction * b.numel))).values
                   for b in blocks]
        return MaskState(torch.stack(tau).cpu())

    def shaper(self, state: MaskState):
        tau = state.thresholds.tolist()

        def keep_small(block, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return z * (weights.abs() <= tau[block.index]).to(z.dtype)

        return keep_small
