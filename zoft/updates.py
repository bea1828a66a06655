"""Updates: how per-block gradient estimates move the weights.

An update turns the step's estimates ĝ (as coefficients of seeded directions) into the terms
it applies: ``AppliedStep`` lists (seed, per-block scale) pairs plus a decay, and is all that
the trajectory records, so a replay re-applies exactly what the update emitted. An update's
state is explicit (``init``); ZO-SGD's holds only the anchor of iterate averaging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoft.errors import ZoftError
from zoft.registry import register

SCHEDULES = ("constant", "linear")


@dataclass
class AppliedStep:
    """What one step did to the weights: θ ← decay·θ, then θ_b += scales[j, b]·z_b(seeds[j])."""

    seeds: list[int]
    scales: torch.Tensor  # [terms, num_blocks], float64
    decay: torch.Tensor | None = None  # [num_blocks] multipliers applied first
    mix: float | None = None  # iterate averaging: 1/β_t (see ZOOptimizer._apply)


@dataclass
class SGDState:
    anchor: list[torch.Tensor] | None = None  # c of iterate averaging; rebuilt by replay, never saved


@dataclass
class SGDConfig:
    lr: float = field(default=1e-5, metadata={"help": "learning rate η"})
    weight_decay: float = field(default=0.0, metadata={"help": "λ; never applied to biases/norms"})
    schedule: str = field(default="constant", metadata={"help": "constant | linear (to 0 at the last step)"})
    total_steps: int = field(default=0, metadata={"help": "horizon of the linear schedule (zoft finetune: --steps)"})
    average: bool = field(default=False, metadata={
        "help": "iterate averaging as in KerZOO's code (β_t = 1 + t/6); costs a copy of the trainable weights"})
    clip_norm: float = field(default=0.0, metadata={
        "help": "0: off; C: scale each block's estimate to norm <= C (KerZOO's code: 4e5); one extra read pass"})

    def __post_init__(self):
        if not 0 < self.lr < float("inf"):
            raise ZoftError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ZoftError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ZoftError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.average and self.weight_decay:
            raise ZoftError("average and weight_decay cannot be combined")
        if self.clip_norm < 0:
            raise ZoftError(f"clip_norm must be >= 0, got {self.clip_norm}")
        if self.schedule == "linear" and self.total_steps < 1:
            raise ZoftError("the linear schedule needs total_steps >= 1")


@register("update", "sgd", SGDConfig)
class SGD:
    """θ_b ← θ_b − η_t (ĝ_b + λ θ_b), λ = 0 for biases and norm weights."""

    name = "sgd"

    def __init__(self, cfg: SGDConfig):
        self.cfg = cfg

    def init(self, blocks) -> SGDState:
        return SGDState([b.param.detach().clone() for b in blocks] if self.cfg.average else None)

    def lr(self, step: int) -> float:
        if self.cfg.schedule == "linear":
            return self.cfg.lr * max(0.0, 1.0 - step / self.cfg.total_steps)
        return self.cfg.lr

    def mix(self, step: int) -> float | None:
        """1/β_t of iterate averaging (β_t = 1 + t/6), or None without averaging."""
        return 1.0 / (1.0 + step / 6.0) if self.cfg.average else None

    def clipped(self, grad: torch.Tensor, block_norms) -> torch.Tensor:
        """grad [n, blocks] with each block's column scaled by min(1, C/‖ĝ_b‖): a block whose
        estimate is shorter than C is left exactly as it is. ``block_norms(grad)`` costs a read
        of the step's directions, so it is only called when clipping is on."""
        c = self.cfg.clip_norm
        if c == 0.0:
            return grad
        factors = [min(1.0, c / n) if n > 0 else 1.0 for n in block_norms(grad)]
        return grad * torch.tensor(factors, dtype=grad.dtype)

    def emit(self, seeds: list[int], grad: torch.Tensor, step: int, blocks, lr: float | None = None) -> AppliedStep:
        rate = self.lr(step) if lr is None else lr
        decay = None
        if self.cfg.weight_decay:
            keep = 1.0 - rate * self.cfg.weight_decay
            decay = torch.tensor([1.0 if b.no_decay else keep for b in blocks], dtype=torch.float64)
        return AppliedStep(list(seeds), -rate * grad, decay, self.mix(step))

    def step(self, state, seeds: list[int], grad: torch.Tensor, step: int, blocks, block_norms, lr=None):
        """(AppliedStep, new state) from the step's estimates ĝ_b = Σ_i grad[i, b] z_b(seeds[i]);
        ``lr``, when given (a torch scheduler's), replaces the update's own schedule."""
        return self.emit(seeds, self.clipped(grad, block_norms), step, blocks, lr), state
