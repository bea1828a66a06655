"""Oracle per-block scales for the ceiling study (issue 11, part 2): what shaping the perturbation
per block can buy at all, before any meta-training.

    python bench/oracle_scales.py [--out bench/results/oracle] [--batches 8]

From first-order statistics of the task itself (gradients of the training loss on batches of
the run's own training sample, tweets, data seed 0, 1000 train / 200 dev as in protocol v2), the
gradient density G_b = E‖∇_b L‖² / d̃_b of every block. Writes one ``block_scales`` file per
allocation, σ_b² ∝ G_b^α clipped to [median/10, median·10]:

- ``all-a{α}``: every block scaled;
- ``matrices-a{α}``: the embedding and the norm weights held at the median, so only the weight
  matrices are scaled (the greedy allocation otherwise puts them at the top of the clip).

Run them with ``zoft finetune --perturbation block_scales --scales-file FILE``
(``bench/grids/v2_ceiling.yaml``). G_b and the allocations are printed per module type.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from meta_train.allocation import protocol_stream  # noqa: E402
from zoft.block_scales import save_block_scales  # noqa: E402
from zoft.blocks import collect_blocks  # noqa: E402
from zoft.models import DEFAULT_MODEL, load_model  # noqa: E402
from zoft.perturbations import LearnedScale, LearnedScaleConfig  # noqa: E402
from zoft.scoring import classification_loss  # noqa: E402

ALPHAS = (0.5, 1.0)


def gradient_density(batches: int, batch_size: int = 16) -> tuple[list, torch.Tensor]:
    model, tokenizer = load_model(DEFAULT_MODEL)
    cand, stream = protocol_stream(tokenizer, "tweets", batch_size=batch_size)
    blocks = collect_blocks(model)
    squares = torch.zeros(len(blocks), dtype=torch.float64)
    for _ in range(batches):
        model.zero_grad(set_to_none=True)
        classification_loss(model, next(stream), cand).backward()
        squares += torch.stack([b.param.grad.double().pow(2).sum() for b in blocks]) / batches
    dims = LearnedScale(LearnedScaleConfig(batch_size=batch_size), net=torch.nn.Identity())
    d = torch.tensor([dims._dim(b) for b in blocks], dtype=torch.float64)
    return blocks, squares / d


def allocation(blocks, density: torch.Tensor, alpha: float, matrices_only: bool) -> torch.Tensor:
    var = density**alpha
    median = var.median()
    var = var.clamp(median / 10, median * 10)
    if matrices_only:
        held = torch.tensor([b.is_embedding or b.param.dim() < 2 for b in blocks])
        var[held] = median
    return var.sqrt()


def module_type(name: str) -> str:
    """q_proj for a model's weight, q_proj.lora_A for peft's adapter on it."""
    m = re.search(r"\.(\w+?)(\.lora_[AB]\.\w+)?\.weight$", name)
    if not m:
        return name
    return m.group(1) + (m.group(2).rsplit(".", 1)[0] if m.group(2) else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/oracle")
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    blocks, density = gradient_density(args.batches)
    kinds = sorted({module_type(b.name) for b in blocks})
    print("| allocation | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    rows = {"G_b / median": density / density.median()}
    for alpha in ALPHAS:
        for matrices_only in (False, True):
            name = f"{'matrices' if matrices_only else 'all'}-a{alpha:g}"
            sigma = allocation(blocks, density, alpha, matrices_only)
            save_block_scales(out / f"{name}.safetensors", blocks, sigma,
                              note=f"sigma^2 ~ (|grad_b|^2/d_b)^{alpha:g}, clipped x10 around the median;"
                                   f" tweets, {args.batches} batches of 16" + ("; embedding, norms at median" * matrices_only))
            rows[f"σ {name} / median"] = sigma / sigma.median()
    for label, values in rows.items():
        cells = [statistics.median(float(v) for b, v in zip(blocks, values) if module_type(b.name) == k) for k in kinds]
        print(f"| {label} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")


if __name__ == "__main__":
    main()
