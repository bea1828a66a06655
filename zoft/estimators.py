"""Estimators: turn the losses at θ ± ε·r·u into per-block coefficients of the direction u.

For a direction with per-block radii r_b, the model is evaluated at θ_b ± ε·r_b·u_b and the
estimator returns c_b such that the gradient estimate of block b is ĝ_b = c_b · u_b.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoft.errors import ZoftError
from zoft.rng import derive

_RADIUS_STREAM = 0x7261  # separates the radius draws from the direction draws of a seed


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

    def radii(self, seed: int, num_blocks: int, step: int) -> list[float]:
        return [1.0] * num_blocks

    def coefficients(self, loss_plus: float, loss_minus: float, radii: list[float], step: int) -> list[float]:
        g = (loss_plus - loss_minus) / (2 * self.eps)
        return [g] * len(radii)


KERNELS = {
    # K(r) = Σ_{m<=order} p_m'(0) p_m(r), p_m orthonormal Legendre under U[-1, 1]:
    # E[r K] = 1 and E[r^j K] = 0 for the other j <= order, which cancels the bias up to ε^order.
    2: lambda r: 3 * r,
    4: lambda r: 15 * r / 4 * (5 - 7 * r**2),
    6: lambda r: 105 * r / 64 * (99 * r**4 - 126 * r**2 + 35),  # 105/64: 195/64 gives E[rK] = 13/7
}
R_MODES = ("direction", "block")


@dataclass
class KernelConfig:
    eps: float = field(default=1e-3, metadata={"help": "perturbation scale ε"})
    order: int = field(default=4, metadata={"help": "kernel order: 2 (3r), 4 or 6"})
    r_mode: str = field(default="direction", metadata={
        "help": "direction: one r per direction (cancels the ε² bias); block: one r per block"
                " (the authors' code; leaves the cross-block part of the bias)"})
    radius: float = field(default=1.0, metadata={"help": "d_0: r ~ U[-d, d]"})
    shrink_steps: int = field(default=0, metadata={
        "help": "0: constant d; T > 0: d_t = max(d_0 - t/T, min_radius)"})
    min_radius: float = 1e-4

    def __post_init__(self):
        if not self.eps > 0:
            raise ZoftError(f"eps must be > 0, got {self.eps}")
        if self.order not in KERNELS:
            raise ZoftError(f"kernel order must be 2, 4 or 6, got {self.order}")
        if self.r_mode not in R_MODES:
            raise ZoftError(f"r_mode must be one of {R_MODES}, got {self.r_mode!r}")
        if not 0 < self.min_radius <= self.radius:
            raise ZoftError(f"need 0 < min_radius <= radius, got {self.min_radius}, {self.radius}")
        if self.shrink_steps < 0:
            raise ZoftError(f"shrink_steps must be >= 0, got {self.shrink_steps}")


class Kernel:
    """KerZOO: perturb along ε r u with r ~ U[-d, d] and weight the two-point estimate by the
    rescaled kernel K_d(r) = K(r/d)/d, so E[r K_d] = 1 and E[r³ K_d] = 0 at every d:
    ĝ = (L(θ + ε r u) − L(θ − ε r u)) / 2ε · K_d(r) · u, bias O(ε^4) (order 4) instead of O(ε²).
    The price is variance: E[r² K²] is 9/5, 25/4 and about 13.25 for orders 2, 4 and 6."""

    name = "kernel"

    def __init__(self, cfg: KernelConfig):
        self.cfg = cfg
        self.eps = cfg.eps
        self.kernel = KERNELS[cfg.order]

    def radius(self, step: int) -> float:
        c = self.cfg
        return c.radius if c.shrink_steps == 0 else max(c.radius - step / c.shrink_steps, c.min_radius)

    def radii(self, seed: int, num_blocks: int, step: int) -> list[float]:
        d = self.radius(step)
        gen = torch.Generator().manual_seed(derive(seed, _RADIUS_STREAM))
        count = 1 if self.cfg.r_mode == "direction" else num_blocks
        r = ((torch.rand(count, generator=gen, dtype=torch.float64) * 2 - 1) * d).tolist()
        return r * num_blocks if count == 1 else r

    def coefficients(self, loss_plus: float, loss_minus: float, radii: list[float], step: int) -> list[float]:
        g = (loss_plus - loss_minus) / (2 * self.eps)
        d = self.radius(step)
        return [g * self.kernel(r / d) / d for r in radii]


ESTIMATORS = {"spsa": (SPSAConfig, TwoPoint), "kernel": (KernelConfig, Kernel)}
