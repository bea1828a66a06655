"""The outer step: the meta-gradient for the learned perturbation scales, from a one-step
look-ahead (``lookahead_loss``), a K-step unroll of the tuner's own ZO trajectory
(``unrolled_loss``), or antithetic evolution strategies over such a segment (``es_gradient``,
forward passes only).

At θ, with the step's seed and the tuner's normalised scales s = cσ (differentiable, c too):
    L± = L(θ ± ε r_b s_b z_b)                          (no gradient, the engine's hooks)
    θ′_b = θ_b − η_u · k_b · s_b · z_b                 (k_b: the estimator's coefficient)
    meta-loss = L(θ′) on the meta batch                 (autograd through σ only)
With G_b = −η_u k_b ⟨∇_b L(θ′), z_b⟩, ∂meta-loss/∂σ_b = c G_b − (c d̃_b σ_b / Σ d̃σ²) Σ_j σ_j G_j:
a hypergradient on each block's step size along a random direction, less its share of the
budget Σ d̃_b s_b² = Σ d̃_b that the normalisation holds fixed. (The reference code detaches c;
then E[∂/∂σ_b] < 0 for every block, every σ grows and the budget is reallocated only by
accident of the growth rates.)

On the step's own batch, G_b rewards a block for the batch's noise as much as for its signal
(to first order E[k_b⟨∇_b L, z_b⟩] ∝ ‖∇_b L_batch‖²); on another batch of the task only the
gradient the two batches share counts (∝ ⟨∇_b L_batch, ∇_b L_other⟩), so a block whose batch
gradient is mostly noise stops looking useful. θ′ is built with ``torch.func.functional_call``:
the model itself is never copied or written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from zoft.perturbations import LearnedState
from zoft.rng import derive


class _LossOf(nn.Module):
    """Wraps (model, loss function) so functional_call can swap the model's parameters."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def direction(opt, seed: int, block) -> torch.Tensor:
    return torch.cat([z for _, _, z in opt.perturber.direction_chunks(seed, block)]).view_as(block.param)


def lookahead_loss(opt, loss_fn, batch, seed: int, state, prev_losses, lr_update: float, step: int = 0,
                   meta_batch=None):
    """(meta-loss with a graph to the tuner, L⁺, L⁻, raw σ, effective scales s = cσ) at the model's
    weights. The step is estimated on ``batch``; the meta-loss L(θ′) is taken on ``meta_batch``
    (default: the same batch).

    ``opt`` is a ZOOptimizer whose perturbation is a LearnedScale: its estimator, noise and
    hooks are the ones fine-tuning will use, so the tuner fits the estimator it serves."""
    est, learned, blocks = opt.estimator, opt.perturbation, opt.blocks
    sigma = learned.sigma(state, prev_losses)  # differentiable
    scale = learned.normalised(sigma).float()
    probe = est.probe(seed, step, len(blocks))
    losses = [float(v) for v in opt.perturber.losses_at(seed, probe.points, scale.detach().tolist(),
                                                          lambda: loss_fn(opt.model, batch))]
    coef, _, _ = est.estimate(None, losses, probe, step)
    coef = torch.tensor(coef, dtype=scale.dtype, device=scale.device)
    step = -lr_update * coef * scale  # [n], the look-ahead's per-block step along z_b
    moved = {f"model.{b.name}": b.param.detach() + step[b.index] * direction(opt, seed, b) for b in blocks}
    meta_loss = functional_call(_LossOf(opt.model, loss_fn), moved, (batch if meta_batch is None else meta_batch,),
                                strict=False)
    return meta_loss, losses[0], losses[1], sigma.detach(), scale.detach()


@dataclass
class UnrollStep:
    """What the K-step meta-gradient needs of one ZO step of the tuner's own trajectory."""

    seed: int  # the step's direction z_t
    lr: float
    coef: list[float]  # the estimator's per-block coefficients k_{t,b}
    state: LearnedState  # the tuner's inputs at the step
    prev_losses: tuple[float, float] | None


def recorded_step(opt, closure, step: int, lr: float) -> UnrollStep:
    """One ZOOptimizer step at global step ``step`` (its direction seeded by it, so a resumed run
    draws the same), and what the unroll needs of it."""
    state, prev = opt.states["perturbation"], opt.prev_losses
    opt.step_count = step
    opt.step(closure, lr=lr)
    seed, est = derive(opt.seed, step, 0), opt.estimator  # the direction ZOOptimizer.step drew
    losses = [opt.last["loss_plus"], opt.last["loss_minus"]]
    return UnrollStep(seed, lr, est.estimate(None, losses, est.probe(seed, step, len(opt.blocks)), step)[0], state, prev)


