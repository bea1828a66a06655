"""Estimators: which points to probe along a direction, and how their losses become per-block
coefficients of it.

A direction u_b = σ_b z_b (the perturbation's part) is probed at the points θ_b + m_b u_b that
``probe`` lists (m = ±ε for SPSA); ``estimate`` turns the losses there into c_b such that the
gradient estimate of block b is ĝ_b = c_b u_b. Estimators hold state (``init``) for methods
that need it; the two here are stateless.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoft.errors import ZoftError
from zoft.registry import register
from zoft.rng import derive

_RADIUS_STREAM = 0x7261  # separates the radius draws from the direction draws of a seed


@dataclass
class Probe:
    points: list[list[float]]  # per point, per block: the multiplier m_b of u_b
    radii: list[float]  # per block: the r_b of the points (1 for SPSA)


@dataclass
class SPSAConfig:
    eps: float = field(default=1e-3, metadata={"help": "perturbation scale ε"})

    def __post_init__(self):
        if not 0 < self.eps < float("inf"):
            raise ZoftError(f"eps must be a finite number > 0, got {self.eps}")


@register("estimator", "spsa", SPSAConfig)
class TwoPoint:
    """Two-point SPSA (MeZO): g = (L(θ + εu) − L(θ − εu)) / 2ε, ĝ = g·u; bias (ε²/2)∇ΔL."""

    name = "spsa"

    def __init__(self, cfg: SPSAConfig):
        self.cfg, self.eps = cfg, cfg.eps

    def init(self, blocks) -> None:
        return None

    def probe(self, seed: int, step: int, num_blocks: int) -> Probe:
        return Probe([[self.eps] * num_blocks, [-self.eps] * num_blocks], [1.0] * num_blocks)

    def estimate(self, state, losses: list[float], probe: Probe, step: int):
        """(coefficients c_b, new state, metrics)."""
        g = (losses[0] - losses[1]) / (2 * self.eps)
        return [g] * len(probe.radii), state, {"proj_grad": g}


KERNELS = {
    # K(r) = Σ_{m<=order} p_m'(0) p_m(r), p_m orthonormal Legendre under U[-1, 1]:
    # E[r K] = 1 and E[r^j K] = 0 for the other j <= order, which cancels the bias up to ε^order.
    2: lambda r: 3 * r,
    4: lambda r: 15 * r / 4 * (5 - 7 * r**2),
    6: lambda r: 105 * r / 64 * (99 * r**4 - 126 * r**2 + 35),  # 105/64: 195/64 gives E[rK] = 13/7
}
R_MODES = ("direction", "block")


@dataclass
class KernelConfig(SPSAConfig):
    kernel_order: int = field(default=4, metadata={"help": "kernel estimator: 2 (3r), 4 or 6"})
    r_mode: str = field(default="direction", metadata={
        "help": "kernel estimator: one r per direction (cancels the ε² bias) or per block (the authors' code)"})
    radius: float = field(default=1.0, metadata={
        "help": "kernel estimator: r ~ U[-d, d], d = radius (kernel rescaled so its moments hold)"})
    shrink_steps: int = field(default=0, metadata={
        "help": "kernel estimator: 0 keeps the radius; T shrinks it by 1/T per step, to min_radius"})
    min_radius: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if self.kernel_order not in KERNELS:
            raise ZoftError(f"kernel order must be 2, 4 or 6, got {self.kernel_order}")
        if self.r_mode not in R_MODES:
            raise ZoftError(f"r_mode must be one of {R_MODES}, got {self.r_mode!r}")
        if not 0 < self.min_radius <= self.radius < float("inf"):
            raise ZoftError(f"need 0 < min_radius <= radius, got {self.min_radius}, {self.radius}")
        if self.shrink_steps < 0:
            raise ZoftError(f"shrink_steps must be >= 0, got {self.shrink_steps}")


@register("estimator", "kernel", KernelConfig)
class Kernel(TwoPoint):
    """KerZOO: perturb along ε r u with r ~ U[-d, d] and weight the two-point estimate by the
    rescaled kernel K_d(r) = K(r/d)/d, so E[r K_d] = 1 and E[r³ K_d] = 0 at every d:
    ĝ = (L(θ + ε r u) − L(θ − ε r u)) / 2ε · K_d(r) · u, bias O(ε^4) (order 4) instead of O(ε²).
    The price is variance: E[r² K²] is 9/5, 25/4 and about 13.25 for orders 2, 4 and 6."""

    name = "kernel"

    def __init__(self, cfg: KernelConfig):
        super().__init__(cfg)
        self.kernel = KERNELS[cfg.kernel_order]

    def radius(self, step: int) -> float:
        c = self.cfg
        return c.radius if c.shrink_steps == 0 else max(c.radius - step / c.shrink_steps, c.min_radius)

    def radii(self, seed: int, num_blocks: int, step: int) -> list[float]:
        d = self.radius(step)
        gen = torch.Generator().manual_seed(derive(seed, _RADIUS_STREAM))
        count = 1 if self.cfg.r_mode == "direction" else num_blocks
        r = ((torch.rand(count, generator=gen, dtype=torch.float64) * 2 - 1) * d).tolist()
        return r * num_blocks if count == 1 else r

    def probe(self, seed: int, step: int, num_blocks: int) -> Probe:
        r = self.radii(seed, num_blocks, step)
        return Probe([[self.eps * x for x in r], [-self.eps * x for x in r]], r)

    def estimate(self, state, losses: list[float], probe: Probe, step: int):
        g = (losses[0] - losses[1]) / (2 * self.eps)
        d = self.radius(step)
        coef = [g * self.kernel(r / d) / d for r in probe.radii]
        return coef, state, {"proj_grad": sum(coef) / len(coef)}
