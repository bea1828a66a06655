"""How much signal does one unrolled segment give the tuner? The K-step meta-gradient of
L(θ_K) with respect to each block's log-scale, over M consecutive segments of one ZO trajectory
with the scales held (nothing is updated but the LLM), per meta-training task.

    python bench/meta_gradient_snr.py --prior bench/results/oracle/rte/lora-curv-a2.safetensors \\
        --peft lora --tasks rte,cb,wic --horizon 20 --segments 6 --lr 5e-3

The scales are those ``zoft meta-train --prior FILE`` starts from (isotropic without one); the
segments are meta-train's (``meta_train.outer.recorded_step`` / ``unrolled_loss``, the loss on a
batch the segment did not train on). With ``--es-size S``, the same statistics of ES's estimate on
the same segments (``--objective es``: two runs of each, forward passes only), and its cosine with
the unroll's gradient segment by segment. Per task, over the free blocks: ‖ḡ‖² of the mean gradient
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
from meta_train.outer import es_gradient, recorded_step, unrolled_loss
from meta_train.train import initial_tuner, task_data
from zoft.adapters import with_adapters
from zoft.blocks import collect_blocks
from zoft.config import AdapterConfig
from zoft.models import DEFAULT_MODEL, load_model
from zoft.optimizer import ZOOptimizer, make_parts
from zoft.perturbations import LearnedScale, LearnedScaleConfig
from zoft.rng import derive
from zoft.tasks import get_task


def segment_gradients(opt, net, loss_fn, stream, horizon: int, segments: int, lr: float, es_size: float = 0.0,
                      seed: int = 0):
    """([segments, n] ∂L(θ_K)/∂log σ_b, [segments] L(θ_K) − L(θ₀), and with ``es_size`` [segments, n] the
    ES estimate of the same derivative on the same segments), one per segment, along one trajectory.

    ES (``meta_train.outer.es_gradient``, meta-train's ``--objective es``) runs each segment twice
    from its start, on the same batches and directions; the trajectory then goes on from the unroll's
    own run of it, so both estimators see the same segments."""
    rows, es_rows, gains, step = [], [], [], 0
    for _ in range(segments):
        meta_batch = next(stream)
        batches = [next(stream) for _ in range(horizon)]
        with torch.no_grad():
            before = loss_fn(opt.model, meta_batch).item()
        if es_size:
            es, _, _ = es_gradient(opt, loss_fn, meta_batch, batches, step, [lr] * horizon, es_size,
                                   derive(seed, step, 0, 1), back_to_start=True)
            es_rows.append(es.view(-1).double() * net.b2.detach().view(-1).double())
        steps = [recorded_step(opt, lambda: loss_fn(opt.model, batch), step + t, lr) for t, batch in enumerate(batches)]
        step += horizon
        surrogate, after = unrolled_loss(opt, loss_fn, meta_batch, steps)
        (grad,) = torch.autograd.grad(surrogate, net.b2)  # σ_b = |w2 h + b2| ≈ b2: the output layer is shrunk
        rows.append(grad.view(-1).double() * net.b2.detach().view(-1).double())
        gains.append(after - before)
    return torch.stack(rows), gains, (torch.stack(es_rows) if es_rows else None)


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
    ap.add_argument("--es-size", type=float, default=0.0,
                    help="also ES's estimate on the same segments (meta-train --objective es --es-size), 0: off")
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
    print("| task | meta-gradient | L(θ_K) − L(θ₀) per segment | per-segment SNR ‖E g‖²/tr Σ | segments for SNR 1 "
          "| blocks > 2 s.e. from 0 | cosine of the halves' means | cosine with the unroll's, same segment (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for i, name in enumerate(t.strip() for t in args.tasks.split(",")):
        task = get_task(name)
        stream, loss_fn = task_data(task, tokenizer, args.data_dir, 1000, 256, args.batch_size, args.seed, i)
        with torch.no_grad():
            for b, p0 in zip(blocks, initial):
                b.param.copy_(p0)
        opt.prev_losses = None
        opt.states["perturbation"] = learned.init(blocks)
        grads, gains, es = segment_gradients(opt, net, loss_fn, stream, args.horizon, args.segments, args.lr,
                                             args.es_size, args.seed)
        gain = f"{statistics.mean(gains):+.4f} ± {statistics.stdev(gains):.4f}"
        for label, g in [("unroll", grads)] + ([(f"ES, size {args.es_size:g}", es)] if es is not None else []):
            s = summary(g[:, free])
            along = torch.nn.functional.cosine_similarity(g[:, free], grads[:, free], dim=1).mean().item()
            print(f"| {name} | {label} | {gain} | {s['snr']:.3f} | {s['segments_for_1']:.0f} | {s['significant']} of "
                  f"{int(free.sum())} | {s['cosine']:+.2f} | {'–' if g is grads else f'{along:+.2f}'} |", flush=True)

if __name__ == "__main__":
    main()
