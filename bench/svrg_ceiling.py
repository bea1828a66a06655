"""What variance reduction could buy where ZO runs level off (issue 11): the SVRG control variate's
one-step gain at a run's weights, with the anchor's full gradient exact (a ceiling).

    python bench/svrg_ceiling.py --at RUN:STEP --anchors 100,125,140 [--task tweets] [--data-dir D] [--batches N] [--json OUT]

ZO-SGD along isotropic z gains, per step at its own best lr, S² / (2 B T) (bench/ceiling_predict.py):
S = ‖g‖² the full gradient's signal, B = E‖g̃‖² the batch gradient's second moment, T the
curvature. From step ~150 of the protocol's runs S/B is near 0: the batch noise, not the
direction's shape, holds them back. SVRG (MeZO-SVRG, arXiv 2404.08080) replaces the batch gradient
g̃(θ) by g̃(θ) − g̃(θ̃) + g(θ̃), the same batch at an anchor θ̃ a few steps back plus the anchor's full
gradient: unbiased, and with a second moment B_cv that is small where the batch's gradient moved
little since the anchor. S and T stay, so the step's gain is B / B_cv, at twice the forward passes
per step (both weights on each batch) before the anchor's own full pass.

Measured on one pass over the training sample (``--batches``, default all of it, 16 per batch; the
"full" gradient is that sample's mean, as in SVRG) with the run's weights after STEP steps and after
each anchor step, rebuilt from its trajectory, in lockstep on the same batches. The anchor's exact
full gradient along a fresh direction is what a ZO step cannot have without a full forward pass; a
realisable ZO form only gains less. MeZO-SVRG's own form stores the anchor's full gradient as a ZO
estimate from q full-sample directions, refreshed every m steps: one error e, E eᵀHe ≥ ‖ḡ‖² tr H / q,
that every step of the m repeats, so over m steps the noise is m B_cv + m² ‖ḡ‖² / q (in units of
η² tr H / 2) against plain ZO's m B, at 4m + 2qN forward passes against 2m (N batches per full
pass). With B_cv ≥ ‖ḡ‖² that gains at most (B / ‖ḡ‖²) · k / ((1 + k)(2k + N)) per forward pass
(k = m/q, best at √(N/2)), below 1 whenever B / ‖ḡ‖² ≤ N, which it is up to sampling noise
(E‖ḡ‖² = S + (B − S)/N): printed too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from zoft.blocks import collect_blocks  # noqa: E402
from zoft.data import collate  # noqa: E402
from zoft.finetune import rebuilt_models  # noqa: E402

from meta_train.allocation import batch_gradient, protocol_stream  # noqa: E402
from ceiling_predict import signal_spread, zo_skip  # noqa: E402  (bench/, the script's own folder)


class ControlVariateMoments:
    """Streaming sums over batches i of the batch gradient g_i at θ and h_i^a at each anchor a,
    enough for S, B and every anchor's B_cv = mean_i ‖g_i − h_i^a + h̄^a‖² without keeping a batch."""

    def __init__(self, anchors: int):
        self.count, self.g_sum, self.g_square = 0, None, 0.0
        self.h_sums, self.d_squares = [None] * anchors, [0.0] * anchors

    def add(self, g: torch.Tensor, hs: list[torch.Tensor]):
        g = g.double()
        self.count += 1
        self.g_sum = g.clone() if self.g_sum is None else self.g_sum.add_(g)
        self.g_square += float(g @ g)
        for a, h in enumerate(hs):
            h = h.double()
            self.h_sums[a] = h.clone() if self.h_sums[a] is None else self.h_sums[a].add_(h)
            self.d_squares[a] += float((g - h).square().sum())

    def figures(self) -> dict:
        n = self.count
        if n < 2:
            raise ValueError("need at least 2 batches (S compares batch gradients)")
        g_mean = self.g_sum / n
        signal = (float(self.g_sum @ self.g_sum) - self.g_square) / (n * (n - 1))  # unbiased ‖E g‖²
        second = self.g_square / n
        # ‖ḡ‖², the sample's own full gradient: what B_cv is at an anchor on θ itself
        out = {"batches": n, "S": signal, "B": second, "sample_gradient": float(g_mean @ g_mean), "anchors": []}
        for h_sum, d_square in zip(self.h_sums, self.d_squares):
            h_mean = h_sum / n
            # mean ‖d_i + h̄‖² with d_i = g_i − h_i: mean ‖d_i‖² + 2 h̄·d̄ + ‖h̄‖²
            corrected = d_square / n + 2 * float(h_mean @ (g_mean - h_mean)) + float(h_mean @ h_mean)
            out["anchors"].append({"B_cv": corrected, "gain": second / corrected})
        return out


