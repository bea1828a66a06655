"""``zoft meta-train``: learn a base model's perturbation tuner (ZO Fine-tuner, arXiv 2510.00419).

One trajectory of the LLM, reset to the initial weights every ``restart_every`` steps, with the
LR decaying linearly to 0 over each restart period: first-order by default (the paper's: SGD,
momentum 0.8, gradients clipped at 1.0), or ``--trajectory zo``, the tuner's own ZO steps, so
that it learns at the states a fine-tune with it meets. At every step, before the LLM's step,
the tuner takes one step on the one-step look-ahead meta-gradient of ``outer.lookahead_loss``,
on the step's batch or (``--meta-batch other``) on the task's next one. Tasks take turns
(round-robin), each keeping its own σ_prev and loss history.

Checkpoints are taken at restart boundaries, where the LLM is back at its initial weights: the
tuner, its optimizer's state, the per-task state and the data positions are then the whole
state, so resuming never needs a parameter-sized snapshot, and a resumed run writes the same
artifact, bit for bit, as an uninterrupted one. The artifact is rewritten at every checkpoint.
The tuner folder holds what is used (weights, card, curve); the resume checkpoint and the log
live apart, in ``--checkpoint-dir`` (learned_optimization keeps the two apart too).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import zoft
from zoft.adapters import with_adapters
from zoft.block_scales import read_block_scales
from zoft.blocks import collect_blocks
from zoft.config import AdapterConfig, command_flags
from zoft.data import Batches, candidate_token_ids, encode
from zoft.errors import ZoftError
from zoft.models import DEFAULT_MODEL, load_model, model_id
from zoft.optimizer import ZOOptimizer, make_parts
from zoft.perturbations import LearnedScale, LearnedScaleConfig, LearnedState
from zoft.rng import derive
from zoft.scoring import classification_loss
from zoft.tasks import get_task, sample_splits
from zoft.tuner import BlockMLPs, save_tuner, summarise_scales

from meta_train.outer import UnrollStep, es_gradient, lookahead_loss, recorded_step, unrolled_loss


TUNER_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class MetaTrainConfig(AdapterConfig):
    output: str = field(default="", metadata={"help": "tuner folder (tuner.safetensors, README.md, curve)"})
    checkpoint_dir: str = field(default="", metadata={
        "help": "resume checkpoint and log (default: .NAME.meta-train beside the tuner folder)"})
    model: str = DEFAULT_MODEL
    tasks: str = field(default="sst2", metadata={"help": "comma-separated tasks, taken round-robin"})
    data_dir: str | None = None
    steps: int = 600
    restart_every: int = 100
    batch_size: int = 8
    num_train: int = 1000
    eps: float = 1e-3
    estimator: str = "spsa"
    kernel_order: int = 4
    lr_update: float = 1e-6
    lr_tuner: float = 1e-2
    tuner_optimizer: str = field(default="adam", metadata={
        "help": "adam or sgd (the reference's); the meta-gradient's size swings 50x between steps"})
    trajectory: str = field(default="first-order", metadata={
        "help": "how the LLM moves between meta-steps: first-order (the paper's: SGD with momentum) or zo"
                " (the tuner's own ZO steps, the states fine-tuning will meet)"})
    meta_batch: str = field(default="same", metadata={
        "help": "the batch the look-ahead loss is taken on: same (the paper's: the step's own) or other"
                " (the task's next batch: only gradient that generalises across batches is rewarded)"})
    objective: str = field(default="lookahead", metadata={
        "help": "lookahead (the paper's: L after one step, every step), unroll (L after --horizon steps"
                " of the tuner's own ZO trajectory, one update per segment) or es (the same L, its gradient in each"
                " block's output bias from two runs of the segment: forward passes only); unroll and es need"
                " --trajectory zo --meta-batch other"})
    horizon: int = field(default=10, metadata={"help": "unroll, es: ZO steps per segment"})
    segments_per_update: int = field(default=1, metadata={
        "help": "unroll, es: segments whose meta-gradients are averaged into one tuner update (one segment's is"
                " mostly noise: bench/meta_gradient_snr.py)"})
    es_size: float = field(default=0.1, metadata={
        "help": "es: the sd of the relative change, b2·exp(±size·ξ), to each block's output bias (≈ σ_b)"})
    lr_llm: float = 1e-5
    momentum: float = 0.8
    clip: float = 1.0
    dim_rule: str = "reference"
    start: str = field(default="isotropic", metadata={
        "help": "the tuner's initial σ: isotropic (σ ≈ 1, MeZO's perturbation) or random (nn.Linear's init)"})
    prior: str = field(default="", metadata={
        "help": "a block_scales file (zoft meta-allocate's): the tuner starts at its allocation and holds"
                " the blocks it holds (σ 0), so meta-training learns a correction to it"})
    max_length: int = 256
    seed: int = 0
    report_to: str = field(default="none", metadata={"help": "none or wandb (offline unless a key is set)"})
    wandb_project: str = "zoft"

    def __post_init__(self):
        if not self.output:
            raise ZoftError("meta-train needs --output (the tuner folder)")
        for name in ("steps", "restart_every", "batch_size", "num_train"):
            if getattr(self, name) < 1:
                raise ZoftError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eps", "lr_update", "lr_tuner", "lr_llm", "clip", "es_size"):
            if not getattr(self, name) > 0:
                raise ZoftError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.report_to not in ("none", "wandb"):
            raise ZoftError(f"report-to must be none or wandb, got {self.report_to!r}")
        if self.tuner_optimizer not in TUNER_OPTIMIZERS:
            raise ZoftError(f"tuner-optimizer must be {' or '.join(TUNER_OPTIMIZERS)}, got {self.tuner_optimizer!r}")
        if self.trajectory not in ("first-order", "zo"):
            raise ZoftError(f"trajectory must be first-order or zo, got {self.trajectory!r}")
        if self.meta_batch not in ("same", "other"):
            raise ZoftError(f"meta-batch must be same or other, got {self.meta_batch!r}")
        if self.objective not in ("lookahead", "unroll", "es"):
            raise ZoftError(f"objective must be lookahead, unroll or es, got {self.objective!r}")
        if self.objective != "lookahead":
            if self.trajectory != "zo" or self.meta_batch != "other":
                raise ZoftError(f"--objective {self.objective} follows the tuner's own ZO trajectory and takes its loss on a batch"
                                " the segment did not train on: pass --trajectory zo --meta-batch other")
            if self.horizon < 1 or self.restart_every % self.horizon or self.steps % self.horizon:
                raise ZoftError(f"horizon must be >= 1 and divide restart-every ({self.restart_every}) and steps"
                                f" ({self.steps}), got {self.horizon}")
            if self.segments_per_update < 1 or (self.restart_every // self.horizon) % self.segments_per_update:
                raise ZoftError(f"segments-per-update must be >= 1 and divide the {self.restart_every // self.horizon}"
                                f" segments of a restart period, got {self.segments_per_update}")
        if self.start not in ("isotropic", "random"):
            raise ZoftError(f"start must be isotropic or random, got {self.start!r}")
        if self.prior and self.start != "isotropic":
            raise ZoftError("--prior sets the tuner's start; it cannot be combined with --start random")
        if self.prior and not Path(self.prior).is_file():
            raise ZoftError(f"prior file not found: {self.prior}")
        if not [t for t in self.tasks.split(",") if t.strip()]:
            raise ZoftError(f"--tasks needs at least one task name, got {self.tasks!r}")
        if not 0 <= self.momentum < 1:
            raise ZoftError(f"momentum must be in [0, 1), got {self.momentum}")
        self.check_adapters()

    def unread_fields(self) -> set[str]:
        """The settings this combination ignores: the card's command leaves them out."""
        unread = {("momentum", "clip"): self.trajectory == "zo",
                  ("lr_update",): self.objective != "lookahead",
                  ("es_size",): self.objective != "es",
                  ("horizon", "segments_per_update"): self.objective == "lookahead",
                  ("kernel_order",): self.estimator != "kernel",
                  ("start",): bool(self.prior)}
        return {k for keys, ignored in unread.items() if ignored for k in keys} | self.unread_adapter_fields()

    def estimator_spec(self) -> dict:
        spec = {"name": self.estimator, "eps": self.eps}
        return {**spec, "kernel_order": self.kernel_order} if self.estimator == "kernel" else spec


