"""Per-block scales on a magnitude mask: σ_b from a block_scales file (``zoft meta-allocate
--fraction F --keep K`` computes it on the masked weights) times the mask's u_b = z_b ⊙ m_b.
The two levers the ceiling study ranks highest at 135M, together (bench/results/ceiling)."""

from __future__ import annotations

from dataclasses import dataclass, field

from zoft.block_scales import read_block_scales
from zoft.errors import ZoftError
from zoft.magnitude_mask import MagnitudeMask, MagnitudeMaskConfig
from zoft.registry import register


@dataclass
class ScaledMaskConfig(MagnitudeMaskConfig):
    scales_file: str = field(default="", metadata={"help": "block_scales: safetensors file with sigma [num_blocks]"})
    batch_size: int = 16  # the fine-tune's, for the effective dimension of an embedding

    def __post_init__(self):
        super().__post_init__()
        if not self.scales_file:
            raise ZoftError("the scaled_mask perturbation needs --scales-file")


@register("perturbation", "scaled_mask", ScaledMaskConfig)
class ScaledMask(MagnitudeMask):
    name = "scaled_mask"

    def init(self, blocks):
        self.sigma = read_block_scales(self.cfg.scales_file, blocks, self.cfg.batch_size)
        return super().init(blocks)

    def scales(self, blocks, state, **context):
        return self.sigma, state
