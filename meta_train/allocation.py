"""``zoft meta-allocate``: a base model's per-block perturbation allocation, computed once from its
meta-training tasks and used on every later fine-tune through ``--perturbation block_scales``.

ZO-SGD along u = D^½ z gains, per step at its own best lr, (gᵀDg)² / ((g̃ᵀDg̃)·tr(DH)) (g the
full-data gradient, g̃ a batch's, H the curvature; bench/ceiling_predict.py derives it). A block
is worth perturbing in proportion to its gradient signal per unit of curvature, S_b / T_b, with
S_b = ‖E ∇_b L‖² (unbiased from k batch gradients) and T_b the Fisher trace (the Gauss-Newton
curvature of the cross-entropy over the candidates). The allocation is σ_b² ∝ r_b^α with r_b the
geometric mean over tasks of each task's S_b/T_b relative to its own overall S/T, clipped to ×10
around the median. Unlike a one-step look-ahead on the loss (σ_b ∝ ‖∇_b L‖², which sends the
embedding and norm weights to the top of any clip and diverges), the curvature term keeps
sharply curved blocks down.

With ``--peft lora`` the blocks are the adapters the fine-tune will perturb. peft starts B at zero,
where every A block's gradient and Fisher trace are exactly zero on every batch: the loss does not
depend on A to first order, a ZO step along it is pure noise that grows the gain of every later
step on B, and isotropic ZO-LoRA diverges late from it (README, "ZO-LoRA after the head start").
A block whose Fisher trace is zero on every task is therefore held (σ 0), and the clip's median
is taken over the others.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from zoft.adapters import with_adapters
from zoft.block_scales import save_block_scales
from zoft.blocks import collect_blocks
from zoft.data import Batches, candidate_token_ids, collate, encode
from zoft.errors import ZoftError
from zoft.magnitude_mask import MagnitudeMask, MagnitudeMaskConfig
from zoft.config import AdapterConfig
from zoft.models import DEFAULT_MODEL, load_model
from zoft.scoring import task_logits
from zoft.tasks import get_task, sample_splits


@dataclass
class AllocateConfig(AdapterConfig):
    out: str = field(default="", metadata={"help": "block_scales file to write (safetensors)"})
    model: str = DEFAULT_MODEL
    tasks: str = field(default="rte", metadata={"help": "comma-separated meta-training tasks (never the ones you judge on)"})
    data_dir: str | None = None
    batches: int = field(default=16, metadata={"help": "batches of gradient and Fisher statistics per task"})
    batch_size: int = 16
    num_train: int = 1000
    alpha: float = field(default=2.0, metadata={"help": "σ_b² ∝ (S_b/T_b)^alpha"})
    spread: float = field(default=10.0, metadata={"help": "σ_b² is clipped to [median/spread, median·spread]"})
    fraction: float = field(default=1.0, metadata={
        "help": "below 1: the allocation for --perturbation scaled_mask, from the weights its mask keeps"})
    keep: str = field(default="largest", metadata={"help": "with --fraction: the mask's 'smallest' or 'largest' weights"})
    max_length: int = 256
    seed: int = 1234

    def __post_init__(self):
        if not self.out:
            raise ZoftError("meta-allocate needs --out (the block_scales file to write)")
        if self.batches < 2:
            raise ZoftError(f"--batches must be at least 2 (S compares batch gradients), got {self.batches}")
        if self.alpha <= 0 or self.spread < 1:
            raise ZoftError(f"need alpha > 0 and spread >= 1, got {self.alpha} and {self.spread}")
        MagnitudeMaskConfig(self.fraction, self.keep)  # checks both
        self.check_adapters()


def protocol_stream(tokenizer, task_name: str, data_dir=None, batch_size: int = 16, seed: int = 1234,
                    num_train: int = 1000, max_length: int = 256, skip: int = 0) -> tuple[torch.Tensor, Batches]:
    """(label candidates, seeded batches) of the task's training sample as protocol v2 draws it
    (data seed 0, dev 200), less its first ``skip`` examples (those a cross-fitted head start was
    fitted on): the data the offline statistics and benches measure on."""
    task = get_task(task_name)
    splits = sample_splits(task, data_dir, num_train, 200, 1, 0)
    items = encode(task, splits.train[skip:], tokenizer, max_length)
    return candidate_token_ids(task, tokenizer), Batches(items, batch_size, seed, tokenizer.pad_token_id)


def batch_samples(model, tokenizer, task_name: str, data_dir=None, batches: int = 16, batch_size: int = 16,
                  num_train: int = 1000, max_length: int = 256, seed: int = 1234, skip: int = 0):
    """Per batch of ``protocol_stream``, (g, f): flat float32 vectors per trainable block of the
    batch gradient g and of a Fisher sample f = Σ_j s_j ∇ℓ_j (labels drawn from the model, random
    signs s_j), with E (fᵀv)² = Σ_j (∇ℓ_jᵀv)² for any v: the Gauss-Newton curvature of the
    cross-entropy over the candidates, summed over the batch."""
    cand, stream = protocol_stream(tokenizer, task_name, data_dir, batch_size, seed, num_train, max_length, skip)
    blocks = collect_blocks(model)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        batch = collate(stream.next_items(), tokenizer.pad_token_id)
        g, logits = batch_gradient(model, blocks, batch, cand)
        with torch.no_grad():
            drawn = torch.multinomial(logits.softmax(-1), 1, generator=gen).view(-1)
            signs = torch.randint(0, 2, drawn.shape, generator=gen).float() * 2 - 1
        model.zero_grad(set_to_none=True)
        (F.cross_entropy(task_logits(model, batch, cand), drawn, reduction="none") * signs).sum().backward()
        yield g, flat_grads(blocks)
    model.zero_grad(set_to_none=True)


def batch_gradient(model, blocks, batch, cand) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the gradient of the batch's cross-entropy over the candidates, flat per block; the logits)."""
    model.zero_grad(set_to_none=True)
    logits = task_logits(model, batch, cand)
    F.cross_entropy(logits, batch["labels"]).backward()
    return flat_grads(blocks), logits


