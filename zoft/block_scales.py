"""A fixed per-block scale σ_b read from a file: the ceiling study's oracle allocations (and any
hand-made one) through the same engine as the learned tuner.

The file is safetensors with one tensor ``sigma`` [num_blocks] and the block names in its header
(checked against the model's). σ is normalised as the tuner's is, Σ_b d̃_b (cσ_b)² = Σ_b d̃_b,
so lr and eps keep their meaning and only the split of the perturbation between blocks changes.

A schedule holds K allocations, ``sigma`` [K, num_blocks] and ``from_step`` [K] (0 first, rising):
row k is used from step from_step[k] on. Where a block's signal sits moves during a fine-tune
(ZO-LoRA: on B at the start, on A once B has grown; bench/results/ceiling/README.md), and so does
the step size an allocation stands: an optional ``energy`` [K] normalises row k to energy[k] times
the perturbation energy instead (its steps energy[k] times as large at the same lr, its probes
√energy[k] times as wide).
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


def save_block_scales(path, blocks, sigma: torch.Tensor, note: str = "", from_step: list[int] | None = None,
                      energy: list[float] | None = None):
    """σ [num_blocks], or a schedule: σ [K, num_blocks] with ``from_step`` [K] (and ``energy`` [K])."""
    write_block_scales(path, json.dumps([b.name for b in blocks]), fingerprint(blocks), sigma, note, from_step, energy)


def write_block_scales(path, block_names: str, blocks_fingerprint: str | None, sigma: torch.Tensor, note: str = "",
                       from_step: list[int] | None = None, energy: list[float] | None = None):
    """The file save_block_scales writes, from the header's block list (JSON) and fingerprint (None:
    a file made before fingerprints), through a ``.partial`` file: never half-written under its name."""
    from safetensors.torch import save_file

    tensors = {"sigma": sigma.double().contiguous()}
    if from_step is not None:
        tensors["from_step"] = torch.tensor(from_step, dtype=torch.int64)
    if energy is not None:
        tensors["energy"] = torch.tensor(energy, dtype=torch.float64)
    header = {"blocks": block_names, "note": note}
    if blocks_fingerprint is not None:
        header["fingerprint"] = blocks_fingerprint
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(partial), metadata=header)
    partial.replace(path)


def read_scales_file(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors): sigma, and a schedule's from_step and energy where the file has them."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in ("sigma", "from_step", "energy") if k in f.keys()}
    except Exception as e:
        raise ZoftError(f"cannot read block scales {path}: {e}") from None


def find_shipped_allocation(blocks) -> Path | None:
    """The shipped allocation (pretrained_tuners/*/allocation*.safetensors) made for exactly these
    blocks, names and shapes: one for the full model, one for its LoRA adapters."""
    want = fingerprint(blocks)
    shipped = shipped_tuners("allocation*.safetensors")
    return next((p for p in shipped if (read_scales_file(p)[0] or {}).get("fingerprint") == want), None)


def resolve_scales_file(choice: str, blocks) -> str:
    """``auto``: the shipped allocation for these blocks (an error when none is); else the path."""
    if choice != "auto":
        return choice
    found = find_shipped_allocation(blocks)
    if found is None:
        raise ZoftError("--scales-file auto: no allocation ships for this model with these blocks "
                        "(make one with zoft meta-allocate)")
    return str(found)


def read_scale_schedule(path: str, blocks, batch_size: int) -> list[tuple[int, list[float]]]:
    """[(from_step, σ [num_blocks])] from a block_scales file (or ``auto``), checked against the
    blocks and each row normalised; a one-allocation file is one row from step 0."""
    path = resolve_scales_file(path, blocks)
    meta, tensors = read_scales_file(path)
    if "sigma" not in tensors:
        raise ZoftError(f"cannot read block scales {path}: it has no sigma")
    sigma, from_step = tensors["sigma"], tensors.get("from_step")
    try:
        names = json.loads(meta["blocks"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ZoftError(f"cannot read block scales {path}: its header has no block list") from None
    # the names alone match every model of one family and depth; the shapes (files written since
    # carry them) tell the models apart
    if names != [b.name for b in blocks] or meta.get("fingerprint", fingerprint(blocks)) != fingerprint(blocks):
        raise ZoftError(f"{path} was made for other blocks than this model's")
    if sigma.dim() == 1 and from_step is None:  # one allocation: a schedule of one row
        sigma, from_step = sigma[None], torch.zeros(1, dtype=torch.int64)
    if sigma.dim() != 2 or sigma.shape[1] != len(blocks):
        raise ZoftError(f"{path}: sigma has shape {list(sigma.shape)}, not one value per block ({len(blocks)})")
    starts = [] if from_step is None else from_step.tolist()
    if len(starts) != len(sigma) or starts[:1] != [0] or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ZoftError(f"{path}: a schedule needs from_step, one rising step per row of sigma, starting at 0"
                        f" (got {starts} for {len(sigma)} rows)")
    energy = tensors.get("energy", torch.ones(len(sigma), dtype=torch.float64)).double()
    if energy.shape != (len(sigma),) or not bool(((energy > 0) & energy.isfinite()).all()):
        raise ZoftError(f"{path}: energy must be one positive number per row of sigma, got {energy.tolist()}")
    normaliser = LearnedScale(LearnedScaleConfig(batch_size=batch_size), net=torch.nn.Identity())
    normaliser.dims = torch.tensor([normaliser._dim(b) for b in blocks], dtype=torch.float64)
    return [(start, (normaliser.normalised(row) * e.sqrt()).tolist()) for start, row, e in zip(starts, sigma, energy)]


def read_block_scales(path: str, blocks, batch_size: int) -> list[float]:
    """σ [num_blocks] of a one-allocation block_scales file (or ``auto``), checked and normalised."""
    schedule = read_scale_schedule(path, blocks, batch_size)
    if len(schedule) > 1:
        raise ZoftError(f"{path} holds a schedule of {len(schedule)} allocations, not one")
    return schedule[0][1]


class ScaleSchedule:
    """σ per block from a block_scales file, switching rows at their steps: the scales of
    ``block_scales`` and ``scaled_mask`` alike (their configs hold scales_file and batch_size)."""

    def read_schedule(self, blocks):
        self.schedule = read_scale_schedule(self.cfg.scales_file, blocks, self.cfg.batch_size)

    def scales(self, blocks, state, *, step: int = 0, **context):
        # the last row that starts at or before this step
        return next(row for start, row in reversed(self.schedule) if start <= step), state


@register("perturbation", "block_scales", BlockScalesConfig)
class BlockScales(ScaleSchedule, Isotropic):
    name = "block_scales"

    def init(self, blocks):
        self.read_schedule(blocks)
        return None
