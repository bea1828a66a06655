"""The learned perturbation tuner (ZO Fine-tuner, arXiv 2510.00419): its network and artifact.

One small MLP per block, 5 → 64 → tanh → 1 → |·|, maps the block's features
[mean(θ_b), var(θ_b), L⁺_{t−1}, L⁻_{t−1}, σ_{b,t−1}] to its perturbation scale σ_b. All blocks
are evaluated at once as batched matrix products over stacked weights w1 [n,64,5], b1 [n,64],
w2 [n,1,64], b2 [n,1]: one call per step, not n module calls.

A tuner may hold blocks: their σ is 0 whatever the network says (with LoRA, the A blocks at
B = 0, where the loss does not depend on them to first order and a step along them is noise).

The artifact is one safetensors file whose header metadata is the source of truth: format,
ordered block names and shapes (their hash is the fingerprint checked at load time), feature
order, hidden size, the held blocks, the effective-dimension rule, base model, estimator and
meta-training config.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from zoft.errors import ZoftError

FORMAT = "zoft-tuner-1"
FEATURES = ("mean", "var", "loss_plus_prev", "loss_minus_prev", "sigma_prev")
HIDDEN = 64
TENSORS = ("w1", "b1", "w2", "b2")


class BlockMLPs(nn.Module):
    """n independent MLPs (no weight sharing), evaluated together.

    ``start="random"`` is nn.Linear's default initialisation (the reference's): on SmolLM2 its
    σ span 0.004–3.2 across blocks before any training, an arbitrary allocation. ``"isotropic"``
    shrinks the output layer and sets its bias to 1, so σ ≈ 1 for every block at any input:
    meta-training then starts from MeZO's perturbation, and every departure from it is learned.
    ``held`` [n] bool: blocks whose σ is 0 at any input."""

    def __init__(self, num_blocks: int, hidden: int = HIDDEN, seed: int = 0, start: str = "random",
                 held: torch.Tensor | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        features = len(FEATURES)

        def uniform(*shape, fan_in):  # nn.Linear's default initialisation, per block
            bound = 1 / fan_in**0.5
            return nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1) * bound)

        self.w1 = uniform(num_blocks, hidden, features, fan_in=features)
        self.b1 = uniform(num_blocks, hidden, fan_in=features)
        self.w2 = uniform(num_blocks, 1, hidden, fan_in=hidden)
        self.b2 = uniform(num_blocks, 1, fan_in=hidden)
        held = torch.zeros(num_blocks, dtype=torch.bool) if held is None else held.bool()
        if held.shape != (num_blocks,):
            raise ZoftError(f"held must have one flag per block ({num_blocks}), got shape {list(held.shape)}")
        self.register_buffer("free", (~held).float(), persistent=False)  # the header, not the tensors, stores it
        if start == "isotropic":
            self.start_at(torch.ones(num_blocks))
        elif start != "random":
            raise ZoftError(f"tuner start must be random or isotropic, got {start!r}")

    @property
    def held(self) -> torch.Tensor:
        return self.free == 0

    def start_at(self, sigma: torch.Tensor):
        """σ ≈ ``sigma`` at any input: the output layer shrunk, its bias set to it."""
        with torch.no_grad():
            self.w2.mul_(0.01)
            self.b2.copy_(sigma.reshape(self.b2.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, 5] → σ [n]."""
        h = torch.tanh(torch.einsum("nhf,nf->nh", self.w1, x) + self.b1)
        return (torch.einsum("noh,nh->no", self.w2, h) + self.b2).abs().squeeze(-1) * self.free


def fingerprint(blocks) -> str:
    layout = [[b.name, list(b.param.shape)] for b in blocks]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def save_tuner(path, net: BlockMLPs, blocks, meta: dict):
    """Write the artifact atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "blocks": json.dumps([[b.name, list(b.param.shape)] for b in blocks]),
        "fingerprint": fingerprint(blocks),
        "features": json.dumps(FEATURES),
        "hidden": str(net.w1.shape[1]),
        "held": json.dumps([b.name for b, h in zip(blocks, net.held.tolist()) if h]),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: getattr(net, k).detach().float().contiguous() for k in TENSORS}, str(tmp), metadata=header)
    tmp.replace(path)


def _artifact_file(path) -> Path:
    """A tuner is named by its file or by the folder that holds ``tuner.safetensors``."""
    path = Path(path)
    return path / "tuner.safetensors" if path.is_dir() else path


def tuner_digest(path) -> str:
    """The artifact's sha256: what identifies a tuner across checkouts and machines, where its path does not."""
    import hashlib

    return hashlib.sha256(_artifact_file(path).read_bytes()).hexdigest()