@dataclass
class Segment:
    """One unroll: the batch its loss is taken on, L(θ₀) there, and its steps so far. Segments
    start on restart boundaries, so a checkpoint never holds one."""

    meta_batch: dict
    start_loss: float
    steps: list[UnrollStep] = field(default_factory=list)


def _block_stats(blocks) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([torch.stack([b.param.float().mean(), b.param.float().var()]) for b in blocks])


def initial_tuner(blocks, seed: int = 0, start: str = "isotropic", prior: str = "", batch_size: int = 16) -> BlockMLPs:
    """The tuner meta-training starts from: ``start``'s, or a prior allocation's scales with its
    held blocks held."""
    if not prior:
        return BlockMLPs(len(blocks), seed=seed, start=start)
    sigma = torch.tensor(read_block_scales(prior, blocks, batch_size))
    net = BlockMLPs(len(blocks), seed=seed, start="random", held=sigma == 0)
    net.start_at(sigma)
    return net


def task_data(task, tokenizer, data_dir: str, num_train: int, max_length: int, batch_size: int, seed: int,
              index: int) -> tuple[Batches, Callable]:
    """The ``index``-th meta-training task's endless train batches and its loss ``(model, batch) -> loss``."""
    splits = sample_splits(task, data_dir, num_train, 1, 1, seed)
    stream = Batches(encode(task, splits.train, tokenizer, max_length), batch_size, derive(seed, index),
                     tokenizer.pad_token_id)
    candidates = candidate_token_ids(task, tokenizer)
    return stream, lambda model, batch: classification_loss(model, batch, candidates, train_loss=task.train_loss)


