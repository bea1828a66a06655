"""Perturbations: the shape and scale of each block's direction, u_b = σ_b·shape(z_b).

``scales`` gives σ per block at each step; ``shaper`` may return a function that reshapes every
chunk of a direction where it is made (``Perturber.z``), e.g. a mask; None keeps z as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from zoft.errors import ZoftError
from zoft.registry import register

DIM_RULES = ("reference", "numel")


@dataclass
class IsotropicConfig:
    pass


@register("perturbation", "isotropic", IsotropicConfig)
class Isotropic:
    """σ_b = 1 for every block: the plain Gaussian (or table) direction of MeZO."""

    name = "isotropic"
    needs_block_stats = False

    def __init__(self, cfg: IsotropicConfig | None = None):
        self.cfg = cfg or IsotropicConfig()

    def init(self, blocks) -> None:
        return None

    def scales(self, blocks, state, **context) -> tuple[list[float], None]:
        return [1.0] * len(blocks), state

    def shaper(self, state):
        return None

    def observe(self, state, block_stats):
        return state


@dataclass
class LearnedScaleConfig:
    path: str = field(default="", metadata={"help": "tuner artifact (tuner.safetensors or its folder)"})
    dim_rule: str = field(default="reference", metadata={
        "help": "effective dimension d̃_b in the normalisation: 'numel' counts every element;"
                " 'reference' (the paper's) counts an embedding as the rows a step reads,"
                " row_len × tokens_per_example × batch_size. A tuner file's own rule wins"})
    tokens_per_example: int = 15
    batch_size: int = field(default=16, metadata={"help": "the fine-tune's batch size (for the reference rule)"})

    def __post_init__(self):
        if self.dim_rule not in DIM_RULES:
            raise ZoftError(f"dim_rule must be one of {DIM_RULES}, got {self.dim_rule!r}")


@dataclass
class LearnedState:
    sigma_prev: torch.Tensor  # [n] raw network outputs of the previous step
    stats: torch.Tensor  # [n, 2] mean and unbiased variance of each block


@register("perturbation", "learned", LearnedScaleConfig)
class LearnedScale(Isotropic):
    """ZO Fine-tuner: σ = |MLP_b([mean θ_b, var θ_b, L⁺_{t−1}, L⁻_{t−1}, σ_{b,t−1}])| per block,
    normalised so that Σ_b d̃_b (cσ_b)² = Σ_b d̃_b: the learned scales redistribute the
    perturbation's energy across blocks without changing its total, so ε and lr keep their
    meaning. Starts at σ_prev = 1 and (L⁺, L⁻) = (0, 0)."""

    name = "learned"
    needs_block_stats = True

    def __init__(self, cfg: LearnedScaleConfig, net=None):
        self.cfg, self.net, self.meta = cfg, net, {}
        if net is None and not cfg.path:
            raise ZoftError("the learned perturbation needs a tuner (path) or a network")

    def init(self, blocks) -> LearnedState:
        from zoft.tuner import load_tuner

        if self.net is None:
            self.net, self.meta = load_tuner(self.cfg.path, blocks)
            # the rule the tuner was meta-trained with, read back from its header
            self.cfg = replace(self.cfg, dim_rule=self.meta.get("dim_rule", self.cfg.dim_rule),
                               tokens_per_example=int(self.meta.get("tokens_per_example", self.cfg.tokens_per_example)))
        device = blocks[0].param.device
        self.net.to(device)
        self.dims = torch.tensor([self._dim(b) for b in blocks], dtype=torch.float64, device=device)
        with torch.no_grad():  # once, at the start; afterwards the update pass provides them
            stats = torch.stack([torch.stack([b.param.float().mean(), b.param.float().var()]) for b in blocks])
        return LearnedState(torch.ones(len(blocks), device=device), stats)

    def _dim(self, block) -> float:
        if self.cfg.dim_rule == "reference" and block.is_embedding:
            return float(block.row_len * self.cfg.tokens_per_example * self.cfg.batch_size)
        return float(block.numel)

    def sigma(self, state: LearnedState, prev_losses) -> torch.Tensor:
        """Raw σ [n], differentiable in the network's weights (meta-training needs that)."""
        lp, lm = prev_losses or (0.0, 0.0)
        n = state.stats.shape[0]
        losses = torch.tensor([lp, lm], device=state.stats.device).expand(n, 2)
        x = torch.cat([state.stats, losses, state.sigma_prev.detach()[:, None]], dim=1)
        return self.net(x.to(self.net.w1.dtype))

    def normalised(self, sigma: torch.Tensor) -> torch.Tensor:
        """cσ with c = sqrt(Σ d̃_b / Σ d̃_b σ_b²), differentiable in σ: through c, a meta-gradient
        moves the perturbation budget between blocks instead of inflating every σ."""
        energy = (self.dims * sigma.double() ** 2).sum()
        if not torch.isfinite(energy):
            raise ZoftError("the tuner gives non-finite σ: its weights are not finite (a corrupt tuner file?)")
        if not energy > 0:
            raise ZoftError("the tuner gives σ = 0 to every block; nothing would be perturbed")
        return (self.dims.sum() / energy).sqrt() * sigma.double()

    def scales(self, blocks, state: LearnedState, *, prev_losses=None, **context):
        with torch.no_grad():
            sigma = self.sigma(state, prev_losses)
            effective = self.normalised(sigma).tolist()  # the step's one sync
        return effective, replace(state, sigma_prev=sigma.detach())

    def observe(self, state: LearnedState, block_stats: torch.Tensor) -> LearnedState:
        return replace(state, stats=block_stats)

