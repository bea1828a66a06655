"""``zoft finetune``: MeZO's protocol around a ZOOptimizer, in one loop a reader can follow.

Everything a user can get wrong is checked before the run directory exists; the run is
written into a hidden temporary folder that is renamed into place only when it succeeds.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import zoft
from zoft.data import Batches, candidate_token_ids, encode
from zoft.errors import ZoftError
from zoft.estimators import ESTIMATORS
from zoft.logging import JsonlLogger, WandbLogger
from zoft.models import DEFAULT_MODEL, checkpoint_reader, load_model, model_id
from zoft.noise import NOISE_SOURCES
from zoft.optimizer import build_optimizer, make_parts
from zoft.scoring import METRICS, classification_loss, evaluate_task
from zoft.tasks import get_task, jsonl_task, sample_splits
from zoft.tuner import read_tuner, summarise_scales


@dataclass
class TaskConfig:
    """Model, task and data: what zoft eval and zoft finetune share."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "hub id, local path or the embedded default"})
    task: str = "tweets"
    data_dir: str | None = None
    template: str = ""
    labels: str = ""
    label_field: str = "label"
    num_test: int = 1000
    data_seed: int = 0
    eval_batch_size: int = 32
    max_length: int = 256
    device: str = "auto"

    def __post_init__(self):
        for name in ("num_test", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ZoftError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ZoftError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ZoftError("device cuda asked for, but no CUDA device is available")


@dataclass
class FinetuneConfig(TaskConfig):
    num_train: int = 1000
    num_dev: int | None = field(default=None, metadata={"help": "default: the task's (500; 100 for CB)"})
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-5
    eps: float = 1e-3
    directions: int = 1
    estimator: str = "spsa"
    objective: str = "loss"
    kernel_order: int = 4
    r_mode: str = "direction"
    radius: float = 1.0
    shrink_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    average: bool = False
    noise: str = "table"
    tuner: str = "none"
    seed: int = 0
    eval_every: int = 100
    peft: str = field(default="none", metadata={"help": "none (full-parameter), lora or prefix, through peft"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""
    prefix_tokens: int = 5
    output_dir: str = "runs"
    run_name: str | None = None
    save_model: bool = False
    report_to: str = "none"
    wandb_project: str = "zoft"

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "batch_size", "directions", "eval_every", "num_train"):
            if getattr(self, name) < 1:
                raise ZoftError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_dev is not None and self.num_dev < 1:
            raise ZoftError(f"num-dev must be >= 1, got {self.num_dev}")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ZoftError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.objective not in ("loss", *METRICS):
            raise ZoftError(f"objective must be loss, accuracy or f1, got {self.objective!r}")
        if self.estimator not in ESTIMATORS:
            raise ZoftError(f"estimator must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        if self.noise not in NOISE_SOURCES:
            raise ZoftError(f"noise must be one of {sorted(NOISE_SOURCES)}, got {self.noise!r}")
        if self.peft not in ("none", "lora", "prefix"):
            raise ZoftError(f"peft must be none, lora or prefix, got {self.peft!r}")
        if self.peft == "prefix" and self.prefix_tokens < 1:
            raise ZoftError(f"prefix-tokens must be >= 1, got {self.prefix_tokens}")
        if self.peft == "lora" and (self.lora_r < 1 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1):
            raise ZoftError("lora needs lora-r >= 1, lora-alpha > 0 and 0 <= lora-dropout < 1")
        if self.report_to not in ("none", "wandb"):
            raise ZoftError(f"report-to must be none or wandb, got {self.report_to!r}")

    def method(self, tuner_path: str | None = None) -> dict:
        estimator = {"name": self.estimator, "eps": self.eps}
        if self.estimator == "kernel":
            estimator.update(order=self.kernel_order, r_mode=self.r_mode, radius=self.radius,
                             shrink_steps=self.shrink_steps)
        return {
            "estimator": estimator,
            "perturbation": {"name": "learned", "path": tuner_path, "batch_size": self.batch_size}
            if tuner_path else {"name": "isotropic"},
            "update": {"name": "sgd", "lr": self.lr, "weight_decay": self.weight_decay,
                       "schedule": self.schedule, "total_steps": self.steps, "clip_norm": self.clip_norm,
                       "average": self.average},
        }


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _resolve_tuner(choice: str, model) -> str | None:
    """none: isotropic; auto: the shipped tuner made for this model, if any; else a path."""
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    from zoft.blocks import collect_blocks
    from zoft.tuner import find_shipped

    found = find_shipped(collect_blocks(model))
    print(f"tuner: {found.parent.name}" if found else "tuner: none shipped for this model; isotropic",
          file=sys.stderr)
    return str(found) if found else None


def _warn_if_other_eps(tuner_path: str, estimator: str, eps: float):
    """A tuner's scales fit the eps it was meta-trained at: it moves the perturbation onto a few
    blocks, and a larger eps takes those out of the linear regime (the shipped SmolLM2 tuner on
    tweets: eps 1e-2 instead of 1e-3 lost 5.5 and 9.5 points of final dev accuracy at lr 1e-5 and 3e-5).
    Only for the estimator it was meta-trained with: the kernel's radius r shrinks the
    perturbation, and with it the best eps is another (1e-2 for the shipped tuner)."""
    trained = json.loads(read_tuner(tuner_path)[1].get("estimator", "{}"))
    if trained.get("name") == estimator and not math.isclose(trained["eps"], eps, rel_tol=1e-6):
        warnings.warn(f"{tuner_path} was meta-trained at eps {trained['eps']:g} with {estimator}; this run uses eps {eps:g}")


def _with_adapters(model, cfg):
    """LoRA or prefix tuning through peft; LoRA's target modules default to peft's choice for
    the architecture."""
    if cfg.peft == "none":
        return model
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    if cfg.peft == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=cfg.prefix_tokens, task_type="CAUSAL_LM"))
        init_prefix_from_activations(model, cfg.seed)
        return model
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] or None
    try:
        return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                target_modules=targets, task_type="CAUSAL_LM"))
    except ValueError as e:
        raise ZoftError(f"cannot add LoRA adapters: {str(e).splitlines()[0]}") from None


