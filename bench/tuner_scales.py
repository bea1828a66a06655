"""What a tuner learned: its effective scales cσ_b by kind of block, on the model it was made for.

    python bench/tuner_scales.py [--tuner pretrained_tuners/smollm2-135m-instruct] [--model smollm2-135m]

The tuner runs as in fine-tuning (batch 16, the model's own block statistics) for a few steps
with both previous losses at 0.7, about a two-class cross-entropy at the start, so that σ_prev
settles; a scale of 1 is MeZO's isotropic perturbation.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zoft.models import DEFAULT_MODEL, load_model  # noqa: E402
from zoft.tuner_heatmap import effective_scales  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuner", default=str(ROOT / "pretrained_tuners" / "smollm2-135m-instruct"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    args = ap.parse_args()
    model, _ = load_model(args.model)
    blocks, scales = effective_scales(args.tuner, model)
    kinds: dict[str, list[float]] = {}
    for b, s in zip(blocks, scales):
        kind = b.name.rsplit(".", 2)[-2] if ".layers." in b.name else b.name
        kinds.setdefault(kind, []).append(s)
    print("| block | blocks | median scale | min | max |\n|---|---|---|---|---|")
    for kind, values in kinds.items():
        print(f"| {kind} | {len(values)} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    depth: dict[int, list[float]] = {}
    for b, s in zip(blocks, scales):
        layer = re.search(r"\.layers\.(\d+)\.", b.name)
        if layer:
            depth.setdefault(int(layer.group(1)) * 3 // (1 + max_layer(blocks)), []).append(s)
    print("\nmedian scale by depth (thirds of the layers): "
          + ", ".join(f"{statistics.median(v):.2f}" for _, v in sorted(depth.items())))


def max_layer(blocks) -> int:
    return max(int(m.group(1)) for b in blocks if (m := re.search(r"\.layers\.(\d+)\.", b.name)))


if __name__ == "__main__":
    main()
