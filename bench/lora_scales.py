"""A block_scales file for ZO-LoRA that perturbs (and so moves) the B matrices only, or A at a
fraction of B's scale: does the split between A and B matter (issue 11: per-block shaping where ZO
has signal)?

    python bench/lora_scales.py --a 0 --out bench/results/v2/probe_lora_b/b_only.safetensors

peft starts B at zero, where ∇_A L = Bᵀ(∂L/∂W) = 0: a step along A is pure noise, and it grows the
gain of every later step on B (ΔW = ΔB·A), which is how isotropic ZO-LoRA diverges late. With A
held at its random start (LoRA-FA's choice for first-order training), ΔW = ΔB·A is linear in B.
The engine normalises the scales (Σ d̃ σ² fixed), so B's share of the perturbation grows instead.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from zoft.adapters import with_adapters  # noqa: E402
from zoft.block_scales import save_block_scales  # noqa: E402
from zoft.blocks import collect_blocks  # noqa: E402
from zoft.config import FinetuneConfig  # noqa: E402
from zoft.models import DEFAULT_MODEL, load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--a", type=float, default=0.0, help="σ of every lora_A block (B's is 1)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, _ = load_model(args.model)
    blocks = collect_blocks(with_adapters(model, FinetuneConfig(peft="lora"), seed=0))
    kinds = ["lora_A" if ".lora_A." in b.name else "lora_B" if ".lora_B." in b.name else None for b in blocks]
    if None in kinds:
        raise SystemExit(f"not a LoRA block: {blocks[kinds.index(None)].name}")
    sigma = torch.tensor([args.a if k == "lora_A" else 1.0 for k in kinds])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_block_scales(out, blocks, sigma, note=json.dumps({"rule": "LoRA: sigma_A / sigma_B", "a": args.a,
                                                           "base_model": args.model, "peft": "lora r 8, q_proj/v_proj"}))
    print(f"{out}: {kinds.count('lora_B')} B blocks at 1, {kinds.count('lora_A')} A blocks at {args.a:g}")


if __name__ == "__main__":
    main()
