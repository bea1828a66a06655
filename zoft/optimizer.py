"""ZOOptimizer: the one place where estimator, perturbation and update meet.

    opt = zoft.mezo(model, lr=1e-5, eps=1e-3)
    for batch in batches:
        loss = opt.step(lambda: loss_fn(model, batch))

One step with n directions (MeZO's memory-efficient n-SPSA, seeds and scalars only): the
perturbation gives σ (and may shape z); for each direction i the estimator names its probe
points and the model is evaluated there with θ untouched (perturb.py); after one host sync for
all losses, the estimator turns them into per-block coefficients, and the update emits the
(seed, scale) terms that are applied in one pass each, z regenerated from its seed. No
parameter-sized buffer is ever allocated. Each piece's state is explicit and saved by
``state_dict``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace

import torch
from torch import nn

from zoft.blocks import collect_blocks
from zoft.errors import RunDiverged, ZoftError
from zoft.noise import make_noise
from zoft.perturb import Perturber
from zoft.registry import build
from zoft.rng import derive
from zoft.updates import AppliedStep

PIECES = ("estimator", "perturbation", "update")


class ZOOptimizer:
    def __init__(self, model: nn.Module, estimator, perturbation, update, *, noise="table",
                 num_directions: int = 1, seed: int = 0, record: bool = False, direction_group=None,
                 master_weights: bool = False):
        if num_directions < 1:
            raise ZoftError(f"num_directions must be >= 1, got {num_directions}")
        self.estimator, self.perturbation, self.update = estimator, perturbation, update
        self.noise = make_noise(noise) if isinstance(noise, (str, dict)) else noise
        self.blocks = collect_blocks(model)
        dropout = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
        if model.training and dropout:
            warnings.warn(f"the model is in train mode with {len(dropout)} active dropout layers: the two probes of a"
                          " step then see different dropout masks, and the projected gradient is mostly their noise;"
                          " call model.eval()", stacklevel=2)
        self.model = model
        self.perturber = Perturber(model, self.blocks, self.noise)
        self.num_directions, self.seed = num_directions, seed
        # direction parallel: this rank evaluates directions rank, rank + world, ...; the losses
        # are summed over ranks (zoft/distributed.py)
        self.direction_group = direction_group
        # an fp32 copy of low-precision trainable tensors that the updates go into (cast back after
        # each step): updates far below a bf16 weight's resolution then add up instead of vanishing.
        # Costs 4 bytes a trainable parameter.
        self.master_weights = master_weights
        if master_weights and getattr(update.cfg, "average", False):
            raise ZoftError("master weights and iterate averaging cannot be combined")
        self.master = self._fresh_master()
        self.step_count = 0
        self.states = {k: getattr(self, k).init(self.blocks) for k in PIECES}
        # how the run's directions were shaped, fixed at its start (a mask's thresholds, say): replay
        # reuses it, so no file is read again and a replay in pieces shapes like the run did
        self._replay_shaper = self.perturbation.shaper(self.states["perturbation"])
        self.prev_losses: tuple[float, float] | None = None
        self.history: list[AppliedStep] | None = [] if record else None
        self.last: dict[str, float] = {}
        self.last_scales: list[float] = []
        self._reach_checked = False

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float], lr: float | None = None) -> float:
        """One ZO step; ``closure`` returns the loss on a fixed batch. Returns the mean loss at the
        first probe point (L(θ+) for two-point estimators). ``lr`` (a torch scheduler's, say)
        replaces the update's own schedule for this step."""
        t, n, states = self.step_count, self.num_directions, dict(self.states)
        mix = self.update.mix(t)
        if mix is not None:
            self._to_average_point(mix, states["update"].anchor)
        sigma, states["perturbation"] = self.perturbation.scales(
            self.blocks, states["perturbation"], step=t, prev_losses=self.prev_losses)
        self.perturber.shaper = self.perturbation.shaper(states["perturbation"])
        seeds = [derive(self.seed, t, i) for i in range(n)]
        probes = [self.estimator.probe(seed, t, len(self.blocks)) for seed in seeds]
        values = self._losses(seeds, probes, sigma, closure)
        if not all(math.isfinite(v) for row in values for v in row):
            raise RunDiverged(f"non-finite loss at step {t} (losses {values}); this step was not applied"
                              " - lower lr or eps")
        grad, metrics = self._estimate(values, probes, sigma, states)
        applied, states["update"] = self.update.step(
            states["update"], seeds, grad, t, self.blocks, lambda g: self.perturber.combination_norms(seeds, g), lr=lr)
        stats = self._apply(applied, states["update"], with_stats=self.perturbation.needs_block_stats)
        if stats is not None:
            states["perturbation"] = self.perturbation.observe(states["perturbation"], stats)
        if self.history is not None:
            self.history.append(applied)
        means = [sum(row[j] for row in values) / n for j in range(len(values[0]))]
        self.states, self.prev_losses, self.last_scales = states, (means[0], means[-1]), sigma
        self.step_count += 1
        self.last = {"loss_plus": means[0], "loss_minus": means[-1], **metrics,
                     "lr": self.update.lr(t) if lr is None else lr,
                     "forward_passes": n * len(values[0])}
        return means[0]

    def _losses(self, seeds, probes, sigma, closure) -> list[list[float]]:
        """[direction][point] losses, after one host sync (and, direction parallel, one sum over ranks)."""
        group = self.direction_group
        mine = range(len(seeds)) if group is None else range(group.rank, len(seeds), group.world)
        losses = {}
        for i in mine:
            losses[i] = self.perturber.losses_at(seeds[i], probes[i].points, sigma, closure)
            self._check_reach(sigma)
        if group is None:
            return torch.stack([v.detach().float().cpu() for i in mine for v in losses[i]]).view(len(seeds), -1).tolist()
        values = torch.zeros(len(seeds), len(probes[0].points), dtype=torch.float64)
        for i, row in losses.items():
            values[i] = torch.stack([v.detach().float().cpu() for v in row]).double()
        return group.sum_(values).tolist()  # every other rank adds 0 to a slot: exact

    def _estimate(self, values, probes, sigma, states):
        """grad [n, blocks] with ĝ_b = Σ_i grad[i, b] z_b(seed_i) (σ and 1/n folded in), and the
        estimator's metrics averaged over directions."""
        n = len(values)
        grad = torch.empty(n, len(self.blocks), dtype=torch.float64)
        totals: dict[str, float] = {}
        for i, (row, probe) in enumerate(zip(values, probes)):
            coef, states["estimator"], metrics = self.estimator.estimate(states["estimator"], row, probe, self.step_count)
            grad[i] = torch.tensor([c * s / n for c, s in zip(coef, sigma)], dtype=torch.float64)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / n
        return grad, totals

    @torch.no_grad()
    def _fresh_master(self) -> list[torch.Tensor] | None:
        if not self.master_weights or all(b.param.dtype == torch.float32 for b in self.blocks):
            return None
        return [b.param.detach().float().clone() for b in self.blocks]

    def restart_master(self):
        """Take the fp32 master copy again from the weights as they are: after they were set from
        outside the optimizer (a head start, a replay's starting weights)."""
        self.master = self._fresh_master()

    def replay(self, steps: list[AppliedStep]):
        """Re-apply recorded steps to the weights they started from: bit-identical. With iterate
        averaging or master weights, ``steps`` must start at step 0 (both start as those weights)."""
        self.restart_master()
        state = self.update.init(self.blocks)
        self.perturber.shaper = self._replay_shaper
        for applied in steps:
            if applied.mix is not None:
                self._to_average_point(applied.mix, state.anchor)
            self._apply(applied, state)
        if getattr(self.states["update"], "anchor", None) is not None:
            self.states["update"] = replace(self.states["update"], anchor=state.anchor)

    def _to_average_point(self, mix: float, anchor: list[torch.Tensor]):
        """y → x_t = y + (c − y)/β_t: the point where iterate averaging measures the gradient."""
        for b, c in zip(self.blocks, anchor):
            b.param.data.lerp_(c, mix)

    def _apply(self, applied: AppliedStep, update_state, with_stats=False):
        """θ ← decay·θ, then θ += scales[j]·z(seeds[j]) for each term, one pass each. With
        averaging (KerZOO): c ← c − ηĝ and y ← x_t − (η/β_t)ĝ. With ``with_stats``, the last pass
        also returns each block's [mean, var] (see Perturber.add_)."""
        targets = self.master or [b.param.data for b in self.blocks]
        if applied.decay is not None:
            for t, keep in zip(targets, applied.decay.tolist()):
                if keep != 1.0:
                    t.mul_(keep)
        stats, last = None, len(applied.seeds) - 1
        for i, (seed, row) in enumerate(zip(applied.seeds, applied.scales.tolist())):
            if applied.mix is not None:
                self.perturber.add_(seed, row, targets=update_state.anchor)
                row = [x * applied.mix for x in row]
            stats = self.perturber.add_(seed, row, targets=self.master, with_stats=with_stats and i == last)
        if self.master is not None:
            for b, m in zip(self.blocks, self.master):
                b.param.data.copy_(m)
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

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-ready rest): the step, the last losses and every piece's state. The
        weights are not in it: they are the starting weights plus the replayed trajectory."""
        tensors, rest = {}, {"step": self.step_count, "seed": self.seed, "prev_losses": self.prev_losses}
        for kind, state in self.states.items():
            for f in fields(state) if is_dataclass(state) else ():
                value = getattr(state, f.name)
                if isinstance(value, torch.Tensor):
                    tensors[f"{kind}/{f.name}"] = value.detach().cpu().contiguous()
        return tensors, rest

    def load_state_dict(self, tensors: dict[str, torch.Tensor], rest: dict):
        """Restore what ``state_dict`` saved into the freshly initialised piece states."""
        self.step_count, self.seed = rest["step"], rest["seed"]
        self.prev_losses = None if rest["prev_losses"] is None else tuple(rest["prev_losses"])
        for kind, state in self.states.items():
            saved = {f.name: tensors[f"{kind}/{f.name}"] for f in fields(state) if is_dataclass(state)
                     and f"{kind}/{f.name}" in tensors} if is_dataclass(state) else {}
            if saved:
                device = next(iter(self.model.parameters())).device
                self.states[kind] = replace(state, **{k: v.to(device) for k, v in saved.items()})


def make_parts(estimator: dict, perturbation: dict, update: dict, noise: dict | None = None) -> tuple:
    """(estimator, perturbation, update) from specs like {"name": "spsa", "eps": 1e-3}, one
    config dataclass per piece; invalid hyperparameters (the noise spec's too) raise ZoftError."""
    if noise is not None:
        build("noise", noise)
    return build("estimator", estimator), build("perturbation", perturbation), build("update", update)


def build_optimizer(model, estimator: dict, perturbation: dict, update: dict, **kwargs) -> ZOOptimizer:
    return ZOOptimizer(model, *make_parts(estimator, perturbation, update), **kwargs)


def mezo(model, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> ZOOptimizer:
    """MeZO: two-point SPSA, isotropic directions, ZO-SGD."""
    return build_optimizer(model, {"name": "spsa", "eps": eps}, {"name": "isotropic"},
                           {"name": "sgd", "lr": lr, "weight_decay": weight_decay}, **kwargs)