def unrolled_loss(opt, loss_fn, meta_batch, steps: list[UnrollStep]) -> tuple[torch.Tensor, float]:
    """(surrogate, L(θ_K)): the surrogate's gradient in the tuner's weights is the K-step
    meta-gradient of L(θ_K) on the meta batch, at the model's weights θ_K after ``steps``.

    θ_K = θ_0 + Σ_t Δ_t with Δ_{t,b} = −η_t k_{t,b} s_{t,b} z_{t,b}. Holding the coefficients k and
    the later steps' response to Δ_t fixed, ∂L(θ_K)/∂s_{t,b} = −η_t k_{t,b} ⟨∇_b L(θ_K), z_{t,b}⟩:
    one backward at θ_K, and the directions regenerated from their seeds. ∇L(θ_K) carries the
    damage that every earlier step's noise did (curvature times Σ Δ), so a block earns σ only when
    its steps helped at the end of the segment, not just at the next step."""
    learned, blocks = opt.perturbation, opt.blocks
    with torch.enable_grad():
        loss = loss_fn(opt.model, meta_batch)
        grads = [g.float() for g in torch.autograd.grad(loss, [b.param for b in blocks])]
    surrogate = 0.0
    for st in steps:
        with torch.no_grad():
            along = torch.stack([(g * direction(opt, st.seed, b).float()).sum() for b, g in zip(blocks, grads)])
            weight = -st.lr * torch.tensor(st.coef, dtype=torch.float64, device=along.device) * along.double()
        surrogate = surrogate + (learned.normalised(learned.sigma(st.state, st.prev_losses)) * weight).sum()
    return surrogate, loss.item()


def es_gradient(opt, loss_fn, meta_batch, batches, first_step: int, lrs: list[float], size: float,
                noise_seed: int, back_to_start: bool = False) -> tuple[torch.Tensor, float, float]:
    """(ĝ for the tuner's output biases b2, L⁺_K, L⁻_K): antithetic evolution strategies over one
    K-step segment of the tuner's own ZO trajectory, forward passes only.

    b2 is each block's σ where the output weights are shrunk (the isotropic start and a prior's);
    ES moves it and leaves the rest of the network to the gradient objectives: a search over the
    whole network (449 weights a block) would need a population per block. The segment is run
    twice from the same θ₀, with b2 ⊙ exp(±size·ξ), ξ ~ N(0, I) on the free blocks (a relative
    change: scales span decades), on the same batches and directions (common random numbers, so
    only the scales differ), and
        ĝ = (L(θ_K⁺) − L(θ_K⁻)) / (2·size) · ξ / b2      (L on ``meta_batch``, which the segment did not train on)
    estimates the gradient in b2 of the size-smoothed L(θ_K) (ĝ·b2 is the one in log b2), with the
    estimator's coefficients free to respond to the scales (the unroll's surrogate holds them
    fixed). Costs one copy of the trainable weights, to restart the second run; the model ends at
    θ_K⁻ with the optimizer's state of that run (``back_to_start``: at θ₀ and the state it started
    from, for a caller that runs the segment once more), the tuner at its unperturbed b2."""
    net, blocks = opt.perturbation.net, opt.blocks
    start = [b.param.detach().clone() for b in blocks]
    state, prev_losses = opt.states["perturbation"], opt.prev_losses
    b2 = net.b2.detach().clone()
    xi = torch.randn(b2.shape, generator=torch.Generator().manual_seed(noise_seed), dtype=b2.dtype).to(b2.device)
    xi = xi * net.free.view(b2.shape)  # a held block's σ is 0 at any b2: no noise spent on it
    ends = []

    def restart():
        for b, p0 in zip(blocks, start):
            b.param.copy_(p0)
        opt.states["perturbation"], opt.prev_losses = state, prev_losses

    with torch.no_grad():
        for sign in (1.0, -1.0):
            restart()
            net.b2.copy_(b2 * torch.exp(sign * size * xi))
            for t, (batch, lr) in enumerate(zip(batches, lrs)):
                opt.step_count = first_step + t  # the same directions in both runs
                opt.step(lambda: loss_fn(opt.model, batch), lr=lr)
            ends.append(loss_fn(opt.model, meta_batch).item())
        net.b2.copy_(b2)
        if back_to_start:
            restart()
    along_log = (ends[0] - ends[1]) / (2 * size) * xi
    return torch.where(b2 != 0, along_log / b2, torch.zeros_like(b2)), ends[0], ends[1]