@torch.no_grad()
def init_prefix_from_activations(model, seed: int):
    """MeZO's prefix initialisation (its App. E.5 calls it crucial for stability): the keys and
    values the model itself computes for random vocabulary tokens, instead of peft's N(0, 1)
    draws, which no layer has ever seen. Written in peft's layout: row p of the prefix embedding
    is [layer, key|value, head, head_dim] flattened."""
    config, weight = model.active_peft_config, model.prompt_encoder[model.active_adapter].embedding.weight
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.get_base_model().config.vocab_size, (1, config.num_virtual_tokens), generator=gen)
    cache = model.get_base_model()(input_ids=tokens.to(weight.device), use_cache=True).past_key_values
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # [2, heads, P, dim]
    stacked = torch.stack(per_layer)  # [layers, 2, heads, P, dim]
    weight.copy_(stacked.permute(3, 0, 1, 2, 4).reshape(config.num_virtual_tokens, -1))


def _snapshot_if_small(opt, limit_fraction: float = 0.1):
    """A copy of the starting trainable tensors when they are few (adapters): best-dev
    selection replays from it. Full fine-tuning reads the checkpoint instead of holding a copy."""
    trainable = sum(b.numel for b in opt.blocks)
    total = sum(p.numel() for p in opt.model.parameters())
    if trainable > limit_fraction * total:
        return None
    return {b.name: b.param.detach().clone() for b in opt.blocks}


def _restore_step(opt, cfg, upto: int, snapshot=None) -> bool:
    """Rebuild the weights after ``upto`` steps: the starting weights (a snapshot, or the model's
    checkpoint), then the recorded updates replayed (bit-identical). False when neither exists."""
    if snapshot is not None:
        initial = dict(snapshot)
    else:
        read = checkpoint_reader(cfg.model)
        initial = {b.name: read(b.name) for b in opt.blocks} if read else {}
        if not read or any(t is None for t in initial.values()):
            return False
    with torch.no_grad():
        for b in opt.blocks:
            b.param.data.copy_(initial.pop(b.name))
    opt.replay(opt.history[:upto])
    return True


