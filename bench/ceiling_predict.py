"""What shaping the perturbation can buy per ZO step, predicted from the task's own gradient and
curvature statistics (issue 11, part 2): a cheap ceiling before any 300-step run.

    python bench/ceiling_predict.py [--task tweets] [--batches 16] [--model PATH] [--head-from RUN] [--at RUN:STEP]
                                    [--stats CACHE] [--json OUT]

For ZO-SGD along u = D^½ z (z ~ N(0, I); D diagonal: a per-block scale σ_b² or a 0/1 mask) on a
loss with gradient g, batch gradient g̃ and curvature H, the expected decrease of one step at lr η
is η gᵀDg − ½η² E[(uᵀg̃)² uᵀHu] ≈ η gᵀDg − ½η² (g̃ᵀDg̃)·tr(DH) in high dimension. At its own best
lr a step gains (gᵀDg)² / (2 (g̃ᵀDg̃) tr(DH)); relative to isotropic directions (D = I),

    R(D) = [S_D² / (B_D T_D)] / [S² / (B T)],   X_D = Σ_e D_e X_e,

with, per weight e, S_e = (E g)_e² (the full-data gradient, unbiased from k batch gradients),
B_e = E (g̃_e²) (a batch of 16) and T_e the Fisher diagonal, the Gauss-Newton curvature of the
cross-entropy over the candidates (labels drawn from the model, one backward per batch with
random signs per example; on a multiple-choice task such as COPA the candidates are each example's
options, so the loss measured is ``--objective choice``'s, not MeZO's LM loss of the gold option).
R is invariant to D's scale, so it compares methods each at its own best lr, as the protocol
does. It is a one-step, fixed-point model: statistics at the given weights, no depletion of the
gradient over a run, ε → 0.

Also printed: isotropic ZO's own best one-step loss decrease, S² / (2 B T), in loss units: how much
a step at these weights can gain at all (``--head-from RUN`` measures at the head start a run
recorded, where the label rows are already fitted; on the examples ZO trains on, which with
``--head-share`` are those the probe did not see). ``--at RUN:STEP`` measures at a run's weights
after STEP of its steps, rebuilt from its trajectory (full-parameter or peft adapters: the blocks
are the run's trainable ones): how much a shaping could still buy along a fine-tune, where a fixed
allocation made at θ₀ may no longer fit. A block with no curvature (LoRA's A at B = 0) is held.

Printed: R for the block_scales files in bench/results/oracle (one made for a magnitude mask, on
that mask), for curvature-aware per-block allocations σ_b² ∝ (S_b / T_b)^α (clipped ×10 around
the median; written to ``--out`` as block_scales files), for the best per-block D found by direct maximisation of R
(the per-block ceiling at these weights), for the best per-block update multiplier apart from σ
(alone and with D), for Sparse MeZO's magnitude masks, and for a scale on the label words' output
rows, with their share of S, B and T.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from zoft.block_scales import read_block_scales, read_scales_file, save_block_scales  # noqa: E402
from zoft.blocks import collect_blocks  # noqa: E402
from zoft.data import candidate_token_ids  # noqa: E402
from zoft.errors import ZoftError  # noqa: E402
from zoft.finetune import rebuilt_model  # noqa: E402
from zoft.head import HeadStart  # noqa: E402
from zoft.models import DEFAULT_MODEL, load_model  # noqa: E402
from zoft.tasks import get_task  # noqa: E402

from meta_train.allocation import allocation, block_sums, mask_of, statistics as weight_statistics  # noqa: E402
from oracle_scales import module_type  # noqa: E402  (bench/, the script's own folder)

ALPHAS = (0.5, 1.0, 2.0)
MASK_FRACTIONS = (0.1, 0.25, 0.5)
GAMMAS = (0.5, 1.0, 2.0)


def gain(S_D: torch.Tensor, B_D: torch.Tensor, T_D: torch.Tensor, ref: tuple) -> torch.Tensor:
    S, B, T = ref
    return (S_D**2 / (B_D * T_D)) / (S**2 / (B * T))


def shaping_score(S_D, B_D, T_D, energy_share, ref: tuple) -> tuple[float, float | None]:
    """(R, its best lr ÷ SPSA's once u is rescaled to ‖u‖² = d; ``energy_share`` = Σ_e D_e / d).
    A D that perturbs no weight with a gradient (a magnitude shape on LoRA's B = 0) gains nothing
    at any lr: R 0, no lr."""
    if B_D == 0:
        return 0.0, None
    S, B, T = ref
    return float(gain(S_D, B_D, T_D, ref)), float((S_D / (B_D * T_D)) / (S / (B * T)) * energy_share)


def best_block_weights(s, b, t, ref, spread: float = 10.0, iters: int = 3000, scale: bool = True,
                       multiplier: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax R over a per-block D (σ_b², with ``scale``) and a per-block update multiplier M (with
    ``multiplier``), each in [1/spread, spread] (Adam on a tanh parametrisation): the per-block
    ceiling. Unbounded, R's maximum sits on one small block, where the high-dimension
    approximation and a fixed gradient are both worst.

    M moves block b by -η M_b ĝ_b apart from σ (DiZO's and HiZOO's lever): the expected step is
    M D g while the noise in ĝ's coefficient depends on D alone, so a step gains
    (Σ D M S)² / ((Σ D B)(Σ D M² T))."""
    x = torch.zeros(2, len(s), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)

    def weights():
        d, m = spread ** torch.tanh(x)
        return (d if scale else torch.ones_like(d)), (m if multiplier else torch.ones_like(m))

    for _ in range(iters):
        d, m = weights()
        loss = -gain((d * m) @ s, d @ b, (d * m * m) @ t, ref).log()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tuple(w.detach() for w in weights())


def signal_spread(batches: int) -> float:
    """The standard error of S/B from ``batches`` batch gradients: S averages the k(k-1) products
    g_iᵀg_j (i ≠ j), each of spread ≈ B."""
    return (2 / (batches * (batches - 1))) ** 0.5


def shown(value, spec: str) -> str:
    """A figure, or – where there is none (no signal to share, no lr for a step that cannot gain)."""
    return "–" if value is None else format(value, spec)


def head_start(run: Path) -> HeadStart:
    """The label rows a run started from, from its trajectory (finished) or checkpoint (partial)."""
    from safetensors.torch import load_file

    files = [run / "trajectory.safetensors", run / "checkpoint.safetensors"]
    found = next((f for f in files if f.is_file()), None)
    head = HeadStart.from_tensors(load_file(str(found))) if found else None
    if head is None:
        raise SystemExit(f"{run}: no recorded head start (a run with --head-init probe)")
    return head


def file_mask(path: Path) -> dict | None:
    """The magnitude mask a block_scales file was made for (``zoft meta-allocate --fraction``), if any."""
    try:
        return json.loads(read_scales_file(path)[0].get("note") or "{}").get("mask")
    except (json.JSONDecodeError, AttributeError):  # a file whose note is free text
        return None


def at_run_step(args) -> tuple[str, int] | None:
    """--at RUN:STEP as (RUN, STEP), or None without it."""
    if not args.at:
        return None
    run, _, step = args.at.rpartition(":")
    return run, int(step)


def source_run(args) -> Path | None:
    """The run whose weights (--at) or head start (--head-from) are measured, if any."""
    run = args.head_from or (at_run_step(args) or ("",))[0]
    return Path(run) if run else None


def zo_skip(run: Path | None, task: str) -> int:
    """How many of the training sample's first examples ZO does not train on: with a run whose
    probe saw a share of them (--head-share), the statistics are those of ZO's part."""
    if run is None:
        return 0
    config = json.loads((run / "config.json").read_text())
    if (config["task"], config["num_train"], config["data_seed"]) != (task, 1000, 0):
        raise SystemExit(f"{run} is not a run on the protocol's {task} sample (1000 train, data seed 0)")
    return config["num_train"] - config["split_sizes"]["train"]


def weights_label(args) -> str:
    if args.at:
        run, step = at_run_step(args)
        return f"{run} after {step} steps"
    return f"{args.model} + the head start of {args.head_from}" if args.head_from else args.model


def load_weights(args):
    """(model, tokenizer) at the weights to measure."""
    if args.at:
        model, tokenizer, _, _ = rebuilt_model(*at_run_step(args))
    else:
        model, tokenizer = load_model(args.model)
        if args.head_from:
            head_start(Path(args.head_from)).apply(model)
    model.eval()
    return model, tokenizer


def load_or_measure(args):
    """(model, blocks, S, B, T); with ``--stats``, the per-weight statistics are read from that
    file when it exists (written there otherwise), so new shapings are scored without backward passes."""
    from safetensors.torch import load_file, save_file

    model, tokenizer = load_weights(args)
    if args.stats and Path(args.stats).is_file():
        from safetensors import safe_open

        with safe_open(args.stats, framework="pt") as f:
            made = f.metadata()
        if (made.get("model"), made.get("task", "tweets")) != (weights_label(args), args.task):
            raise SystemExit(f"{args.stats} holds statistics of {made.get('model')} on {made.get('task', 'tweets')}")
        saved = load_file(args.stats)
        blocks = collect_blocks(model)
        return model, tokenizer, blocks, *([saved[f"{k}/{b.name}"] for b in blocks] for k in "SBT")
    blocks, (S, B, T) = weight_statistics(model, tokenizer, args.task, args.data_dir, args.batches, skip=zo_skip(source_run(args), args.task))
    if args.stats:
        save_file({f"{k}/{b.name}": x[i].contiguous() for k, x in zip("SBT", (S, B, T)) for i, b in enumerate(blocks)},
                  args.stats, metadata={"model": weights_label(args), "task": args.task, "batches": str(args.batches)})
    return model, tokenizer, blocks, S, B, T


def label_row_scores(model, tokenizer, task: str, blocks, S, B, T, scored) -> tuple[dict, dict]:
    """({label: (R, lr ratio)}, {S, B, T: the label rows' share}) for a scale on the label words'
    output rows (the rest isotropic) and for those rows alone: the shaping a tuner could learn from
    any classification task, since every such task has label rows. Empty where the output embedding
    is not a trainable block (peft adapters)."""
    cand = candidate_token_ids(get_task(task), tokenizer)
    weight = model.get_output_embeddings().weight
    head = next((i for i, blk in enumerate(blocks) if blk.param is weight), None)
    if cand is None or head is None:
        return {}, {}
    row_sums = [X[head].view(-1, blocks[head].row_len)[cand].double().sum() for X in (S, B, T)]
    totals = [torch.stack([x.double().sum() for x in X]).sum() for X in (S, B, T)]
    size, numel = cand.numel() * blocks[head].row_len, float(sum(blk.numel for blk in blocks))
    rows = {}
    for k in (10.0, 100.0, 1000.0):  # σ² of the label rows × k
        rows[f"label rows σ² ×{k:g}, the rest isotropic"] = scored(
            *(t + (k - 1) * r for t, r in zip(totals, row_sums)), torch.tensor(numel + (k - 1) * size, dtype=torch.float64))
    rows["label rows alone"] = scored(*row_sums, torch.tensor(float(size), dtype=torch.float64))
    return rows, {k: float(r / t) for k, r, t in zip("SBT", row_sums, totals)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="weights to measure at (default: the base model)")
    ap.add_argument("--head-from", default="", help="measure with the head start this run recorded (--head-init probe)")
    ap.add_argument("--at", default="", help="RUN:STEP, measure at a run's weights after STEP steps (its blocks)")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--task", default="tweets", help="the oracle's task; a meta-training task (rte) to pick a design")
    ap.add_argument("--data-dir", default=None, help="where SuperGLUE files are (../shared/data)")
    ap.add_argument("--stats", default="", help="cache of the per-weight statistics (safetensors, ~1.6 GB)")
    ap.add_argument("--oracle-dir", default="bench/results/oracle", help="block_scales files to score")
    ap.add_argument("--out", default="", help="write the curvature-aware allocations here")
    ap.add_argument("--json", default="", help="write the figures here too")
    args = ap.parse_args(argv)
    if args.at and (args.head_from or args.model != DEFAULT_MODEL):
        ap.error("--at measures at a run's own weights: not with --head-from or --model")
    torch.manual_seed(0)
    model, tokenizer, blocks, S, B, T = load_or_measure(args)
    s, b, t = (torch.stack([x.double().sum() for x in X]) for X in (S, B, T))
    ref = (s.sum(), b.sum(), t.sum())
    rows = {}  # label -> (R, best lr relative to isotropic at equal ‖u‖²)
    numel = torch.tensor([float(blk.numel) for blk in blocks], dtype=torch.float64)

    def scored(sd, bd, td, energy):
        return shaping_score(sd, bd, td, energy / numel.sum(), ref)

    def block_gain_of(d, s, b, t, energy=numel):
        d = d.double()
        return scored(d @ s, d @ b, d @ t, d @ energy)

    def block_gain(d):
        return block_gain_of(d, s, b, t)

    def shaped_sums(weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-block S, B, T and energy Σ d_e under a within-block shape d (a mask, say)."""
        return [block_sums(X, weights) for X in (S, B, T)] + [block_sums(weights)]

    def elementwise_gain(weights):
        return scored(*(x.sum() for x in shaped_sums(weights)))

    magnitudes = [blk.param.detach().abs().view(-1).float() for blk in blocks]

    for f in sorted(Path(args.oracle_dir).glob("*.safetensors")):
        try:  # the files made for these blocks, names and shapes
            sigma = torch.tensor(read_block_scales(str(f), blocks, batch_size=16), dtype=torch.float64)
        except ZoftError:
            continue
        mask = file_mask(f)
        if mask is None:
            rows[f"file {f.stem}"] = block_gain(sigma**2)
        else:  # made for --perturbation scaled_mask: its scales apply to the weights its mask keeps
            sums = shaped_sums(mask_of(blocks, mask["fraction"], mask["keep"]))
            rows[f"file {f.stem}, on its mask"] = block_gain_of(sigma**2, *sums)
    flat = t == 0  # no curvature: the loss does not depend on the block (LoRA's A at B = 0)
    ratio = torch.where(flat, 0.0, s.clamp(min=0) / t.clamp(min=1e-300))
    held = torch.tensor([blk.is_embedding or blk.param.dim() < 2 for blk in blocks])
    for alpha in ALPHAS:
        var = allocation([ratio], alpha, spread=10.0, held=flat) ** 2
        rows[f"σ² ∝ (S/T)^{alpha:g}, all"] = block_gain(var)
        if held.any():
            matrices = var.clone()
            matrices[held] = var[~flat].median()
            rows[f"σ² ∝ (S/T)^{alpha:g}, matrices"] = block_gain(matrices)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            save_block_scales(Path(args.out) / f"curv-all-a{alpha:g}.safetensors", blocks, var.sqrt(),
                              note=f"sigma^2 ~ (S_b/T_b)^{alpha:g} (gradient^2 over Fisher trace), clipped x10"
                                   f" around the median; {weights_label(args)}, {args.task}, {args.batches} batches of 16")
    best, _ = best_block_weights(s, b, t, ref)
    rows["best per-block D within ×10 (ceiling)"] = block_gain(best)
    for label, scale in (("", False), ("D and ", True)):
        d, m = best_block_weights(s, b, t, ref, scale=scale, multiplier=True)
        rows[f"best per-block {label}update multiplier M within ×10"] = scored(
            (d * m) @ s, d @ b, (d * m * m) @ t, d @ numel)

    for frac in MASK_FRACTIONS:  # the masks the magnitude_mask piece makes
        for keep in ("smallest", "largest"):
            rows[f"mask: {keep} {frac:g} of each block"] = elementwise_gain(mask_of(blocks, frac, keep))
    for gamma in GAMMAS:  # per-block mean of d is 1: only the split within a block changes
        rows[f"D ∝ |θ|^{gamma:g} (relative perturbation)"] = elementwise_gain(
            [w.pow(gamma) / w.pow(gamma).mean().clamp(min=1e-30) for w in magnitudes])
    # per-block σ on top of a within-block shape: the ceiling of a tuner that outputs both
    shapes = {"largest 0.1": mask_of(blocks, 0.1, "largest"), "|θ|^1": [w / w.mean().clamp(min=1e-30) for w in magnitudes]}
    for name, weights in shapes.items():
        sums = shaped_sums(weights)
        # a shape that keeps no weight with a gradient gains nothing whatever the per-block scale
        best_on_shape = best_block_weights(*sums[:3], ref)[0] if sums[1].sum() > 0 else torch.ones_like(sums[1])
        rows[f"best per-block D within ×10, on {name}"] = block_gain_of(best_on_shape, *sums)
    label_rows, label_shares = label_row_scores(model, tokenizer, args.task, blocks, S, B, T, scored)
    rows.update(label_rows)
    signal = float(ref[0] / ref[1])  # ‖E g‖² / E‖g̃‖²: near 0, the batch gradient is almost all noise
    spread = signal_spread(args.batches)
    step_gain = float(ref[0] ** 2 / (2 * ref[1] * ref[2]))
    print(f"weights: {weights_label(args)}; {args.batches} batches of 16 {args.task} examples;"
          f" signal fraction S/B = {signal:.4f} ± {spread:.3f}; SPSA's best one-step loss decrease"
          f" S²/(2BT) = {step_gain:.3g}\n")
    if signal < 2 * spread:  # R divides by S²: without a measurable signal it is a ratio of noise
        print("The signal is within two standard errors of 0: the batch gradient is mostly noise here, no"
              " direction shaping has a measured signal to shape, and R is not reported.")
        rows = {}
    print("| direction shaping | predicted gain per step R | its best lr ÷ SPSA's (at ‖u‖² = d) |\n|---|---|---|"
          * bool(rows))
    for label, (r, lr) in rows.items():
        print(f"| {label} | {r:.3f} | {shown(lr, '.2f')} |")
    if label_shares:
        print(f"\nThe label rows hold {' / '.join(f'{label_shares[k]:.3f}' for k in 'SBT')} of S / B / T.")
    kinds = sorted({module_type(blk.name) for blk in blocks})

    def share(x):  # None where the total is 0 (no measured signal at all)
        return {k: float(sum(v for blk, v in zip(blocks, x) if module_type(blk.name) == k) / x.sum()) if x.sum() > 0 else None
                for k in kinds}

    print("\n| module type | share of S | share of B | share of T | median S_b/T_b ÷ overall | best D share |")
    print("|---|---|---|---|---|---|")
    shares = {name: share(x) for name, x in (("S", s.clamp(min=0)), ("B", b), ("T", t), ("D", best * t))}
    overall = float(s.sum() / t.sum())
    for k in kinds:
        med = statistics.median(float(r) for blk, r in zip(blocks, ratio) if module_type(blk.name) == k) / overall
        print(f"| {k} | {' | '.join(shown(shares[x][k], '.3f') for x in 'SBT')} | {med:.3g} | {shown(shares['D'][k], '.3f')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": weights_label(args), "task": args.task, "batches": args.batches, "signal_fraction": signal,
                                               "step_gain": step_gain, "gain": rows, "label_row_shares": label_shares,
                                               "shares": shares}, indent=1) + "\n")


if __name__ == "__main__":
    main()
