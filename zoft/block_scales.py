"""A fixed per-block scale σ_b read from a file: the ceiling study's oracle allocations (and any
hand-made one) through the same engine as the learned tuner.

The file is safetensors with one tensor ``sigma`` [num_blocks] and the block names in its header
(checked against the model's). σ is normalised as the tuner's is, Σ_b d̃_b (cσ_b)² = Σ_b d̃_b,
so lr and eps keep their meaning and only the split of the perturbation between blocks changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zoft.errors import ZoftError
from zoft.perturbations import Isotropic, LearnedScale, LearnedScaleConfig
from zoft.registry import register
from zoft.tuner import fingerprint, shipped_tuners


@dataclass
class BlockScalesConfig:
    scales_file: str = field(default="", metadata={
        "help": "block_scales: safetensors file with sigma [num_blocks], or auto (the allocation shipped for these blocks)"})
    batch_size: int = 16  # the fine-tune's, for the effective dimension of an embedding

    def __post_init__(self):
        if not self.scales_file:
            raise ZoftError("this perturbation needs --scales-file (a block_scales file; zoft meta-allocate writes one)")


def save_block_scales(path, blocks, sigma: torch.Tensor, note: str = ""):
    from safetensors.torch import save_file

    save_file({"sigma": sigma.double().contiguous()}, str(path),
              metadata={"blocks": json.dumps([b.name for b in blocks]), "fingerprint": fingerprint(blocks), "note": note})


def _read(path) -> tuple[dict, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata(), f.get_tensor("sigma")
    except Exception as e:
        raise ZoftError(f"cannot read block scales {path}: {e}") from None


def find_shipped_allocation(blocks) -> Path | None:
    """The shipped allocation (pretrained_tuners/*/allocation*.safetensors) made for exactly these
    blocks, names and shapes: one for the full model, one for its LoRA adapters."""
    want = fingerprint(blocks)
    return next((p for p in shipped_tuners("allocation*.safetensors") if (_read(p)[0] or {}).get("fingerprint") == want),
                None)


def resolve_scales_file(choice: str, blocks) -> str:
    """``auto``: the shipped allocation for these blocks (an error when none is); else the path."""
    if choice != "auto":
        return choice
    found = find_shipped_allocation(blocks)
    if found is None:
        raise ZoftError("--scales-file auto: no allocation ships for this model with these blocks "
                        "(make one with zoft meta-allocate)")
    return str(found)


def read_block_scales(path: str, blocks, batch_size: int) -> list[float]:
    """σ [num_blocks] from a block_scales file (or ``auto``), checked against the blocks and normalised."""
    path = resolve_scales_file(path, blocks)
    meta, sigma = _read(path)
    try:
        names = json.loads(meta["blocks"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ZoftError(f"cannot read block scales {path}: its header has no block list") from None
    # the names alone match every model of one family and depth; the shapes (files written since
    # carry them) tell the models apart
    if names != [b.name for b in blocks] or meta.get("fingerprint", fingerprint(blocks)) != fingerprint(blocks):
        raise ZoftError(f"{path} was made for other blocks than this model's")
    if sigma.shape != (len(blocks),):
        raise ZoftError(f"{path}: sigma has shape {list(sigma.shape)}, not one value per block ({len(blocks)})")
    normaliser = LearnedScale(LearnedScaleConfig(batch_size=batch_size), net=torch.nn.Identity())
    normaliser.dims = torch.tensor([normaliser._dim(b) for b in blocks], dtype=torch.float64)
    return normaliser.normalised(sigma).tolist()


@register("perturbation", "block_scales", BlockScalesConfig)
class BlockScales(Isotropic):
    name = "block_scales"

    def init(self, blocks):
        self.sigma = read_block_scales(self.cfg.scales_file, blocks, self.cfg.batch_size)
        return None

    def scales(self, blocks, state, **context):
        return self.sigma, state
