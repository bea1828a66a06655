"""The trajectory file: a whole fine-tune in kilobytes.

Every term an update applied, (seed, per-block scale), step by step, plus everything that
determines a direction z: the noise source's spec (table seed and size), each block's name,
shape and chunk length, and the method's piece specs (a perturbation may shape z); and, for a
run with a head start (zoft/head.py), the label rows it began from. Replayed onto the starting
weights (``ZOOptimizer.replay``) it rebuilds the fine-tuned weights bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from zoft.errors import ZoftError
from zoft.head import HeadStart
from zoft.noise import noise_spec
from zoft.updates import AppliedStep

FORMAT = "zoft-trajectory-2"


def layout(blocks) -> list:
    return [[b.name, list(b.param.shape), b.chunk_len] for b in blocks]


def to_tensors(steps: list[AppliedStep], num_blocks: int) -> dict[str, torch.Tensor]:
    tensors = {
        "seeds": torch.tensor([s for a in steps for s in a.seeds], dtype=torch.int64),
        "scales": torch.cat([a.scales for a in steps]) if steps else torch.zeros(0, num_blocks, dtype=torch.float64),
        "terms_per_step": torch.tensor([len(a.seeds) for a in steps], dtype=torch.int64),
    }
    if steps and steps[0].decay is not None:
        tensors["decay"] = torch.stack([a.decay for a in steps])
    if steps and steps[0].mix is not None:
        tensors["mix"] = torch.tensor([a.mix for a in steps], dtype=torch.float64)
    return tensors


def from_tensors(tensors: dict[str, torch.Tensor]) -> list[AppliedStep]:
    steps, start = [], 0
    counts = tensors["terms_per_step"].tolist()
    for t, count in enumerate(counts):
        steps.append(AppliedStep(tensors["seeds"][start : start + count].tolist(),
                                 tensors["scales"][start : start + count],
                                 tensors["decay"][t] if "decay" in tensors else None,
                                 float(tensors["mix"][t]) if "mix" in tensors else None))
        start += count
    return steps


def save(path: Path, opt, method: dict, model: str, head: HeadStart | None = None):
    """Write the trajectory, and the head start the run began from if any, atomically (a
    temporary file renamed into place)."""
    meta = {"format": FORMAT, "blocks": json.dumps(layout(opt.blocks)), "noise": json.dumps(noise_spec(opt.noise)),
            "method": json.dumps(method), "seed": str(opt.seed), "directions": str(opt.num_directions),
            "model": model}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({**to_tensors(opt.history, len(opt.blocks)), **(head.tensors() if head else {})}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read(path: Path) -> tuple[list[AppliedStep], dict]:
    """(steps, metadata with its JSON fields parsed and the run's head start under "head", None
    if it had none); a missing or foreign file is a ZoftError."""
    if not Path(path).is_file():
        raise ZoftError(f"trajectory not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ZoftError(f"{path} is not a readable trajectory: {e}") from None
    if meta.get("format") != FORMAT:
        raise ZoftError(f"{path}: trajectory format {meta.get('format')!r}; this zoft reads {FORMAT}")
    for key in ("blocks", "noise", "method"):
        meta[key] = json.loads(meta[key])
    meta["head"] = HeadStart.from_tensors(tensors)
    return from_tensors(tensors), meta


def check_matches(meta: dict, opt, path):
    """The optimizer must make the same directions the trajectory was recorded with."""
    if meta["blocks"] != layout(opt.blocks):
        raise ZoftError(f"{path} was recorded on other trainable tensors (names, shapes or chunking differ)")
    if meta["noise"] != noise_spec(opt.noise):
        raise ZoftError(f"{path} was recorded with noise {meta['noise']}, not {noise_spec(opt.noise)}")