def stored_anchor_bound(ratio: float, full_pass: int) -> float:
    """MeZO-SVRG's best gain per forward pass over plain ZO (module docstring), for B / ‖ḡ‖² =
    ``ratio`` and ``full_pass`` batches per full pass, at its best refresh-to-directions ratio k."""
    k = (full_pass / 2) ** 0.5
    return ratio * k / ((1 + k) * (2 * k + full_pass))


def flat_gradient(model, blocks, batch, cand) -> torch.Tensor:
    return torch.cat(batch_gradient(model, blocks, batch, cand)[0])


def measure(run: Path, step: int, anchors: list[int], task: str, data_dir=None, batches: int = 0) -> dict:
    """Figures of ControlVariateMoments at RUN after STEP steps, one anchor per step in ``anchors``."""
    points = sorted(anchors) + [step]
    models = []
    for model, tokenizer, _, _ in rebuilt_models(run, points):  # one replay
        # an anchor's weights are kept as a copy; STEP's are the replay's own model, moved no further
        models.append((model if len(models) == len(points) - 1 else copy.deepcopy(model)).eval())
    current, anchored = models[-1], models[:-1]
    cand, stream = protocol_stream(tokenizer, task, data_dir, skip=zo_skip(run, task))
    batches = batches or len(stream.items) // stream.batch_size
    blocks = [collect_blocks(m) for m in models]
    moments = ControlVariateMoments(len(anchored))
    for _ in range(batches):
        batch = collate(stream.next_items(), tokenizer.pad_token_id)
        moments.add(flat_gradient(current, blocks[-1], batch, cand),
                    [flat_gradient(m, b, batch, cand) for m, b in zip(anchored, blocks)])
    figures = moments.figures()
    for entry, anchor in zip(figures["anchors"], sorted(anchors)):
        entry["anchor_step"] = anchor
    return figures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--at", required=True, help="RUN:STEP, the weights a run reached after STEP steps")
    ap.add_argument("--anchors", required=True, help="comma-separated steps of the same run, up to STEP")
    ap.add_argument("--task", default="tweets")
    ap.add_argument("--data-dir", default=None, help="where SuperGLUE files are (../shared/data)")
    ap.add_argument("--batches", type=int, default=0, help="batches of 16 (default: the whole training sample)")
    ap.add_argument("--json", default="", help="write the figures here too")
    args = ap.parse_args(argv)
    run, _, step = args.at.rpartition(":")
    if not (run and step.isdigit()):
        ap.error(f"--at takes RUN:STEP, got {args.at!r}")
    if not all(a.strip().isdigit() and int(a) <= int(step) for a in args.anchors.split(",")):
        ap.error(f"--anchors takes steps up to {step}, got {args.anchors!r}")
    if args.batches == 1 or args.batches < 0:
        ap.error("--batches must be at least 2 (S compares batch gradients), or 0 for the whole sample")
    anchors = [int(a) for a in args.anchors.split(",")]
    torch.manual_seed(0)
    figures = measure(Path(run), int(step), anchors, args.task, args.data_dir, args.batches)
    figures.update(run=run, step=int(step), task=args.task)
    print(f"{run} after {step} steps, {args.task}, {figures['batches']} batches of 16\n")
    print(f"S/B (batch gradient, no correction): {figures['S'] / figures['B']:.4f}"
          f" ± {signal_spread(figures['batches']):.3f}\n")
    print("| anchor step | steps since | S/B_cv | B / B_cv: one-step gain | per forward pass (2 weights per batch), before the full pass |")
    print("|---|---|---|---|---|")
    for a in figures["anchors"]:
        print(f"| {a['anchor_step']} | {int(step) - a['anchor_step']} | {figures['S'] / a['B_cv']:.4f} | {a['gain']:.3f} | {a['gain'] / 2:.3f} |")
    bound = stored_anchor_bound(figures["B"] / figures["sample_gradient"], figures["batches"])
    figures["stored_anchor_bound"] = bound
    print(f"\nMeZO-SVRG's realisable form (a stored ZO estimate of the anchor's gradient): at most {bound:.3f}"
          f" times plain ZO's gain per forward pass (B / ‖ḡ‖² = {figures['B'] / figures['sample_gradient']:.1f},"
          f" {figures['batches']} batches per full pass)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
