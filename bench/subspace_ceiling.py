"""What a learned low-dimensional subspace of directions could buy per ZO step, and whether one made
on meta-training tasks carries to a held-out task (issue 11: the tuner's outputs widened past a
scale per block).

    python bench/subspace_ceiling.py --at RUN:STEP [--task tweets] [--meta rte] [--batches 32]
                                     [--ks 1,2,4,8,16] [--data-dir ../shared/data] [--json OUT]

ZO-SGD along u = Uᵀr (U: k orthonormal rows in the run's trainable weights, r ~ N(0, I_k)) gains,
per step at its own best lr, S_U² / (2 E[(rᵀc)² rᵀMr]) = S_U² / (2 (B_U T_U + 2 E cᵀMc)), with
c = U g̃ a batch gradient's coordinates, S_U = ‖U E g‖² (unbiased from the batches), B_U = E ‖c‖²,
M = U F Uᵀ the Fisher (Gauss-Newton) curvature within the subspace (from Fisher samples, not its
diagonal: directions along the gradient are more curved than the average one) and T_U = tr M.
R is that gain over isotropic directions' S² / (2 B T) (bench/ceiling_predict.py, the same
one-step model). A random subspace has R ≈ 1; the task's own subspace, made from half its batches
and scored on the other half, is the ceiling; the subspace made from the meta-training tasks'
batches at the same weights is what a tuner made once per base model could ship.

``--at RUN:STEP`` measures at a run's weights after STEP steps (its trainable blocks: ZO-LoRA's
adapters, with the run's own A at step 0): a subspace is only meaningful for the adapters it was
made on, so a shipped one would fix their initialisation.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from zoft.finetune import rebuilt_model  # noqa: E402

from ceiling_predict import at_run_step, zo_skip  # noqa: E402  (bench/, the script's own folder)
from meta_train.allocation import batch_samples  # noqa: E402


def samples(model, tokenizer, task: str, args, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, F) [batches, d] float64: batch gradients and Fisher samples over every trainable weight."""
    pairs = list(batch_samples(model, tokenizer, task, args.data_dir, args.batches, skip=skip))
    return tuple(torch.stack([torch.cat(x).double() for x in side]) for side in zip(*pairs))


def signal(c: torch.Tensor) -> torch.Tensor:
    """‖E c‖², unbiased from the rows of c (the products of different batches only)."""
    n, total = len(c), c.sum(0)
    return (total @ total - (c * c).sum()) / (n * (n - 1))


def isotropic_gain(G: torch.Tensor, F: torch.Tensor, batch_size: int = 16) -> float:
    return float(signal(G) ** 2 / (2 * (G * G).sum(1).mean() * (F * F).sum(1).mean() / batch_size))


def subspace_gain(U: torch.Tensor, G: torch.Tensor, F: torch.Tensor, batch_size: int = 16) -> float:
    """The one-step gain along u = Uᵀr, exact in k (no high-dimension approximation)."""
    c, e = G @ U.T, F @ U.T
    S = signal(c)
    M = e.T @ e / (len(e) * batch_size)
    noise = (c * c).sum(1).mean() * M.trace() + 2 * torch.einsum("ni,ij,nj->n", c, M, c).mean()
    return float(S.clamp(min=0) ** 2 / (2 * noise))


def top_rows(G: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading right singular vectors of stacked batch gradients: where they have most energy."""
    return torch.linalg.svd(G, full_matrices=False).Vh[:k]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--at", required=True, help="RUN:STEP, measure at a run's weights after STEP steps (its blocks)")
    ap.add_argument("--task", default="tweets", help="the held-out task the subspaces are scored on")
    ap.add_argument("--meta", default="rte", help="comma-separated meta-training tasks the shipped subspace is made on")
    ap.add_argument("--batches", type=int, default=32, help="batches of 16 per task (the held-out task's split in two)")
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--data-dir", default=None, help="where SuperGLUE files are (../shared/data)")
    ap.add_argument("--json", default="", help="write the figures here too")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    if args.batches < 8 or max(ks) > args.batches // 2:
        ap.error("need --batches >= 8 and every k <= batches / 2 (a subspace from half the task's batches)")
    run, step = at_run_step(args)
    model, tokenizer, cfg, _ = rebuilt_model(run, step)
    model.eval()
    if cfg.task != args.task:
        ap.error(f"{run} is a run on {cfg.task}, not {args.task}")
    G, F = samples(model, tokenizer, args.task, args, skip=zo_skip(Path(run), args.task))
    half = len(G) // 2
    made, scored = slice(0, half), slice(half, None)
    meta = torch.cat([samples(model, tokenizer, t.strip(), args)[0] for t in args.meta.split(",")])
    reference = isotropic_gain(G[scored], F[scored])
    gen = torch.Generator().manual_seed(0)
    own_rows, meta_rows = top_rows(G[made], max(ks)), top_rows(meta, max(ks))
    rows = {}
    for k in ks:
        random_rows = torch.linalg.qr(torch.randn(G.shape[1], k, generator=gen, dtype=torch.float64)).Q.T
        rows[k] = {name: subspace_gain(U, G[scored], F[scored]) / reference for name, U in (
            ("random", random_rows), ("own", own_rows[:k]), ("meta", meta_rows[:k]))}
    n = len(G) - half
    fraction = float(signal(G[scored]) / (G[scored] ** 2).sum(1).mean())
    spread = (2 / (n * (n - 1))) ** 0.5  # S averages n(n-1) products g_iᵀg_j, each of spread ≈ B
    print(f"weights: {run} after {step} steps ({G.shape[1]} trainable weights); {args.task}, {half} + {n}"
          f" batches of 16, signal fraction S/B = {fraction:.3f} ± {spread:.3f} on the scored half; meta: {args.meta},"
          f" {len(meta)} batches; isotropic one-step gain {reference:.3g}\n")
    if fraction < 2 * spread:
        print("The signal is within two standard errors of 0: R is a ratio of noise here.\n")
    print("| k | R random subspace | R task's own subspace (ceiling) | R meta-made subspace | meta's share of ‖E g‖² |")
    print("|---|---|---|---|---|")
    for k in ks:
        rows[k]["meta_share"] = float(signal(G[scored] @ meta_rows[:k].T) / signal(G[scored]))  # a random U: k / d
        r = rows[k]
        print(f"| {k} | {r['random']:.3g} | {r['own']:.3g} | {r['meta']:.3g} | {r['meta_share']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"at": args.at, "task": args.task, "meta": args.meta,
                                               "batches": args.batches, "isotropic_gain": reference,
                                               "signal_fraction": fraction, "signal_fraction_se": spread,
                                               "R": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
