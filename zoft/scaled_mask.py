"""Per-block scales on a magnitude mask: σ_b from a block_scales file (``zoft meta-allocate
--fraction F --keep K`` computes it on the masked weights) times the mask's u_b = z_b ⊙ m_b.
The two levers the ceiling study ranks highest at 135M, together (bench/results/ceiling)."""

from __future__ import annotations

from dataclasses import dataclass

from zoft.block_scales import BlockScalesConfig, ScaleSchedule
from zoft.magnitude_mask import MagnitudeMask, MagnitudeMaskConfig
from zoft.registry import register


@dataclass
class ScaledMaskConfig(MagnitudeMaskConfig, BlockScalesConfig):
    def __post_init__(self):
        MagnitudeMaskConfig.__post_init__(self)
        BlockScalesConfig.__post_init__(self)


@register("perturbation", "scaled_mask", ScaledMaskConfig)
class ScaledMask(ScaleSchedule, MagnitudeMask):
    name = "scaled_mask"

    def init(self, blocks):
        self.read_schedule(blocks)
        return super().init(blocks)
