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
    mix: float | None = None  # iterate averaging: 1/β_t (see _apply)


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
        self.model = model
        self.perturber = Perturber(model, self.blocks, self.noise)
        self.num_directions, self.seed = num_directions, seed
        self.step_count = 0
        self.state = perturbation.init(self.blocks)
        self.prev_losses: tuple[float, float] | None = None
        self.history: list[AppliedStep] | None = [] if record else None
        self.last: dict[str, float] = {}
        self._reach_checked = False
        self._anchor: list[torch.Tensor] | None = None  # c of iterate averaging

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float]) -> float:
        """One ZO step; ``closure`` returns the loss on a fixed batch. Returns the mean L(θ+)."""
        t, n, num_blocks = self.step_count, self.num_directions, len(self.blocks)
        mix = self.update.mix(t)
        if mix is not None:
            if self._anchor is None:
                self._anchor = [b.param.detach().clone() for b in self.blocks]
            self._to_average_point(mix, self._anchor)
        sigma, state = self.perturbation.scales(
            self.blocks, self.state, step=t, prev_losses=self.prev_losses
        )
        seeds = [derive(self.seed, t, i) for i in range(n)]
        radii, losses = [], []
        for seed in seeds:
            r = self.estimator.radii(seed, num_blocks, t)
            plus = [self.estimator.eps * rb * sb for rb, sb in zip(r, sigma)]
            for sign in (1, -1):
                # inference mode: no autograd bookkeeping at all in the forward passes
                with self.perturber.active(seed, [sign * x for x in plus]), torch.inference_mode():
                    losses.append(torch.as_tensor(closure()).reshape(()))
                self._check_reach(plus)
            radii.append(r)
        values = torch.stack([v.detach().float().cpu() for v in losses]).tolist()  # one sync
        if not all(map(math.isfinite, values)):
            raise ZoftError(
                f"non-finite loss at step {t} (L+/L- = {values}); weights left unchanged"
                " - lower lr or eps"
            )
        lr = self.update.lr(t)
        decay = self.update.decay_factors(t, self.blocks)
        # ĝ_b = Σ_i grad[i, b]·z_b(seed_i); the update adds −lr·ĝ
        grad = torch.empty(n, num_blocks, dtype=torch.float64)
        for i in range(n):
            coef = self.estimator.coefficients(values[2 * i], values[2 * i + 1], radii[i], t)
            grad[i] = torch.tensor([c * s / n for c, s in zip(coef, sigma)], dtype=torch.float64)
        clip = self.update.clip_factors(lambda: self.perturber.combination_norms(seeds, grad))
        if clip is not None:
            grad *= torch.tensor(clip, dtype=torch.float64)
        scales = -lr * grad
        applied = AppliedStep(seeds, scales, None if decay is None else torch.tensor(decay, dtype=torch.float64), mix)
        stats = self._apply(applied, self._anchor, with_stats=self.perturbation.needs_block_stats)
        if stats is not None:
            state = self.perturbation.observe(state, stats)
        if self.history is not None:
            self.history.append(applied)
        loss_plus, loss_minus = sum(values[0::2]) / n, sum(values[1::2]) / n
        self.state, self.prev_losses = state, (loss_plus, loss_minus)
        self.step_count += 1
        self.last_scales = sigma
        self.last = {
            "loss_plus": loss_plus,
            "loss_minus": loss_minus,
            "proj_grad": (loss_plus - loss_minus) / (2 * self.estimator.eps),
            "lr": lr,
            "forward_passes": 2 * n,
        }
        return loss_plus

    @torch.no_grad()
    def replay(self, steps: list[AppliedStep]):
        """Re-apply recorded steps to the weights they started from: bit-identical. With iterate
        averaging, ``steps`` must start at step 0 (the averaging anchor starts as those weights)."""
        anchor = [b.param.detach().clone() for b in self.blocks] if any(s.mix for s in steps) else None
        for applied in steps:
            if applied.mix is not None:
                self._to_average_point(applied.mix, anchor)
            self._apply(applied, anchor)

    def _to_average_point(self, mix: float, anchor: list[torch.Tensor]):
        """y → x_t = y + (c − y)/β_t: the point where iterate averaging measures the gradient."""
        with torch.no_grad():
            for b, c in zip(self.blocks, anchor):
                b.param.data.lerp_(c, mix)

    def _apply(self, applied: AppliedStep, anchor: list[torch.Tensor] | None = None, with_stats=False):
        """θ ← decay·θ, then θ += scales[i]·z(seeds[i]) for each direction, one pass each.
        With averaging (KerZOO): c ← c − ηĝ and y ← x_t − (η/β_t)ĝ. With ``with_stats``, the
        last pass also returns each block's [mean, var] (see Perturber.add_)."""
        if applied.decay is not None:
            for b, keep in zip(self.blocks, applied.decay.tolist()):
                if keep != 1.0:
                    b.param.data.mul_(keep)
        stats, last = None, len(applied.seeds) - 1
        for i, (seed, row) in enumerate(zip(applied.seeds, applied.scales.tolist())):
            if applied.mix is not None:
                self.perturber.add_(seed, row, targets=anchor)
                row = [x * applied.mix for x in row]
            stats = self.perturber.add_(seed, row, with_stats=with_stats and i == last)
        return stats

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


def _make(table, spec: dict, kind: str):
    spec = dict(spec)
    name = spec.pop("name")
    if name not in table:
        raise ZoftError(f"unknown {kind} {name!r}; choose from {sorted(table)}")
    cfg_cls, cls = table[name]
    return cls(cfg_cls(**spec))


def make_parts(estimator: dict, perturbation: dict, update: dict) -> tuple:
    """(estimator, perturbation, update) from specs like {"name": "spsa", "eps": 1e-3}, one
    config dataclass per piece; invalid hyperparameters raise ZoftError here."""
    return (_make(ESTIMATORS, estimator, "estimator"), _make(PERTURBATIONS, perturbation, "perturbation"),
            _make(UPDATES, update, "update"))


def build_optimizer(model, estimator: dict, perturbation: dict, update: dict, **kwargs) -> ZOOptimizer:
    return ZOOptimizer(model, *make_parts(estimator, perturbation, update), **kwargs)


def mezo(model, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> ZOOptimizer:
    """MeZO: two-point SPSA, isotropic directions, ZO-SGD."""
    return build_optimizer(
        model,
        {"name": "spsa", "eps": eps},
        {"name": "isotropic"},
        {"name": "sgd", "lr": lr, "weight_decay": weight_decay},
        **kwargs,
    )