def read_tuner(path) -> tuple[dict, dict]:
    """(tensors, metadata) of an artifact; a missing, truncated or foreign file is a ZoftError."""
    from safetensors import SafetensorError, safe_open

    path = _artifact_file(path)
    if not path.is_file():
        raise ZoftError(f"tuner file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ZoftError(f"{path} is not a readable tuner (truncated or corrupt?): {e}") from None
    if meta.get("format") != FORMAT or set(tensors) != set(TENSORS):
        raise ZoftError(f"{path} is not a zoft tuner (format {meta.get('format')!r}, tensors {sorted(tensors)})")
    return tensors, meta


def check_fits(meta: dict, blocks, path="tuner"):
    """The tuner must have been made for these blocks: same names and shapes, in order."""
    if meta.get("fingerprint") == fingerprint(blocks):
        return
    theirs = json.loads(meta["blocks"])
    ours = [[b.name, list(b.param.shape)] for b in blocks]
    base = meta.get("base_model", "another model")
    for i, (t, o) in enumerate(zip(theirs, ours)):
        if t != o:
            raise ZoftError(f"{path} was made for {base}: block {i} is {t[0]} {t[1]} there, "
                            f"{o[0]} {o[1]} in this model")
    raise ZoftError(f"{path} was made for {base}: it has {len(theirs)} blocks, this model {len(ours)}")


def _header_json(meta: dict, key: str, path):
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise ZoftError(f"{path}: the tuner header's {key!r} is missing or not JSON") from None


def load_tuner(path, blocks) -> tuple[BlockMLPs, dict]:
    """The network and header of a tuner made for these blocks. The header is read back, not
    assumed: features this version does not compute, or a hidden size that disagrees with the
    tensors, are refused."""
    tensors, meta = read_tuner(path)
    features = _header_json(meta, "features", path)
    if list(features) != list(FEATURES):
        raise ZoftError(f"{path}: the tuner reads features {features}; this zoft computes {list(FEATURES)}")
    if _header_json(meta, "hidden", path) != tensors["w1"].shape[1]:
        raise ZoftError(f"{path}: header hidden {meta['hidden']} but w1 has {tensors['w1'].shape[1]} units")
    _header_json(meta, "blocks", path)
    check_fits(meta, blocks, path)
    held = set(_header_json(meta, "held", path)) if "held" in meta else set()  # older tuners hold nothing
    if held - {b.name for b in blocks}:
        raise ZoftError(f"{path}: the tuner holds blocks this model does not have: {sorted(held)[:3]}")
    net = BlockMLPs(len(blocks), hidden=tensors["w1"].shape[1], held=torch.tensor([b.name in held for b in blocks]))
    with torch.no_grad():
        for k in TENSORS:
            if getattr(net, k).shape != tensors[k].shape:
                raise ZoftError(f"{path}: tensor {k} has shape {list(tensors[k].shape)}, "
                                f"expected {list(getattr(net, k).shape)}")
            getattr(net, k).copy_(tensors[k])
    return net, meta


def summarise_scales(blocks, scales) -> dict[str, float]:
    """Mean effective scale per layer group ('sigma/layer_07', 'sigma/embed', 'sigma/other'):
    how a tuner spreads the perturbation over depth, compact enough to log."""
    groups: dict[str, list[float]] = {}
    for b, s in zip(blocks, scales):
        layer = re.search(r"layers?\.(\d+)\.", b.name)
        key = f"layer_{int(layer.group(1)):02d}" if layer else ("embed" if b.is_embedding else "other")
        groups.setdefault(f"sigma/{key}", []).append(float(s))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def shipped_tuners(pattern: str = "tuner.safetensors") -> list[Path]:
    """The files named ``pattern`` in pretrained_tuners/*/: beside the package in an install (the
    wheel puts them there), at the repository root in a source checkout."""
    here = Path(__file__).resolve().parent
    return sorted(p for root in (here / "pretrained_tuners", here.parent / "pretrained_tuners")
                  for p in root.glob(f"*/{pattern}"))


def find_shipped(blocks) -> Path | None:
    """The shipped tuner whose fingerprint matches these blocks, if any."""
    want = fingerprint(blocks)
    for path in shipped_tuners():
        try:
            if read_tuner(path)[1].get("fingerprint") == want:
                return path
        except ZoftError:
            continue
    return None
