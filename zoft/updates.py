"""Updates: how a gradient estimate moves the weights (ZO-SGD, LR schedule, weight decay)."""

from __future__ import annotations

from dataclasses import dataclass, field

from zoft.errors import ZoftError

SCHEDULES = ("constant", "linear")


@dataclass
class SGDConfig:
    lr: float = field(default=1e-5, metadata={"help": "learning rate η"})
    weight_decay: float = field(default=0.0, metadata={"help": "λ; never applied to biases/norms"})
    schedule: str = field(default="constant", metadata={"help": "constant | linear (to 0)"})
    total_steps: int = field(default=0, metadata={"help": "horizon of the linear schedule"})
    average: bool = field(default=False, metadata={
        "help": "iterate averaging (KerZOO's code): gradients at x_t = y_t + (c_t − y_t)/β_t,"
                " β_t = 1 + t/6; costs one copy of the trainable weights"})
    clip_norm: float = field(default=0.0, metadata={
        "help": "0: off; C > 0: scale each block's estimate ĝ_b by min(1, C/‖ĝ_b‖) (KerZOO's"
                " code uses 4e5); costs one extra read of the step's directions"})

    def __post_init__(self):
        if not self.lr > 0:
            raise ZoftError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ZoftError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ZoftError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.average and self.weight_decay:
            raise ZoftError("average and weight_decay cannot be combined")
        if self.clip_norm < 0:
            raise ZoftError(f"clip_norm must be >= 0, got {self.clip_norm}")
        if self.schedule == "linear" and self.total_steps < 1:
            raise ZoftError("the linear schedule needs total_steps >= 1")


class SGD:
    """θ_b ← θ_b − η_t (ĝ_b + λ θ_b), λ = 0 for biases and norm weights."""

    name = "sgd"

    def __init__(self, cfg: SGDConfig):
        self.cfg = cfg

    def lr(self, step: int) -> float:
        if self.cfg.schedule == "linear":
            return self.cfg.lr * max(0.0, 1.0 - step / self.cfg.total_steps)
        return self.cfg.lr

    def mix(self, step: int) -> float | None:
        """1/β_t of iterate averaging (β_t = 1 + t/6), or None without averaging."""
        return 1.0 / (1.0 + step / 6.0) if self.cfg.average else None

    def clip_factors(self, block_norms) -> list[float] | None:
        """Per-block multipliers min(1, C/‖ĝ_b‖), or None when clipping is off (``block_norms``
        is only called then, since computing the norms costs a pass)."""
        c = self.cfg.clip_norm
        if c == 0.0:
            return None
        return [min(1.0, c / n) if n > 0 else 1.0 for n in block_norms()]

    def decay_factors(self, step: int, blocks) -> list[float] | None:
        """Multipliers applied to θ before the step's directions are added; None if no decay."""
        if self.cfg.weight_decay == 0.0:
            return None
        keep = 1.0 - self.lr(step) * self.cfg.weight_decay
        return [1.0 if b.no_decay else keep for b in blocks]


UPDATES = {"sgd": (SGDConfig, SGD)}
