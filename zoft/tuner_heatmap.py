"""What a tuner learned, as a picture: its effective scales cσ_b as a heatmap of layer × module
type, with the blocks outside the layers (embedding, final norm) in a row of their own.

    zoft tuner-heatmap pretrained_tuners/smollm2-135m-instruct --out scales.png

The tuner runs as in fine-tuning (batch 16, the model's own block statistics) for a few steps
with both previous losses at 0.7, about a two-class cross-entropy at the start, so that σ_prev
settles; 1 is MeZO's isotropic perturbation, and the colour scale is logarithmic around it. A
block the tuner holds (σ 0) is left blank.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from zoft.errors import ZoftError

_LAYER = re.compile(r"\.layers?\.(\d+)\.(.+)\.weight$")
_LORA = re.compile(r"(\w+)\.(lora_[AB])\.\w+$")  # peft's q_proj.lora_A.<adapter name>


def _kind(path: str) -> str:
    """A block's column: its module (q_proj), or the module and LoRA factor (q_proj.lora_A)."""
    lora = _LORA.search(path)
    return f"{lora.group(1)}.{lora.group(2)}" if lora else path.split(".")[-1]


def effective_scales(tuner_path, model, steps: int = 5) -> tuple[list, list[float]]:
    """(blocks, cσ per block) of a tuner on the model it was made for."""
    from zoft.blocks import collect_blocks
    from zoft.perturbations import LearnedScale, LearnedScaleConfig

    blocks = collect_blocks(model)
    learned = LearnedScale(LearnedScaleConfig(path=str(tuner_path), batch_size=16))
    state = learned.init(blocks)
    for _ in range(steps):
        scales, state = learned.scales(blocks, state, prev_losses=(0.7, 0.7))
    return blocks, scales


def _log10(scale: float) -> float:
    return math.log10(scale) if scale > 0 else math.nan  # a held block: a blank cell


def draw(blocks, scales: list[float], out: Path, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    inside = [(int(m.group(1)), _kind(m.group(2)), s) for b, s in zip(blocks, scales)
              if (m := _LAYER.search(b.name))]
    outside = [(b.name.rsplit(".", 1)[0].split(".")[-1], s) for b, s in zip(blocks, scales) if not _LAYER.search(b.name)]
    if not inside:
        raise ZoftError("the model's blocks are not named by layer (.layers.N.); nothing to draw")
    kinds = sorted({k for _, k, _ in inside})
    layers = max(i for i, _, _ in inside) + 1
    grid = np.full((layers, len(kinds)), np.nan)
    for i, kind, s in inside:
        grid[i, kinds.index(kind)] = _log10(s)
    limit = max(0.3, *(abs(_log10(s)) for s in scales if s > 0))
    if outside:
        fig, (top, main) = plt.subplots(2, 1, figsize=(1 + 0.7 * len(kinds), 2 + 0.18 * layers),
                                        gridspec_kw={"height_ratios": [1, max(3, layers // 3)]})
        top.imshow([[_log10(s) for _, s in outside]], cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
        top.set_xticks(range(len(outside)), [n for n, _ in outside], rotation=30, fontsize=7)
        top.set_yticks([])
    else:  # adapters only (LoRA): every block is in a layer
        fig, main = plt.subplots(figsize=(1 + 0.7 * len(kinds), 1.5 + 0.18 * layers))
        top = main
    top.set_title(title or "effective scale cσ (log10; 0 = isotropic; blank = held)", fontsize=9)
    image = main.imshow(grid, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
    main.set_xticks(range(len(kinds)), kinds, rotation=30, fontsize=7)
    main.set_ylabel("layer")
    fig.colorbar(image, ax=main, label="log10 cσ")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    except OSError as e:
        raise ZoftError(f"cannot write the heatmap to {out} ({e.strerror or e})") from None
    finally:
        plt.close(fig)
