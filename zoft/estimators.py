"""Estimators: turn the losses at θ ± ε·r·u into per-block coefficients of the direction u.

For a direction with per-block radii r_b, the model is evaluated at θ_b ± ε·r_b·u_b and the
estimator returns c_b such that the gradient estimate of block b is ĝ_b = c_b · u_b.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zoft.errors import ZoftError


@dataclass
class SPSAConfig:
    eps: float = field(default=1e-3, metadata={"help": "perturbation scale ε"})

    def __post_init__(self):
        if not self.eps > 0:
            raise ZoftError(f"eps must be > 0, got {self.eps}")


class TwoPoint:
    """Two-point SPSA (MeZO): g = (L(θ + εu) − L(θ − εu)) / 2ε, ĝ = g·u; bias (ε²/2)∇ΔL."""

    name = "spsa"

    def __init__(self, cfg: SPSAConfig):
        self.cfg = cfg
        self.eps = cfg.eps

    def radii(self, seed: int, num_blocks: int) -> list[float]:
        return [1.0] * num_blocks

    def coefficients(self, loss_plus: float, loss_minus: float, radii: list[float]) -> list[float]:
        g = (loss_plus - loss_minus) / (2 * self.eps)
        return [g] * len(radii)


ESTIMATORS = {"spsa": (SPSAConfig, TwoPoint)}
