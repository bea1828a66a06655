"""How much signal does one unrolled segment give the tuner? The K-step meta-gradient of
L(θ_K) with respect to each block's log-scale, over M consecutive segments of one ZO trajectory
with the scales held (nothing is updated but the LLM), per meta-training task.

    python bench/meta_gradient_snr.py --prior bench/results/oracle/rte/lora-curv-a2.safetensors \\
        --peft lora --tasks rte,cb,wic --horizon 20 --segments 6 --lr 5e-3

The scales are those ``zoft meta-train --prior FILE`` starts from (isotropic without one); the
segments are meta-train's (``meta_train.outer.recorded_step`` / ``unrolled_loss``, the loss on a
batch the segment did not train on). Per task, over the free blocks: ‖ḡ‖² of the mean gradient
less its noise (tr Σ̂ / M, an unbiased estimate of the squared mean), the per-segment
signal-to-noise ratio ‖E g‖² / tr Σ (one segment's gradient is that much signal for each unit of
noise), the segments an update needs for a ratio of 1, the blocks whose mean is more than 2
standard errors from 0, and the cosine between the mean gradients of the two halves.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

import zoft.updates
from meta_train.outer import recorded_step, unrolled_loss
from meta_train.train import initial_tuner, task_data
from zoft.adapters import with_adapters
from zoft.blocks import collect_blocks
from zoft.config import AdapterConfig
from zoft.models import DEFAULT_MODEL, load_model
from zoft.optimizer import ZOOptimizer, make_parts
from zoft.perturbations import LearnedScale, LearnedScaleConfig
from zoft.tasks import get_task


def segment_gradients(opt, net, loss_fn, stream, horizon: int, segments: int, lr: float):
    """([segments, n] ∂L(θ_K)/∂log σ_b, [segments] L(θ_K) − L(θ₀)), one per segment, along one trajectory."""
    rows, gains, step = [], [], 0
    for _ in range(segments):
        meta_batch = next(stream)
        with torch.no_grad():
            before = loss_fn(opt.model, meta_batch).item()
        steps = []
        for _ in range(horizon):
            batch = next(stream)
            steps.append(recorded_step(opt, lambda: loss_fn(opt.model, batch), step, lr))
            step += 1
        surrogate, after = unrolled_loss(opt, loss_fn, meta_batch, steps)
        (grad,) = torch.autograd.grad(surrogate, net.b2)  # σ_b = |w2 h + b2| ≈ b2: the output layer is shrunk
        rows.append(grad.view(-1).double() * net.b2.detach().view(-1).double())
        gains.append(after - before)
    return torch.stack(rows), gains


def summary(grads: torch.Tensor) -> dict:
    m = grads.shape[0]
    mean, var = grads.mean(0), grads.var(0)
    noise = var.sum().item()
    signal = (mean.pow(2).sum() - var.sum() / m).item()  # unbiased: E ‖ḡ‖² = ‖E g‖² + tr Σ / M
    half = m // 2
    first, second = grads[:half].mean(0), grads[half:].mean(0)
    cosine = torch.nn.functional.cosine_similarity(first, second, dim=0).item()
    significant = int(((mean.abs() / (var / m).sqrt()) > 2).sum())
    per_segment = max(0.0, signal) / noise if noise > 0 else math.inf
    return {"signal": signal, "snr": per_segment, "segments_for_1": 1 / per_segment if per_segment > 0 else math.inf,
            "significant": significant, "cosine": cosine}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tasks", default="rte,cb,wic")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--peft", default="lora")
    ap.add_argument("--prior", default="", help="a block_scales file; isotropic scales without one")
    ap.add_argument("--horizon", type=int, default=20)
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.segments < 4:
        ap.error("--segments must be at least 4 (two halves of two)")

    model, tokenizer = load_model(args.model)
    model = with_adapters(model, AdapterConfig(peft=args.peft), args.seed)
    blocks = collect_blocks(model)
    initial = [b.param.detach().clone() for b in blocks]
    net = initial_tuner(blocks, args.seed, prior=args.prior, batch_size=args.batch_size)  # meta-train's start
    learned = LearnedScale(LearnedScaleConfig(batch_size=args.batch_size), net=net)
    estimator, _, _ = make_parts({"name": "spsa", "eps": args.eps}, {"name": "isotropic"}, {"name": "sgd"})
    opt = ZOOptimizer(model, estimator, learned, zoft.updates.SGD(zoft.updates.SGDConfig()), seed=args.seed)
    free = ~net.held
    print(f"{sum(free.tolist())} free blocks of {len(blocks)}; K = {args.horizon} ZO steps per segment at lr {args.lr:g}, "
          f"eps {args.eps:g}, batch {args.batch_size}; {args.segments} consecutive segments per task from θ₀; "
          f"scales: {args.prior or 'isotropic'}\n")
    print("| task | L(θ_K) − L(θ₀) per segment | per-segment SNR ‖E g‖²/tr Σ | segments for SNR 1 "
          "| blocks > 2 s.e. from 0 | cosine of the halves' means |")
    print("|---|---|---|---|---|---|")
    for i, name in enumerate(t.strip() for t in args.tasks.split(",")):
        task = get_task(name)
        stream, loss_fn = task_data(task, tokenizer, args.data_dir, 1000, 256, args.batch_size, args.seed, i)
        with torch.no_grad():
            for b, p0 in zip(blocks, initial):
                b.param.copy_(p0)
        opt.prev_losses = None
        opt.states["perturbation"] = learned.init(blocks)
        grads, gains = segment_gradients(opt, net, loss_fn, stream, args.horizon, args.segments, args.lr)
        s = summary(grads[:, free])
        print(f"| {name} | {statistics.mean(gains):+.4f} ± {statistics.stdev(gains):.4f} | {s['snr']:.3f} | {s['segments_for_1']:.0f} | {s['significant']} of {int(free.sum())} "
              f"| {s['cosine']:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