def _save_trajectory(path: Path, opt, cfg):
    steps = opt.history
    tensors = {
        "seeds": torch.tensor([s.seeds for s in steps], dtype=torch.int64),
        "scales": torch.stack([s.scales for s in steps]),
    }
    if steps and steps[0].decay is not None:
        tensors["decay"] = torch.stack([s.decay for s in steps])
    if steps and steps[0].mix is not None:
        tensors["mix"] = torch.tensor([s.mix for s in steps], dtype=torch.float64)
    meta = {"format": "zoft-trajectory-1", "blocks": json.dumps([b.name for b in opt.blocks]),
            "noise": cfg.noise, "model": model_id(cfg.model), "zoft_version": zoft.__version__}
    save_file(tensors, str(path), metadata=meta)


def resolve_task(cfg):
    if cfg.task.startswith("jsonl:"):
        return jsonl_task(cfg.task[len("jsonl:"):], cfg.template, cfg.labels, cfg.label_field)
    return get_task(cfg.task)


def run(cfg: FinetuneConfig) -> dict:
    task = resolve_task(cfg)
    make_parts(**cfg.method())  # every hyperparameter is checked before anything is loaded
    if task.generates and cfg.objective != "loss":
        raise ZoftError(f"objective {cfg.objective} is for classification tasks; {task.name} trains on the answer's loss")
    if cfg.tuner not in ("none", "auto"):
        read_tuner(cfg.tuner)  # a missing or corrupt tuner fails before the model loads
    if cfg.num_dev is None:
        cfg = replace(cfg, num_dev=task.num_dev)
    splits = sample_splits(task, cfg.data_dir, cfg.num_train, cfg.num_dev, cfg.num_test, cfg.data_seed)
    name = cfg.run_name or f"{task.name.replace(':', '-')}-{cfg.estimator}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists():
        raise ZoftError(f"run directory already exists: {run_dir}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, tokenizer = load_model(cfg.model, device=device)
    model = _with_adapters(model, cfg)
    cand = candidate_token_ids(task, tokenizer, device)
    pad = tokenizer.pad_token_id
    train, dev, test = (encode(task, s, tokenizer, cfg.max_length) for s in (splits.train, splits.dev, splits.test))
    tuner_path = _resolve_tuner(cfg.tuner, model)
    if tuner_path:
        _warn_if_other_eps(tuner_path, cfg.estimator, cfg.eps)
    opt = build_optimizer(model, **cfg.method(tuner_path), noise=cfg.noise, num_directions=cfg.directions,
                          seed=cfg.seed, record=True)
    snapshot = _snapshot_if_small(opt)

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run_dir.parent))
    loggers = []
    try:
        config = {**asdict(cfg), "model_id": model_id(cfg.model), "device": device, "tuner_path": tuner_path,
                  "perturbation": opt.perturbation.name,
                  "num_blocks": len(opt.blocks), "trainable_params": sum(b.numel for b in opt.blocks),
                  "split_sizes": {"train": len(train), "dev": len(dev), "test": len(test)},
                  "versions": {"zoft": zoft.__version__, "torch": torch.__version__,
                               "transformers": __import__("transformers").__version__,
                               "python": platform.python_version()}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        loggers.append(JsonlLogger(tmp / "metrics.jsonl"))
        if cfg.report_to == "wandb":
            loggers.append(WandbLogger(tmp, config, cfg.wandb_project, name, group=f"{Path(cfg.model).name}/{cfg.task}",
                                       job_type=cfg.estimator,
                                       tags=[cfg.estimator, opt.perturbation.name, "full" if cfg.peft == "none" else cfg.peft, cfg.noise]))

        def log(metrics, step):
            for lg in loggers:
                lg.log(metrics, step)

        def evaluate_on(items):
            return evaluate_task(model, task, items, cand, tokenizer, cfg.eval_batch_size, device)

        start = time.perf_counter()
        test_before = evaluate_on(test)
        dev_eval = evaluate_on(dev)
        log({"dev/acc": dev_eval["acc"], "dev/loss": dev_eval["loss"], "test/acc_before": test_before["acc"]}, 0)
        best_acc, best_step = dev_eval["acc"], 0
        batches = Batches(train, cfg.batch_size, cfg.seed, pad, device)
        train_seconds, forward_passes = 0.0, 0
        bar = tqdm(range(cfg.steps), desc=f"zoft {cfg.task}", unit="step", file=sys.stderr, dynamic_ncols=True)
        for step in bar:
            batch = next(batches)
            t0 = time.perf_counter()
            loss = opt.step(lambda: classification_loss(model, batch, cand, cfg.objective, task.train_loss))
            train_seconds += time.perf_counter() - t0
            forward_passes += opt.last["forward_passes"]
            bar.set_postfix(loss=f"{loss:.3f}", fwd=forward_passes, s_step=f"{train_seconds / (step + 1):.2f}")
            log({"train/loss": loss, "train/loss_minus": opt.last["loss_minus"],
                 "train/proj_grad": opt.last["proj_grad"], "lr": opt.last["lr"],
                 "forward_passes": forward_passes, "train_seconds": train_seconds,
                 "peak_memory_mb": _peak_memory_mb(device)}, step + 1)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                dev_eval = evaluate_on(dev)
                tuner_scales = summarise_scales(opt.blocks, opt.last_scales) if tuner_path else {}
                log({"dev/acc": dev_eval["acc"], "dev/loss": dev_eval["loss"], "forward_passes": forward_passes,
                     **tuner_scales}, step + 1)
                if dev_eval["acc"] > best_acc:
                    best_acc, best_step = dev_eval["acc"], step + 1
        bar.close()
        final_dev_acc = dev_eval["acc"]
        selected = cfg.steps
        if best_step != cfg.steps and _restore_step(opt, cfg, best_step, snapshot):
            selected = best_step
        test_after = evaluate_on(test)
        _save_trajectory(tmp / "trajectory.safetensors", opt, cfg)
        if cfg.save_model:
            model.save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
        summary = {
            "task": cfg.task, "model": model_id(cfg.model), "method": cfg.estimator, "noise": cfg.noise,
            "metric": "f1" if task.generates else "accuracy",  # the one under the *_acc keys
            "test_acc_before": test_before["acc"], "test_acc_after": test_after["acc"],
            "selected_step": selected, "best_dev_acc": best_acc, "best_dev_step": best_step,
            "final_dev_acc": final_dev_acc, "steps": cfg.steps, "forward_passes": forward_passes,
            "train_seconds": train_seconds, "s_per_step": train_seconds / cfg.steps,
            "wall_seconds": time.perf_counter() - start, "peak_memory_mb": _peak_memory_mb(device),
            "device": device,
        }
        log({"test/acc": test_after["acc"]}, cfg.steps)
        for lg in loggers:
            lg.summary(summary)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for lg in loggers:
            lg.close()
        loggers.clear()
        tmp.rename(run_dir)
    except BaseException:
        for lg in loggers:
            lg.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["run_dir"] = str(run_dir)
    return summary


@dataclass
class EvalConfig(TaskConfig):
    pass


def zero_shot(cfg: EvalConfig) -> dict:
    """Accuracy and loss of the model as it is, on the task's test sample (MeZO's protocol)."""
    task = resolve_task(cfg)
    splits = sample_splits(task, cfg.data_dir, 1, task.num_dev, cfg.num_test, cfg.data_seed, for_training=False)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, tokenizer = load_model(cfg.model, device=device)
    cand = candidate_token_ids(task, tokenizer, device)
    items = encode(task, splits.test, tokenizer, cfg.max_length)
    result = evaluate_task(model, task, items, cand, tokenizer, cfg.eval_batch_size, device)
    return {"task": task.name, "model": model_id(cfg.model), "num_test": len(items), **result}