def flat_grads(blocks) -> list[torch.Tensor]:
    """A copy of each block's gradient, flat: the next backward may reuse the .grad tensors."""
    return [b.param.grad.view(-1).clone() for b in blocks]


def statistics(model, tokenizer, task_name: str, data_dir=None, batches: int = 16, batch_size: int = 16,
               num_train: int = 1000, max_length: int = 256, seed: int = 1234, skip: int = 0) -> tuple[list, list[list]]:
    """(blocks, [S, B, T]): per weight, flat float32 per block, from ``batches`` batches of
    ``batch_samples``. S_e = (E g)_e², B_e = E g̃_e², T_e the Fisher diagonal."""
    blocks = collect_blocks(model)
    grad_sum, grad_sq, fisher = ([torch.zeros(b.numel) for b in blocks] for _ in range(3))
    for g, f in batch_samples(model, tokenizer, task_name, data_dir, batches, batch_size, num_train, max_length, seed, skip):
        for x, total, square, acc, y in zip(g, grad_sum, grad_sq, fisher, f):
            total.add_(x)
            square.addcmul_(x, x)
            acc.addcmul_(y, y)  # E_s (Σ_j s_j ∇ℓ_j)² = Σ_j (∇ℓ_j)², elementwise
    k = batches
    S = [(s * s - q) / (k * (k - 1)) for s, q in zip(grad_sum, grad_sq)]
    return blocks, [S, [q / k for q in grad_sq], [f / (k * batch_size) for f in fisher]]


def block_sums(per_weight: list[torch.Tensor], masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    masks = masks or [None] * len(per_weight)
    return torch.stack([(x if m is None else x * m).double().sum() for x, m in zip(per_weight, masks)])


def mask_of(blocks, fraction: float, keep: str) -> list[torch.Tensor] | None:
    """The magnitude mask the fine-tune will use, per block (flat), or None without one."""
    if fraction >= 1:
        return None
    piece = MagnitudeMask(MagnitudeMaskConfig(fraction, keep))
    shaper = piece.shaper(piece.init(blocks))
    with torch.no_grad():
        return [shaper(b, torch.ones(b.numel), b.param.detach().view(-1).float()) for b in blocks]


def allocation(ratios: list[torch.Tensor], alpha: float, spread: float, held: torch.Tensor | None = None) -> torch.Tensor:
    """σ [num_blocks] from each task's per-block S_b/T_b: their geometric mean over tasks (a
    task's overall scale cancels: only the split between blocks matters, the engine normalises
    the total), raised to α/2, clipped ×spread in σ² around the median of the blocks not
    ``held``. A block whose measured signal is ≤ 0 (noise) sits at the bottom of the clip; a
    held one at 0."""
    logs = torch.stack([r.clamp(min=1e-30).log() for r in ratios])
    var = (alpha * logs.mean(0)).exp()
    held = torch.zeros_like(var, dtype=torch.bool) if held is None else held
    if held.all():
        raise ZoftError("every block's gradient is zero on the meta-training tasks: nothing to allocate")
    median = var[~held].median()
    return torch.where(held, 0.0, var.clamp(median / spread, median * spread)).sqrt()


def allocate(cfg: AllocateConfig) -> Path:
    model, tokenizer = load_model(cfg.model)
    model = with_adapters(model, cfg, cfg.seed)
    ratios, held, tasks = [], True, [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not tasks:
        raise ZoftError(f"--tasks needs at least one task name, got {cfg.tasks!r}")
    for name in tasks:
        blocks, (S, _, T) = statistics(model, tokenizer, name, cfg.data_dir, cfg.batches, cfg.batch_size,
                                       cfg.num_train, cfg.max_length, cfg.seed)
        masks = mask_of(blocks, cfg.fraction, cfg.keep)
        signal, curvature = block_sums(S, masks), block_sums(T, masks)
        # no curvature: the loss does not depend on the block (LoRA's A at B = 0), or the mask
        # leaves it empty (all weights equal); held if so on every task
        ratios.append(torch.where(curvature > 0, signal / curvature.clamp(min=1e-300), 0.0))
        held = held & (curvature == 0)
    sigma = allocation(ratios, cfg.alpha, cfg.spread, held)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_block_scales(out, blocks, sigma, note=json.dumps({
        "base_model": cfg.model, "tasks": tasks, "alpha": cfg.alpha, "spread": cfg.spread, "batches": cfg.batches,
        "mask": None if cfg.fraction >= 1 else {"fraction": cfg.fraction, "keep": cfg.keep},
        "peft": None if cfg.peft == "none" else {k: getattr(cfg, k) for k in vars(AdapterConfig())},
        "rule": "sigma_b^2 ~ (S_b/T_b)^alpha, S gradient signal, T Fisher trace, geometric mean over tasks"}))
    return out


def register(subparsers):
    from zoft.cli import add_config_flags

    parser = subparsers.add_parser("meta-allocate", help="a base model's per-block perturbation allocation from meta-training tasks")
    add_config_flags(parser, AllocateConfig, {})
    parser.set_defaults(handler=_run)


def _run(args):
    from zoft.cli import _quiet_transformers

    _quiet_transformers()
    cfg = AllocateConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "handler")})
    print(f"allocation: {allocate(cfg)}", file=sys.stdout)
