"""Perturbations: the scale σ_b of each block's direction u_b = σ_b·z_b."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IsotropicConfig:
    pass


class Isotropic:
    """σ_b = 1 for every block: the plain Gaussian (or table) direction of MeZO."""

    name = "isotropic"

    def __init__(self, cfg: IsotropicConfig | None = None):
        self.cfg = cfg or IsotropicConfig()

    def init(self, blocks) -> None:
        return None

    def scales(self, blocks, state, **context) -> tuple[list[float], None]:
        return [1.0] * len(blocks), state


PERTURBATIONS = {"isotropic": (IsotropicConfig, Isotropic)}
