"""ZO-SGD with momentum on seeds: m_t = Σ_{k<K} β^k ĝ_{t−k}, θ ← θ − η_t m_t.

A past estimate is a few seeds and scalars, so the momentum buffer is the last K of them, not a
parameter-sized tensor: each step re-emits them with weights β^k (K update passes a step
instead of one). Truncating at K drops the weight β^K and beyond.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoft.errors import ZoftError
from zoft.registry import register
from zoft.updates import SGD, SGDConfig


@dataclass
class MomentumConfig(SGDConfig):
    beta: float = field(default=0.9, metadata={"help": "momentum: weight β of the previous estimate"})
    window: int = field(default=8, metadata={"help": "momentum: past estimates kept (update passes a step)"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.beta < 1:
            raise ZoftError(f"beta must be in [0, 1), got {self.beta}")
        if self.window < 1:
            raise ZoftError(f"window must be >= 1, got {self.window}")
        if self.average:
            raise ZoftError("momentum and iterate averaging cannot be combined")


@dataclass
class MomentumState:
    seeds: torch.Tensor  # [k, n] int64, newest first
    grads: torch.Tensor  # [k, n, num_blocks] float64: the estimates of those steps, clipped


@register("update", "momentum", MomentumConfig)
class Momentum(SGD):
    name = "momentum"

    def init(self, blocks) -> MomentumState:
        return MomentumState(torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, 0, len(blocks), dtype=torch.float64))

    def step(self, state: MomentumState, seeds, grad, step, blocks, block_norms, lr=None):
        grad = self.clipped(grad, block_norms)
        keep = self.cfg.window - 1
        past_seeds, past_grads = torch.tensor([seeds], dtype=torch.int64), grad[None]
        if len(state.seeds):
            if state.seeds.shape[1] != len(seeds):
                raise ZoftError("momentum needs the same number of directions at every step")
            past_seeds = torch.cat([past_seeds, state.seeds[:keep]])
            past_grads = torch.cat([past_grads, state.grads[:keep]])
        weights = self.cfg.beta ** torch.arange(len(past_grads), dtype=torch.float64)
        combined = (weights[:, None, None] * past_grads).flatten(0, 1)
        applied = self.emit(past_seeds.flatten().tolist(), combined, step, blocks, lr)
        return applied, MomentumState(past_seeds, past_grads)
