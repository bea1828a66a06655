"""ZOOptimizer: the one place where estimator, perturbation and update meet.

    opt = zoft.mezo(model, lr=1e-5, eps=1e-3)
    for batch in batches:
        loss = opt.step(lambda: loss_fn(model, batch))

One step with n directions (MeZO's memory-efficient n-SPSA, seeds and scalars only):
for each direction i, evaluate L(θ ± ε r_i σ z_i) with θ untouched (see perturb.py), then after
one host sync for all 2n losses apply θ ← decay·θ − (η/n) Σ_i c_i σ z_i in one pass per
direction, z_i regenerated from its seed. No parameter-sized buffer is ever allocated.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zoft.blocks import collect_blocks
from zoft.errors import ZoftError
from zoft.estimators import ESTIMATORS
from zoft.noise import make_noise
from zoft.perturb import Perturber
from zoft.perturbations import PERTURBATIONS
from zoft.rng import derive
from zoft.updates import UPDATES


@dataclass
class AppliedStep:
    """What one step did to the weights: enough to replay it exactly."""

    seeds: list[int]
    scales: torch.Tensor  # [num_directions, num_blocks]: θ_b += scales[i, b]·z_b(seeds[i])
    decay: torch.Tensor | None  # [num_blocks] multipliers applied first


class ZOOptimizer:
    def __init__(
        self,
        model: nn.Module,
        estimator,
        perturbation,
        update,
        *,
        noise="table",
        num_directions: int = 1,
        seed: int = 0,
        record: bool = False,
    ):
        if num_directions < 1:
            raise ZoftError(f"num_directions must be >= 1, got {num_directions}")
        self.estimator, self.perturbation, self.update = estimator, perturbation, update
        self.noise = make_noise(noise) if isinstance(noise, str) else noise
        self.blocks = collect_blocks(model)
        self.perturber = Perturber(model, self.blocks, self.noise)
        self.num_directions, self.seed = num_directions, seed
        self.step_count = 0
        self.state = perturbation.init(self.blocks)
        self.prev_losses: tuple[float, float] | None = None
        self.history: list[AppliedStep] | None = [] if record else None
        self.last: dict[str, float] = {}
        self._reach_checked = False

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float]) -> float:
        """One ZO step; ``closure`` returns the loss on a fixed batch. Returns the mean L(θ+)."""
        t, n, num_blocks = self.step_count, self.num_directions, len(self.blocks)
        sigma, state = self.perturbation.scales(
            self.blocks, self.state, step=t, prev_losses=self.prev_losses
        )
        seeds = [derive(self.seed, t, i) for i in range(n)]
        radii, losses = [], []
        for seed in seeds:
            r = self.estimator.radii(seed, num_blocks)
            plus = [self.estimator.eps * rb * sb for rb, sb in zip(r, sigma)]
            with self.perturber.active(seed, plus):
                losses.append(torch.as_tensor(closure()).reshape(()))
            self._check_reach(plus)
            with self.perturber.active(seed, [-x for x in plus]):
                losses.append(torch.as_tensor(closure()).reshape(()))
            radii.append(r)
        values = torch.stack([v.detach().float().cpu() for v in losses]).tolist()  # one sync
        if not all(map(math.isfinite, values)):
            raise ZoftError(
                f"non-finite loss at step {t} (L+/L- = {values}); weights left unchanged"
                " - lower lr or eps"
            )
        lr = self.update.lr(t)
        decay = self.update.decay_factors(t, self.blocks)
        if decay is not None:
            for b in self.blocks:
                if decay[b.index] != 1.0:
                    b.param.data.mul_(decay[b.index])
        scales = torch.empty(n, num_blocks)
        grads = []
        for i, seed in enumerate(seeds):
            lp, lm = values[2 * i], values[2 * i + 1]
            coef = self.estimator.coefficients(lp, lm, radii[i])
            row = [-lr / n * c * s for c, s in zip(coef, sigma)]
            self.perturber.add_(seed, row)
            scales[i] = torch.tensor(row)
            grads.append((lp - lm) / (2 * self.estimator.eps))
        if self.history is not None:
            self.history.append(
                AppliedStep(seeds, scales, None if decay is None else torch.tensor(decay))
            )
        loss_plus, loss_minus = sum(values[0::2]) / n, sum(values[1::2]) / n
        self.state, self.prev_losses = state, (loss_plus, loss_minus)
        self.step_count += 1
        self.last = {
            "loss_plus": loss_plus,
            "loss_minus": loss_minus,
            "proj_grad": sum(grads) / n,
            "lr": lr,
            "forward_passes": 2 * n,
        }
        return loss_plus

    @torch.no_grad()
    def replay(self, steps: list[AppliedStep]):
        """Re-apply recorded steps to weights restored to where they started: bit-identical."""
        for s in steps:
            if s.decay is not None:
                for b in self.blocks:
                    if s.decay[b.index] != 1.0:
                        b.param.data.mul_(float(s.decay[b.index]))
            for i, seed in enumerate(s.seeds):
                self.perturber.add_(seed, s.scales[i].tolist())

    def _check_reach(self, scales):
        """Warn once about trainable tensors the closure's forward never reads."""
        if self._reach_checked:
            return
        self._reach_checked = True
        missed = [b.name for b in self.blocks if scales[b.index] and b.index not in self.perturber.touched]
        if missed:
            warnings.warn(
                f"{len(missed)} trainable tensors are never read by the loss and get only noise"
                f" from updates (first: {missed[:3]}); freeze them (requires_grad=False)",
                stacklevel=3,
            )

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "seed": self.seed,
            "prev_losses": self.prev_losses,
            "perturbation_state": self.state,
        }

    def load_state_dict(self, state: dict):
        self.step_count, self.seed = state["step"], state["seed"]
        self.prev_losses, self.state = state["prev_losses"], state["perturbation_state"]


def build_optimizer(model, estimator: dict, perturbation: dict, update: dict, **kwargs) -> ZOOptimizer:
    """Build from specs like {"name": "spsa", "eps": 1e-3}: one config dataclass per piece."""

    def make(table, spec, kind):
        spec = dict(spec)
        name = spec.pop("name")
        if name not in table:
            raise ZoftError(f"unknown {kind} {name!r}; choose from {sorted(table)}")
        cfg_cls, cls = table[name]
        return cls(cfg_cls(**spec))

    return ZOOptimizer(
        model,
        make(ESTIMATORS, estimator, "estimator"),
        make(PERTURBATIONS, perturbation, "perturbation"),
        make(UPDATES, update, "update"),
        **kwargs,
    )


def mezo(model, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> ZOOptimizer:
    """MeZO: two-point SPSA, isotropic directions, ZO-SGD."""
    return build_optimizer(
        model,
        {"name": "spsa", "eps": eps},
        {"name": "isotropic"},
        {"name": "sgd", "lr": lr, "weight_decay": weight_decay},
        **kwargs,
    )