def meta_train(cfg: MetaTrainConfig, log=None) -> Path:
    out = Path(cfg.output)
    estimator, _, _ = make_parts(cfg.estimator_spec(), {"name": "isotropic"}, {"name": "sgd"})
    tasks = [get_task(t.strip()) for t in cfg.tasks.split(",") if t.strip()]
    model, tokenizer = load_model(cfg.model)
    model = with_adapters(model, cfg, cfg.seed)  # a tuner for adapters: its blocks are the ones --peft fine-tunes
    streams, losses = {}, {}
    for i, task in enumerate(tasks):
        streams[task.name], losses[task.name] = task_data(task, tokenizer, cfg.data_dir, cfg.num_train, cfg.max_length,
                                                          cfg.batch_size, cfg.seed, i)

    learned = LearnedScale(LearnedScaleConfig(dim_rule=cfg.dim_rule, batch_size=cfg.batch_size),
                           net=initial_tuner(collect_blocks(model), cfg.seed, cfg.start, cfg.prior, cfg.batch_size))
    # the fine-tuning machinery (blocks, noise, hooks, estimator) that the tuner is fitted to
    blocks_opt = ZOOptimizer(model, estimator, learned, zoft.updates.SGD(zoft.updates.SGDConfig()), seed=cfg.seed)
    blocks = blocks_opt.blocks
    initial = [b.param.detach().cpu().clone() for b in blocks]  # θ₀, restored at each restart
    sigma_prev = {t.name: torch.ones(len(blocks)) for t in tasks}
    prev_losses: dict[str, tuple[float, float] | None] = {t.name: None for t in tasks}
    tuner_opt = TUNER_OPTIMIZERS[cfg.tuner_optimizer](learned.net.parameters(), lr=cfg.lr_tuner)
    work = state_dir(cfg)
    start, curve, log_bytes = _resume(out, work, cfg, learned.net, tuner_opt, streams, sigma_prev, prev_losses)
    log_file = open(work / "meta_train.jsonl", "a", encoding="utf-8")
    log_file.truncate(log_bytes)  # a killed run's lines after its last checkpoint are redone
    log_file.seek(log_bytes)
    wandb_run = None
    if cfg.report_to == "wandb":
        from zoft.logging import WandbLogger

        wandb_run = WandbLogger(out, asdict(cfg), cfg.wandb_project, f"meta-train-{out.name}",
                                group=f"{Path(cfg.model).name}/meta-train", job_type="meta-train",
                                tags=["meta-train", cfg.estimator, *cfg.tasks.split(",")])

    def fresh_llm_optimizer():
        return torch.optim.SGD([b.param for b in blocks], lr=cfg.lr_llm, momentum=cfg.momentum)

    def tuner_step(meta: torch.Tensor | dict, share: float = 1.0, update: bool = True) -> float | None:
        """Adds ``share`` of the meta-gradient to the tuner's; steps on the sum when ``update``.
        ``meta``: a loss to differentiate, or {parameter: its gradient} (ES's)."""
        if isinstance(meta, dict):
            for p, g in meta.items():
                p.grad = share * g if p.grad is None else p.grad + share * g
        else:
            (meta * share).backward()
        if not update:
            return None
        grad_norm = torch.cat([p.grad.flatten() for p in learned.net.parameters() if p.grad is not None]).norm().item()
        tuner_opt.step()
        tuner_opt.zero_grad(set_to_none=True)
        return grad_norm

    def lookahead_step(step: int, lr_llm: float) -> dict:
        task = tasks[step % len(tasks)]
        loss_fn = losses[task.name]
        batch = next(streams[task.name])
        meta_batch = next(streams[task.name]) if cfg.meta_batch == "other" else batch
        state = LearnedState(sigma_prev[task.name], _block_stats(blocks))
        meta, lp, lm, sigma, scale = lookahead_loss(blocks_opt, loss_fn, batch, derive(cfg.seed, step), state,
                                                    prev_losses[task.name], cfg.lr_update, step, meta_batch)
        tuner_grad = tuner_step(meta)
        # L(θ) on the meta batch, the look-ahead's reference: the first-order step's loss gives it free
        free = cfg.trajectory == "first-order" and meta_batch is batch
        if not free:
            with torch.no_grad():
                base_loss = loss_fn(model, meta_batch).item()
        if cfg.trajectory == "zo":
            # the fine-tune's own step with the updated tuner
            blocks_opt.prev_losses, blocks_opt.states["perturbation"] = prev_losses[task.name], state
            recorded_step(blocks_opt, lambda: loss_fn(model, batch), step, lr_llm)
            loss = torch.tensor(blocks_opt.last["loss_plus"])
        else:
            model.train()
            llm_opt.param_groups[0]["lr"] = lr_llm
            llm_opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([b.param for b in blocks], cfg.clip)
            llm_opt.step()
            model.eval()
            for b in blocks:
                b.param.grad = None
        sigma_prev[task.name], prev_losses[task.name] = sigma, (lp, lm)
        return {"task": task.name, "meta_loss": meta.item(), "loss_plus": lp, "loss_minus": lm,
                "loss": loss.item() if free else base_loss, "trajectory_loss": loss.item(), "tuner_grad": tuner_grad,
                "scale": scale}

    segment: Segment | None = None  # the current unroll

    def unroll_step(step: int, lr_llm: float) -> dict | None:
        """One ZO step of the tuner's own trajectory; at a segment's last step, the tuner's update
        on the K-step meta-gradient of L(θ_K) on a batch the segment did not train on."""
        nonlocal segment
        task = tasks[(step // cfg.horizon) % len(tasks)]
        loss_fn = losses[task.name]
        if step % cfg.horizon == 0:
            blocks_opt.states["perturbation"] = LearnedState(sigma_prev[task.name], _block_stats(blocks))
            blocks_opt.prev_losses = prev_losses[task.name]
            meta_batch = next(streams[task.name])
            with torch.no_grad():
                segment = Segment(meta_batch, loss_fn(model, meta_batch).item())
        batch = next(streams[task.name])
        segment.steps.append(recorded_step(blocks_opt, lambda: loss_fn(model, batch), step, lr_llm))
        if len(segment.steps) < cfg.horizon:
            return None
        surrogate, meta_loss = unrolled_loss(blocks_opt, loss_fn, segment.meta_batch, segment.steps)
        last_of_group = (step // cfg.horizon + 1) % cfg.segments_per_update == 0  # groups end on restart boundaries
        tuner_grad = tuner_step(surrogate, 1 / cfg.segments_per_update, update=last_of_group)
        sigma_prev[task.name] = blocks_opt.states["perturbation"].sigma_prev
        prev_losses[task.name] = blocks_opt.prev_losses
        lp, lm = blocks_opt.last["loss_plus"], blocks_opt.last["loss_minus"]
        return {"task": task.name, "meta_loss": meta_loss, "loss_plus": lp, "loss_minus": lm,
                "loss": segment.start_loss, "trajectory_loss": lp, "tuner_grad": tuner_grad,
                "scale": torch.tensor(blocks_opt.last_scales)}

    def es_step(step: int, lr_llm: float) -> dict | None:
        """At a segment's last step: its K ZO steps, run twice from the same θ₀ with each block's
        output bias × exp(±es_size·ξ), and the tuner's update on the ES estimate (``outer.es_gradient``)."""
        if (step + 1) % cfg.horizon:
            return None
        first = step + 1 - cfg.horizon
        task = tasks[(first // cfg.horizon) % len(tasks)]
        loss_fn = losses[task.name]
        blocks_opt.states["perturbation"] = LearnedState(sigma_prev[task.name], _block_stats(blocks))
        blocks_opt.prev_losses = prev_losses[task.name]
        meta_batch = next(streams[task.name])  # drawn as the unroll draws them: meta batch, then K batches
        batches = [next(streams[task.name]) for _ in range(cfg.horizon)]
        with torch.no_grad():
            start_loss = loss_fn(model, meta_batch).item()
        grad, plus, minus = es_gradient(blocks_opt, loss_fn, meta_batch, batches, first,
                                        [period_lr(t) for t in range(first, step + 1)], cfg.es_size,
                                        derive(cfg.seed, first, 0, 1))  # four keys: never a direction's seed
        last_of_group = (step + 1) // cfg.horizon % cfg.segments_per_update == 0
        tuner_grad = tuner_step({learned.net.b2: grad}, 1 / cfg.segments_per_update, update=last_of_group)
        sigma_prev[task.name] = blocks_opt.states["perturbation"].sigma_prev
        prev_losses[task.name] = blocks_opt.prev_losses
        return {"task": task.name, "meta_loss": (plus + minus) / 2, "meta_loss_plus": plus, "meta_loss_minus": minus,
                "loss_plus": blocks_opt.last["loss_plus"], "loss_minus": blocks_opt.last["loss_minus"],
                "loss": start_loss, "trajectory_loss": blocks_opt.last["loss_plus"], "tuner_grad": tuner_grad,
                "scale": torch.tensor(blocks_opt.last_scales)}

    def period_lr(step: int) -> float:  # the LLM's lr decays linearly to 0 over each restart period
        return cfg.lr_llm * max(0.0, 1 - (step % cfg.restart_every) / cfg.restart_every)

    step_of = {"lookahead": lookahead_step, "unroll": unroll_step, "es": es_step}[cfg.objective]
    llm_opt = fresh_llm_optimizer()
    started = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="meta-train", file=sys.stderr)
    for step in bar:
        if step % cfg.restart_every == 0:
            with torch.no_grad():
                for b, p0 in zip(blocks, initial):
                    b.param.copy_(p0)
            llm_opt = fresh_llm_optimizer()
            if step > start:
                _checkpoint(out, work, cfg, learned.net, tuner_opt, blocks, streams, sigma_prev, prev_losses, step,
                            curve, log_file.tell())
        model.eval()
        outcome = step_of(step, period_lr(step))
        if outcome is None:
            continue
        scale = outcome.pop("scale")
        record = {"step": step + 1, **outcome, "sigma_min": scale.min().item(), "sigma_max": scale.max().item(),
                  "seconds": time.perf_counter() - started}
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        curve.append([step + 1, record["meta_loss"]])
        bar.set_postfix(meta=f"{record['meta_loss']:.3f}", loss=f"{record['loss']:.3f}")
        if log:
            log(record)
        if wandb_run:
            wandb_run.log({**{k: v for k, v in record.items() if k not in ("step", "task")},
                           **summarise_scales(blocks, scale.tolist())}, step + 1)
    _checkpoint(out, work, cfg, learned.net, tuner_opt, blocks, streams, sigma_prev, prev_losses, cfg.steps, curve,
                log_file.tell())
    log_file.close()
    _write_card(out, work, cfg, model)
    if wandb_run:
        wandb_run.artifact(out, f"tuner-{out.name}", "zoft-tuner",
                           {"base_model": model_id(cfg.model), "steps": cfg.steps, "tasks": cfg.tasks})
        wandb_run.close()
    return out / "tuner.safetensors"


def _write_card(out: Path, work: Path, cfg: MetaTrainConfig, model):
    """README.md beside the tuner: what it is for, how it was made, its meta-loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(x) for x in (work / "meta_train.jsonl").read_text().splitlines() if x.strip()]
    window = max(1, len(records) // 20)

    gains = [r["meta_loss"] - r["loss"] for r in records]

    def smooth(values):
        return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                for i in range(len(values))]

    # L(θ′) − L(θ) on the meta batch: what the tuner's scales bought the look-ahead step, or the
    # unroll's K steps (the losses themselves follow the LLM's trajectory and the task mix)
    gain = smooth(gains)
    unroll = cfg.objective != "lookahead"  # one record a segment
    after = "L(θ_K)" if unroll else "L(θ′)"
    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(steps, smooth([r["meta_loss"] for r in records]))
    top.set(ylabel=f"meta-loss {after}", title=f"{out.name} (means of {window} records)")
    bottom.plot(steps, gain)
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.set(xlabel="meta-training step", ylabel=f"{after} − L(θ)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "meta_train_curve.png", dpi=110)
    plt.close(fig)
    from zoft.tuner_heatmap import draw, effective_scales

    draw(*effective_scales(out / "tuner.safetensors", model), out / "scales.png", title=out.name)
    flags = command_flags(cfg, skip={"report_to", "wandb_project", *cfg.unread_fields()})
    minutes = records[-1]["seconds"] / 60 if records else 0.0
    per_period = cfg.restart_every // cfg.horizon if unroll else cfg.restart_every  # records per restart period
    periods = [gains[i : i + per_period] for i in range(0, len(gains), per_period)]
    period_gains = [sum(p) / len(p) for p in periods]
    use = " ".join(filter(None, ["zoft finetune", cfg.adapter_flags(), f"--tuner {out}"]))
    if unroll:
        what = (f"Segment gain L(θ_K) − L(θ₀) (the loss change over one segment of {cfg.horizon} ZO steps of the"
                " tuner's own trajectory, on a batch the segment did not train on"
                + (f"; with ES, the mean of its two runs, each block's output bias × exp(±{cfg.es_size:g}·ξ))"
                   if cfg.objective == "es" else ")"))
    else:
        what = (f"Look-ahead gain L(θ′) − L(θ) (the loss change of one ZO step of lr {cfg.lr_update:g} with the tuner's"
                f" scales, on the {'step' if cfg.meta_batch == 'same' else 'task'}'s {'own' if cfg.meta_batch == 'same' else 'next'} batch)")
    body = f"""# Perturbation tuner: {out.name}

Base model: {model_id(cfg.model)} ({len(collect_blocks(model))} blocks). Meta-trained for the `{cfg.estimator}`
estimator on: {cfg.tasks}. Use it with `{use}` (`--tuner auto` finds it once it is in `pretrained_tuners/`).

Made with:

    zoft meta-train {flags}

{cfg.steps} steps, restart every {cfg.restart_every}; the last session's wall time was
{minutes:.0f} min (the steps of a resumed run are counted from its start).

![meta-training curve](meta_train_curve.png)

What it learned, `zoft tuner-heatmap` (effective scale cσ per block, log10; 0 is MeZO's
isotropic perturbation):

![effective scales](scales.png)

{what}, mean of the first and last {window} records:
{gain[window - 1] if records else float('nan'):+.4f} → {gain[-1] if records else float('nan'):+.4f}.
Mean {after} − L(θ) per restart period (the LLM replays from θ₀ each period; the first starts
from {f"the prior's allocation, {cfg.prior}" if cfg.prior else "isotropic scales"}): {", ".join(f"{g:+.4f}" for g in period_gains)}.
Evaluation on tasks not used here: see the repository's `bench/convergence.py`.
"""
    _save_card(out, cfg, body)


def _save_card(out: Path, cfg: MetaTrainConfig, body: str):
    """README.md as the Hub reads a model card: YAML metadata (base model, library, tags, the
    meta-training tasks as datasets), then the body."""
    from huggingface_hub import ModelCard, ModelCardData

    base = model_id(cfg.model).split(" ")[0]  # the hub id, without the default's "(GGUF ...)" note
    data = ModelCardData(base_model=base, library_name="zoft", datasets=[t.strip() for t in cfg.tasks.split(",")],
                         tags=["zeroth-order", "perturbation-tuner", "zo-fine-tuner", cfg.estimator])
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(out / "README.md")


def state_dir(cfg: MetaTrainConfig) -> Path:
    out = Path(cfg.output)
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.parent / f".{out.name}.meta-train"


def _optimizer_tensors(tuner_opt) -> tuple[dict, dict]:
    """A torch optimizer's state_dict as safetensors tensors plus JSON (no pickle)."""
    sd = tuner_opt.state_dict()
    tensors = {f"optimizer/{i}/{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": {str(i): list(st) for i, st in sd["state"].items()}}


def _load_optimizer(tuner_opt, tensors: dict, saved: dict):
    state = {int(i): {k: tensors[f"optimizer/{i}/{k}"] for k in keys} for i, keys in saved["state_keys"].items()}
    tuner_opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _checkpoint(out: Path, work: Path, cfg, net, tuner_opt, blocks, streams, sigma_prev, prev_losses, step: int,
                curve, log_bytes: int):
    """The artifact (usable as is) plus what resuming needs; both written atomically."""
    meta = {"base_model": model_id(cfg.model), "estimator": cfg.estimator_spec(), "dim_rule": cfg.dim_rule,
            "tokens_per_example": 15, "batch_size": cfg.batch_size, "zoft_version": zoft.__version__,
            "meta_train": {k: v for k, v in asdict(cfg).items() if k not in ("output", "checkpoint_dir")},
            "meta_train_step": step}
    save_tuner(out / "tuner.safetensors", net, blocks, meta)
    tensors, optimizer = _optimizer_tensors(tuner_opt)
    tensors.update({f"sigma_prev/{k}": v.contiguous() for k, v in sigma_prev.items()})
    # the tuner's weights too: a kill between the two writes leaves the artifact one period ahead
    tensors.update({f"net/{k}": v.detach().contiguous() for k, v in net.state_dict().items()})
    state = {"step": step, "prev_losses": prev_losses, "curve": curve, "log_bytes": log_bytes,
             "optimizer": optimizer, "data": {k: s.state_dict() for k, s in streams.items()}}
    tmp = work / ".checkpoint.tmp"
    save_file(tensors, str(tmp), metadata={"state": json.dumps(state), "config": json.dumps(_resumable(cfg))})
    tmp.replace(work / "checkpoint.safetensors")


def _resumable(cfg) -> dict:
    """The settings a resumed run must share with the run it continues."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("steps", "checkpoint_dir", "report_to", "wandb_project")}


def _resume(out: Path, work: Path, cfg, net, tuner_opt, streams, sigma_prev, prev_losses) -> tuple[int, list, int]:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "checkpoint.safetensors"
    if not path.is_file():
        (work / "meta_train.jsonl").unlink(missing_ok=True)
        return 0, [], 0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state, saved_cfg = json.loads(f.metadata()["state"]), json.loads(f.metadata()["config"])
    if saved_cfg != _resumable(cfg):
        raise ZoftError(f"{work} holds a meta-training run with other settings; use another --output")
    saved = load_file(str(path))
    net.load_state_dict({k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("net/")})
    _load_optimizer(tuner_opt, saved, state["optimizer"])
    for k, v in saved.items():
        if k.startswith("sigma_prev/"):
            sigma_prev[k.split("/", 1)[1]] = v
    prev_losses.update({k: None if v is None else tuple(v) for k, v in state["prev_losses"].items()})
    for k, data in state["data"].items():
        streams[k].load_state_dict(data)
    return state["step"], state["curve"], state["log_bytes"]
