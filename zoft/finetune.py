"""``zoft finetune``: MeZO's protocol around a ZOOptimizer: setup, loop, finish.

Everything a user can get wrong is checked before the model loads. A run lives in a hidden
folder ``.NAME.partial`` beside its final place and is renamed to NAME when it succeeds. Every
``checkpoint_every`` steps that folder holds a checkpoint of kilobytes (the trajectory so far,
the pieces' states, the data position and the loop's counters; never the weights, which are the
starting weights plus the replayed trajectory), so a killed run continues with
``zoft finetune --resume runs/NAME`` and ends bit for bit where the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import zoft
from zoft import trajectory
from zoft.adapters import with_adapters
from zoft.blocks import collect_blocks
from zoft.config import EvalConfig, FinetuneConfig, TaskConfig, torch_dtype  # noqa: F401 (re-exported)
from zoft import distributed
from zoft.data import Batches, candidate_token_ids, collate, encode
from zoft.errors import RunDiverged, RunStopped, ZoftError
from zoft.head import HeadStart, fit_probe, forward_passes
from zoft.logging import JsonlLogger, WandbLogger, check_metrics_kept
from zoft.models import checkpoint_reader, load_model, model_id
from zoft.optimizer import ZOOptimizer, build_optimizer, make_parts
from zoft.rundir import RunFolder, default_run_name
from zoft.scoring import METRICS, answer_f1_terms, classification_loss, evaluate_task, loss_terms
from zoft.tasks import get_task, jsonl_task, sample_splits
from zoft.tuner import read_tuner, summarise_scales, tuner_digest

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "zoft-finetune-checkpoint-1"
DIVERGED = 5.0  # the mean train loss of the last WINDOW steps over that of the first: diverging
WINDOW = 10
HEAD_START_CARD = ", from a head start (the label words' output rows fitted on the frozen model's features)"


@dataclass
class Progress:
    """The loop's counters: with the optimizer's state and the trajectory, all a resume needs."""

    step: int = 0
    forward_passes: int = 0
    train_seconds: float = 0.0
    test_before: float = 0.0
    best_acc: float = -math.inf
    best_step: int = 0
    dev_acc: float = 0.0
    metrics_bytes: int = 0
    data: dict = field(default_factory=dict)
    first_losses: list = field(default_factory=list)  # the first WINDOW train losses
    last_losses: list = field(default_factory=list)  # the latest WINDOW
    flat_steps: int = 0  # consecutive steps with a zero projected gradient


@dataclass
class Session:
    """What a run works with, set up once (``_setup``)."""

    cfg: FinetuneConfig
    task: object
    model: object
    tokenizer: object
    opt: object
    cand: object
    train: list
    dev: list
    test: list
    device: str
    tuner_path: str | None
    snapshot: dict | None
    folder: RunFolder
    group: distributed.Group = field(default_factory=distributed.Group)
    loggers: list = field(default_factory=list)
    stop: list = field(default_factory=list)  # the name of a signal asking the run to stop
    stepping: bool = False  # the loop has begun: a signal now waits for the step's end
    head: HeadStart | None = None  # the label rows the run started from (--head-init probe)
    head_items: list = field(default_factory=list)  # the examples the probe is fitted on

    @property
    def work(self) -> Path:
        return self.folder.partial

    @property
    def run_dir(self) -> Path:
        return self.folder.run_dir

    def log(self, metrics: dict, step: int):
        for lg in self.loggers:
            lg.log(metrics, step)

    def evaluate(self, items) -> dict:
        return evaluate_task(self.model, self.task, items, self.cand, self.tokenizer, self.cfg.eval_batch_size,
                             self.device)


def partial_dir(run_dir: Path) -> Path:
    return RunFolder(run_dir).partial


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_task(cfg):
    if cfg.task.startswith("jsonl:"):
        return jsonl_task(cfg.task[len("jsonl:"):], cfg.template, cfg.labels, cfg.label_field)
    return get_task(cfg.task)


def _resolve_device(choice: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


def _resolve_tuner(choice: str, blocks) -> str | None:
    """none: isotropic; auto: the shipped tuner made for these blocks, if any; else a path."""
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    from zoft.block_scales import find_shipped_allocation
    from zoft.tuner import find_shipped

    found = find_shipped(blocks)
    if found:
        print(f"tuner: {found.parent.name}", file=sys.stderr)
        return str(found)
    allocation = find_shipped_allocation(blocks)  # e.g. for --peft lora, whose blocks no tuner is made for
    hint = f" (--perturbation block_scales --scales-file auto reads the allocation {allocation} made for them)" if allocation else ""
    print(f"tuner: none shipped for these blocks; isotropic{hint}", file=sys.stderr)
    return None


def _resolve_scales_file(blocks) -> str:
    from zoft.block_scales import resolve_scales_file

    path = resolve_scales_file("auto", blocks)
    print(f"scales: {path}", file=sys.stderr)
    return path


def _warn_if_other_eps(tuner_path: str, method: dict):
    """A tuner's scales fit the eps it was meta-trained at: it moves the perturbation onto a few
    blocks, and a larger eps takes those out of the linear regime (the shipped SmolLM2 tuner on
    tweets: eps 1e-2 instead of 1e-3 lost 5.5 and 9.5 points of final dev accuracy at lr 1e-5 and
    3e-5). Only for the estimator it was meta-trained with: the kernel's radius r shrinks the
    perturbation, and with it the best eps is another (1e-2 for the shipped tuner)."""
    try:
        trained = json.loads(read_tuner(tuner_path)[1].get("estimator", "{}"))
    except json.JSONDecodeError:
        raise ZoftError(f"{tuner_path}: the tuner header's 'estimator' is not JSON") from None
    ours = method["estimator"]
    if trained.get("name") == ours["name"] and not math.isclose(trained["eps"], ours["eps"], rel_tol=1e-6):
        warnings.warn(f"{tuner_path} was meta-trained at eps {trained['eps']:g} with {ours['name']};"
                      f" this run uses eps {ours['eps']:g}")


def _snapshot_if_small(opt, adapters: bool, limit_fraction: float = 0.1):
    """A copy of the starting trainable tensors when they are few, or adapters (which no
    checkpoint holds): best-dev selection replays from it. Full fine-tuning reads the checkpoint
    instead of holding a copy."""
    trainable = sum(b.numel for b in opt.blocks)
    total = sum(p.numel() for p in opt.model.parameters())
    if trainable > limit_fraction * total and not adapters:
        return None
    return {b.name: b.param.detach().clone() for b in opt.blocks}


def restore_step(opt, model_name: str, upto: int, snapshot: dict | None = None, head: HeadStart | None = None) -> bool:
    """Rebuild the weights after ``upto`` steps: the starting weights (a snapshot, or the model's
    checkpoint, with the run's head start), then the recorded updates replayed (bit-identical).
    False when neither exists."""
    if snapshot is not None:
        initial = dict(snapshot)
    else:
        read = checkpoint_reader(model_name)
        initial = {b.name: read(b.name) for b in opt.blocks} if read else {}
        if read and any(t is None for t in initial.values()):
            initial = _loaded_weights(model_name, [b.name for b in opt.blocks])
        if not read or initial is None:
            return False
    with torch.no_grad():
        for b in opt.blocks:
            b.param.data.copy_(initial.pop(b.name))
    if head is not None:
        head.apply(opt.model)
    opt.replay(opt.history[:upto])
    return True


def _loaded_weights(model_name: str, names: list[str]) -> dict | None:
    """The starting weights as transformers loads them, for checkpoints whose keys it renames on
    load (GPT-NeoX's embed_out, fused experts): a second copy of the model, briefly."""
    from transformers import AutoModelForCausalLM

    from zoft.models import resolve

    fresh = dict(AutoModelForCausalLM.from_pretrained(resolve(model_name)).named_parameters())
    if not all(n in fresh for n in names):
        return None
    return {n: fresh[n].detach() for n in names}


def checked(cfg: FinetuneConfig):
    """(cfg with the task's defaults, task, splits): every user error, before anything loads."""
    task = resolve_task(cfg)
    make_parts(**cfg.method())
    if cfg.head_init == "probe" and task.train_loss != "choice":
        raise ZoftError(f"--head-init probe needs a classification task; {task.name} scores answer sequences")
    if task.generates and cfg.objective not in ("loss", "f1"):
        raise ZoftError(f"objective {cfg.objective} is for classification and multiple-choice tasks; {task.name}"
                        " trains on the answer's loss or on the token F1 of its greedy answers (f1)")
    if cfg.tuner not in ("none", "auto"):
        read_tuner(cfg.tuner)  # a missing or corrupt tuner fails before the model loads
    if cfg.num_dev is None:
        cfg = replace(cfg, num_dev=task.num_dev)
    splits = sample_splits(task, cfg.data_dir, cfg.num_train, cfg.num_dev, cfg.num_test, cfg.data_seed)
    head_split(splits.train, cfg)  # a share that leaves ZO nothing fails before the model loads
    return cfg, task, splits


def head_split(train: list, cfg: FinetuneConfig) -> tuple[list, list]:
    """(the probe's examples, ZO's): with --head-share below 1 the first share of the (randomly
    drawn) training sample goes to the probe and the rest to ZO alone, so that ZO's loss is measured
    on examples the fitted rows have not seen; otherwise both get all of them. Fixed by the config,
    so a resumed run trains on the same part."""
    if cfg.head_init != "probe":
        return [], train
    if cfg.head_share == 1:
        return train, train
    n = math.ceil(cfg.head_share * len(train))
    if n >= len(train):
        raise ZoftError(f"--head-share {cfg.head_share} leaves none of the {len(train)} training examples to ZO")
    return train[:n], train[n:]


def _setup(cfg, task, splits, folder: RunFolder, group: distributed.Group) -> Session:
    device = _resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, dtype=torch_dtype(cfg.dtype, device), device=device)
    model = with_adapters(model, cfg, cfg.seed)
    cand = candidate_token_ids(task, tokenizer, device)
    encoded = [encode(task, part, tokenizer, cfg.max_length) for part in (splits.train, splits.dev, splits.test)]
    head_items, encoded[0] = head_split(encoded[0], cfg)
    blocks = collect_blocks(model)  # what a shipped tuner or allocation must have been made for
    tuner_path = _resolve_tuner(cfg.tuner, blocks)
    if cfg.scales_file == "auto":  # the run records the file it read, so a resume or replay reads it again
        cfg = replace(cfg, scales_file=_resolve_scales_file(blocks))
    method = cfg.method(tuner_path)
    if tuner_path:
        _warn_if_other_eps(tuner_path, method)
    by_direction = group if group.world > 1 and cfg.parallel == "directions" else None
    opt = build_optimizer(model, method["estimator"], method["perturbation"], method["update"], noise=method["noise"],
                          num_directions=cfg.directions, seed=cfg.seed, record=True, direction_group=by_direction,
                          master_weights=cfg.master_weights)
    return Session(cfg, task, model, tokenizer, opt, cand, *encoded, device, tuner_path, _snapshot_if_small(opt, cfg.peft != "none"),
                   folder, group, head_items=head_items)


def _write_config(s: Session):
    cfg = s.cfg
    config = {**asdict(cfg), "model_id": model_id(cfg.model), "device": s.device, "tuner_path": s.tuner_path,
              "tuner_sha256": tuner_digest(s.tuner_path) if s.tuner_path else None,
              "method": cfg.method(s.tuner_path), "num_blocks": len(s.opt.blocks),
              "trainable_params": sum(b.numel for b in s.opt.blocks),
              "split_sizes": {"train": len(s.train), "head": len(s.head_items), "dev": len(s.dev), "test": len(s.test)},
              "versions": {"zoft": zoft.__version__, "torch": torch.__version__,
                           "transformers": __import__("transformers").__version__,
                           "python": platform.python_version()}}
    if s.group.main:
        (s.work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def _open_loggers(s: Session, config: dict, keep_bytes: int | None):
    cfg = s.cfg
    if not s.group.main:  # rank 0 alone writes the run folder
        return
    s.loggers.append(JsonlLogger(s.work / "metrics.jsonl", keep_bytes))
    if cfg.report_to == "wandb":
        method = config["method"]
        s.loggers.append(WandbLogger(
            s.work, config, cfg.wandb_project, s.run_dir.name, group=f"{Path(cfg.model).name}/{cfg.task}",
            job_type=method["estimator"]["name"],
            tags=[method["estimator"]["name"], method["perturbation"]["name"], method["update"]["name"],
                  "full" if cfg.peft == "none" else cfg.peft, method["noise"]["name"]]))


def _save_checkpoint(s: Session, p: Progress, batches: Batches):
    if not s.group.main:
        return
    p.data, p.metrics_bytes = batches.state_dict(), s.loggers[0].position()
    tensors, rest = s.opt.state_dict()
    tensors.update({f"trajectory/{k}": v for k, v in trajectory.to_tensors(s.opt.history, len(s.opt.blocks)).items()})
    tensors.update(s.head.tensors() if s.head else {})
    meta = {"format": CHECKPOINT_FORMAT, "optimizer": json.dumps(rest), "progress": json.dumps(asdict(p))}
    tmp = s.work / f".{CHECKPOINT}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, s.work / CHECKPOINT)  # a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(s: Session) -> Progress:
    path = s.work / CHECKPOINT
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ZoftError(f"{path} is not a readable checkpoint: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ZoftError(f"{path}: checkpoint format {meta.get('format')!r}; this zoft reads {CHECKPOINT_FORMAT}")
    prefix = "trajectory/"
    s.opt.history = trajectory.from_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    s.head = HeadStart.from_tensors(tensors)
    if s.head:
        s.head.apply(s.model)
    s.opt.replay(s.opt.history)  # the starting weights, moved step by step as the run moved them
    s.opt.load_state_dict({k: v for k, v in tensors.items() if not k.startswith((prefix, "head/"))},
                          json.loads(meta["optimizer"]))
    return Progress(**json.loads(meta["progress"]))


def _evaluate_dev(s: Session, p: Progress, step: int):
    dev = s.evaluate(s.dev)
    scales = summarise_scales(s.opt.blocks, s.opt.last_scales) if s.tuner_path else {}
    s.log({"dev/acc": dev["acc"], "dev/loss": dev["loss"], "forward_passes": p.forward_passes, **scales}, step)
    p.dev_acc = dev["acc"]
    if dev["acc"] > p.best_acc:
        p.best_acc, p.best_step = dev["acc"], step


def _start(s: Session, p: Progress):
    p.test_before = s.evaluate(s.test)["acc"]
    p.step = 0
    if s.cfg.head_init == "probe":
        s.head, metrics = fit_probe(s.model, s.head_items, s.cand, s.tokenizer.pad_token_id, s.cfg.eval_batch_size,
                                    s.device, s.group, s.cfg.seed)
        s.head.apply(s.model)
        s.opt.restart_master()  # an fp32 master copy must hold the fitted rows too
        p.forward_passes += forward_passes(len(s.head_items), s.cfg.batch_size)
        s.log(metrics, 0)
    _evaluate_dev(s, p, 0)
    s.log({"test/acc_before": p.test_before}, 0)


def _loop(s: Session, p: Progress):
    cfg, opt = s.cfg, s.opt
    s.stepping = True
    batches = Batches(s.train, cfg.batch_size, cfg.seed, s.tokenizer.pad_token_id, s.device)
    if p.data:
        batches.load_state_dict(p.data)
    bar = tqdm(range(p.step, cfg.steps), initial=p.step, total=cfg.steps, desc=f"zoft {cfg.task}", unit="step",
               file=sys.stderr, dynamic_ncols=True, disable=not s.group.main)
    for step in bar:
        t0 = time.perf_counter()
        loss = opt.step(_closure(s, batches.next_items()))
        p.train_seconds += time.perf_counter() - t0
        p.forward_passes += opt.last["forward_passes"]
        bar.set_postfix(loss=f"{loss:.3f}", fwd=p.forward_passes, s_step=f"{p.train_seconds / (step + 1):.2f}")
        s.log({"train/loss": loss, "train/loss_minus": opt.last["loss_minus"], "train/proj_grad": opt.last["proj_grad"],
               "lr": opt.last["lr"], "forward_passes": p.forward_passes, "train_seconds": p.train_seconds,
               "peak_memory_mb": _peak_memory_mb(s.device)}, step + 1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            _evaluate_dev(s, p, step + 1)
        p.step = step + 1
        _watch(s, p, loss)
        if p.step % cfg.checkpoint_every == 0 or p.step == cfg.steps or s.stop:
            _save_checkpoint(s, p, batches)
        if s.stop:
            raise RunStopped(f"stopped by {s.stop[0]} at step {p.step}; continue with: zoft finetune --resume"
                             f" {s.run_dir}", exit_code=130 if s.stop[0] == "SIGINT" else 143)
    bar.close()


def _closure(s: Session, items: list):
    """The step's loss: the whole batch at once, or (with --accumulate, or data parallel, or for
    the F1 of generated answers) the float64 mean of its micro-batches over the ranks
    (zoft/distributed.py)."""
    cfg = s.cfg
    if cfg.accumulate > 1 or (s.group.world > 1 and cfg.parallel == "data") or _scores_answers(s):
        group = s.group if cfg.parallel == "data" else distributed.Group()
        return distributed.ShardedLoss(*_micro_batch_objective(s), cfg.accumulate, group).closure(items)
    batch = collate(items, s.tokenizer.pad_token_id, s.device)
    return lambda: classification_loss(s.model, batch, s.cand, cfg.objective, s.task.train_loss)


def _scores_answers(s: Session) -> bool:
    return s.task.generates and s.cfg.objective == "f1"


def _micro_batch_objective(s: Session):
    """(prepare, terms) for ShardedLoss: the F1 of generated answers needs the items (prompts
    and gold strings), every other objective collated tensors."""
    if _scores_answers(s):
        return list, lambda chunk: answer_f1_terms(s.model, chunk, s.tokenizer)
    return (lambda chunk: collate(chunk, s.tokenizer.pad_token_id, s.device),
            lambda batch: loss_terms(s.model, batch, s.cand, s.cfg.objective, s.task.train_loss))


def _watch(s: Session, p: Progress, loss: float):
    """Stop a run that diverges (its train loss far above where it started) or collapses (the
    loss no longer changes under the perturbation), with what to lower."""
    if s.cfg.objective in METRICS:  # a batch metric is a step function: flat and signed by design
        return
    last = s.opt.last
    if len(p.first_losses) < WINDOW:
        p.first_losses.append(loss)
    p.last_losses = (p.last_losses + [loss])[-WINDOW:]
    p.flat_steps = p.flat_steps + 1 if last["loss_plus"] == last["loss_minus"] else 0
    start, now = sum(p.first_losses) / len(p.first_losses), sum(p.last_losses) / len(p.last_losses)
    lr, eps = s.opt.update.cfg.lr, s.opt.estimator.eps
    if p.step >= 2 * WINDOW and now > DIVERGED * start:
        raise RunDiverged(f"the run diverges: mean train loss {now:.4g} over the last {WINDOW} steps, {start:.4g} over"
                          f" the first (step {p.step}); lower lr (now {lr:g})")
    if p.flat_steps >= WINDOW and len(set(p.last_losses)) == 1:
        raise RunDiverged(f"the run has collapsed: L+ = L- = {loss:.4g} for {WINDOW} steps (step {p.step}), so the"
                          f" perturbation no longer moves the loss; lower lr (now {lr:g}) or eps (now {eps:g})")


def _finish(s: Session, p: Progress, started: float) -> dict:
    cfg = s.cfg
    selected = cfg.steps
    if p.best_step != cfg.steps:
        if restore_step(s.opt, cfg.model, p.best_step, s.snapshot, s.head):
            selected = p.best_step
        else:
            warnings.warn(f"the starting weights of {cfg.model} cannot be read back, so the best-dev model (step"
                          f" {p.best_step}) cannot be rebuilt; the model of the last step is tested")
    if selected == 0:
        start = "the head start's (no ZO step)" if s.head else "the untouched one"
        warnings.warn(f"no step improved on the starting dev accuracy {p.best_acc:.4f}; the model tested is"
                      f" {start} (try another lr)")
    test_after = s.evaluate(s.test)
    summary = {
        "task": cfg.task, "model": model_id(cfg.model), "method": cfg.estimator, "noise": cfg.noise,
        "metric": "f1" if s.task.generates else "accuracy",  # the one under the *_acc keys
        "test_acc_before": p.test_before, "test_acc_after": test_after["acc"], "selected_step": selected,
        "best_dev_acc": p.best_acc, "best_dev_step": p.best_step, "final_dev_acc": p.dev_acc, "steps": cfg.steps,
        "forward_passes": p.forward_passes, "train_seconds": p.train_seconds, "s_per_step": p.train_seconds / cfg.steps,
        "wall_seconds": time.perf_counter() - started, "peak_memory_mb": _peak_memory_mb(s.device), "device": s.device,
        "world_size": s.group.world, "head_init": cfg.head_init,
    }
    if not s.group.main:
        return summary
    trajectory.save(s.work / "trajectory.safetensors", s.opt, cfg.method(s.tuner_path), model_id(cfg.model), s.head)
    if cfg.save_model:
        save_model(s.model, s.tokenizer, cfg, cfg.method(s.tuner_path), s.work / "model")
    s.log({"test/acc": test_after["acc"]}, cfg.steps)
    for lg in s.loggers:
        lg.summary(summary)
    (s.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _execute(s: Session, p: Progress | None) -> dict:
    """Run (p None: from the start) or continue (p from a checkpoint), then rename into place.
    A ZoftError (a diverging run) removes the folder; a signal, a full disk or any other
    failure after the first checkpoint keeps it, for --resume."""
    started = time.perf_counter()
    try:
        fresh = p is None
        with _stop_on_signals(s.stop, at_once=lambda: fresh and not s.stepping):
            config = _write_config(s) if p is None else json.loads((s.work / "config.json").read_text())
            _open_loggers(s, config, None if p is None else p.metrics_bytes)
            if p is None:
                p = Progress()
                _start(s, p)
            _loop(s, p)
            summary = _finish(s, p, started)
    except RunStopped:
        _close(s)
        if s.folder.resumable:
            s.folder.release()
        else:  # stopped before its first step: nothing to resume
            s.folder.discard()
        raise
    except ZoftError as e:
        _close(s)
        if isinstance(e, RunDiverged) and (s.work / "metrics.jsonl").is_file():
            e.metrics = (s.work / "metrics.jsonl").read_text()  # the curve up to the divergence, for a sweep's record
        s.folder.discard()
        raise
    except OSError as e:
        _close(s)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            _keep_or_discard(s)
            raise
        if s.folder.resumable:
            s.folder.release()
            raise RunStopped(f"no space left on device ({e.filename or s.work}); free some, then continue with:"
                             f" zoft finetune --resume {s.run_dir}") from None
        s.folder.discard()
        raise ZoftError(f"no space left on device ({e.filename or s.work})") from None
    except BaseException:
        _close(s)
        _keep_or_discard(s)
        raise
    _close(s)
    s.folder.commit()
    summary["run_dir"] = str(s.run_dir)
    return summary


def _keep_or_discard(s: Session):
    if s.folder.resumable:
        s.folder.release()
        print(f"zoft: run kept; continue it with: zoft finetune --resume {s.run_dir}", file=sys.stderr)
    else:
        s.folder.discard()


@contextlib.contextmanager
def _stop_on_signals(stop: list, at_once=lambda: False):
    """SIGTERM and SIGINT ask the loop to checkpoint and stop after the current step; while
    ``at_once()`` (a fresh run before its first step: minutes of evaluation, no step to save)
    they stop it there and then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(num, _frame):
        name = signal.Signals(num).name
        stop.append(name)
        if at_once():
            raise RunStopped(f"stopped by {name} before the first step; nothing to resume",
                             exit_code=130 if name == "SIGINT" else 143)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _close(s: Session):
    for lg in s.loggers:
        lg.close()
    s.loggers.clear()


def run(cfg: FinetuneConfig) -> dict:
    cfg, task, splits = checked(cfg)
    name = cfg.run_name or default_run_name(cfg, task.name)
    group = distributed.from_env(_resolve_device(cfg.device))
    folder = RunFolder(Path(cfg.output_dir) / group.broadcast_text(name), owner=group.main)
    folder.reserve()  # before the model loads: a taken name or an unwritable folder fails now
    group.barrier()
    try:
        s = _setup(cfg, task, splits, folder, group)
    except BaseException:
        folder.discard()
        raise
    return _execute(s, None)


def saved_config(config: dict) -> FinetuneConfig:
    """The FinetuneConfig a run's config.json was written from."""
    known = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in config.items() if k in known})


def resume(run_dir) -> dict:
    """Continue a killed run from its last checkpoint, with the settings it was started with."""
    RunFolder(Path(run_dir), owner=False).claim()  # is there anything to resume?
    cfg, task, splits = checked(saved_config(json.loads((partial_dir(Path(run_dir)) / "config.json").read_text())))
    group = distributed.from_env(_resolve_device(cfg.device))
    folder = RunFolder(Path(run_dir), owner=group.main)
    folder.claim()
    group.barrier()
    try:
        s = _setup(cfg, task, splits, folder, group)
        progress = _load_checkpoint(s)
        check_metrics_kept(s.work / "metrics.jsonl", progress.metrics_bytes)
    except BaseException:  # the folder stays as it was
        folder.release()
        raise
    return _execute(s, progress)


def save_model(model, tokenizer, cfg, method: dict, folder: Path):
    """The model (or peft's adapters) and tokenizer, with a card that says how it was trained: the
    same bytes from --save-model and from zoft replay, so nothing in it depends on the run's time."""
    from huggingface_hub import ModelCard, ModelCardData

    adapters = cfg.peft != "none"
    # A head start wrote the label rows into the frozen embedding: peft saves it beside the
    # adapters, and PeftModel.from_pretrained loads it back, so the adapters alone are not the model.
    model.save_pretrained(folder, **({"save_embedding_layers": True} if adapters and cfg.head_init == "probe" else {}))
    tokenizer.save_pretrained(folder)
    data = ModelCardData(base_model=model_id(cfg.model).split(" ")[0], library_name="peft" if adapters else "transformers",
                         datasets=[cfg.task], tags=["zoft", "zeroth-order", method["estimator"]["name"],
                                                    *([cfg.peft] if adapters else [])])
    spec = json.dumps({k: v for k, v in method.items() if k != "noise"}, sort_keys=True)
    body = (f"# {'Adapters' if adapters else 'Model'} fine-tuned with zoft\n\n"
            f"Zeroth-order fine-tuning (forward passes only) of {model_id(cfg.model)} on `{cfg.task}`"
            f"{f' through peft ({cfg.peft})' if adapters else ' (every weight)'}: {cfg.steps} steps of batch"
            f" {cfg.batch_size}, {cfg.directions} direction(s) a step, seed {cfg.seed}"
            f"{HEAD_START_CARD if cfg.head_init == 'probe' else ''};"
            f" the model saved is the one with the best dev accuracy. Method (zoft {zoft.__version__}):\n\n    {spec}\n\n"
            "The run's `trajectory.safetensors` rebuilds these weights from the base model: `zoft replay RUN --out DIR`.\n")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


def recorded_optimizer(model, meta: dict, cfg: FinetuneConfig, path) -> ZOOptimizer:
    """The optimizer a trajectory file was recorded with, built on ``model`` and checked against
    the file, and the model set to the run's head start if it had one: ``replay`` then re-applies
    its steps exactly."""
    method = meta["method"]
    opt = build_optimizer(model, method["estimator"], method["perturbation"], method["update"], noise=meta["noise"],
                          num_directions=int(meta["directions"]), seed=int(meta["seed"]),
                          master_weights=cfg.master_weights)
    trajectory.check_matches(meta, opt, path)
    if meta["head"] is not None:
        meta["head"].apply(model)
    return opt


def rebuilt_models(run_dir, steps: list[int] | None = None):
    """Yields (model, tokenizer, cfg, method) of a finished run after each of its first ``steps``
    steps (rising; its selected model by default), rebuilt from the base model and its
    trajectory.safetensors: one model, replayed on from the last point (the recorded terms are all
    a step needs), so a whole trajectory costs one replay."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        selected = json.loads((run_dir / "summary.json").read_text())["selected_step"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ZoftError(f"{run_dir} is not a complete run directory ({type(e).__name__}: {e})") from None
    recorded, meta = trajectory.read(run_dir / "trajectory.safetensors")
    steps = [selected] if steps is None else list(steps)
    for step in steps:
        if not 0 <= step <= len(recorded):
            raise ZoftError(f"{run_dir} recorded {len(recorded)} steps, not {step}")
    if steps != sorted(steps):
        raise ZoftError(f"steps to rebuild at must rise, got {steps}")
    cfg = saved_config(config)
    if len(steps) > 1 and (meta["method"]["update"].get("average") or cfg.master_weights):
        raise ZoftError(f"{run_dir}: an averaged or master-weight run replays from step 0 only: one step at a time")
    device = config.get("device", "cpu")
    model, tokenizer = load_model(cfg.model, dtype=torch_dtype(cfg.dtype, device), device=device)
    model = with_adapters(model, cfg, cfg.seed)
    opt = recorded_optimizer(model, meta, cfg, run_dir / "trajectory.safetensors")
    done = 0
    for step in steps:
        opt.replay(recorded[done:step])
        done = step
        yield model, tokenizer, cfg, meta["method"]


def rebuilt_model(run_dir, step: int | None = None):
    """(model, tokenizer, cfg, method) of a finished run after its first ``step`` steps (its
    selected model by default): see rebuilt_models."""
    return next(rebuilt_models(run_dir, None if step is None else [step]))


def replay_run(run_dir, out) -> Path:
    """Rebuild a run's selected model from the base model and its trajectory.safetensors, into
    ``out``: the same files as ``--save-model`` writes."""
    out = Path(out)
    if out.exists():
        raise ZoftError(f"output already exists: {out}")
    model, tokenizer, cfg, method = rebuilt_model(run_dir)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, cfg, method, tmp)
    tmp.rename(out)
    return out


def zero_shot(cfg: EvalConfig) -> dict:
    """Accuracy and loss of the model as it is, on the task's test sample (MeZO's protocol)."""
    task = resolve_task(cfg)
    splits = sample_splits(task, cfg.data_dir, 1, task.num_dev, cfg.num_test, cfg.data_seed, for_training=False)
    device = _resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, dtype=torch_dtype(cfg.dtype, device), device=device)
    cand = candidate_token_ids(task, tokenizer, device)
    items = encode(task, splits.test, tokenizer, cfg.max_length)
    result = evaluate_task(model, task, items, cand, tokenizer, cfg.eval_batch_size, device)
    return {"task": task.name, "model": model_id(cfg.model), "num_test": len(items), **result}
