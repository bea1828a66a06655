"""Run configuration: the loop's own fields, plus one field per setting of the registered pieces.

``FinetuneConfig`` is built from the registry: every estimator, perturbation, update and noise
config contributes its fields (``--eps``, ``--kernel-order``, ``--beta``, ...), so a new piece's
settings become flags, grid keys and recorded config without being written again. ``method``
turns the flat fields into the three piece specs (with every default filled in), which is what
a run records and what ``zoft compare`` groups by.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, make_dataclass

import torch

from zoft.errors import ZoftError
from zoft.models import DEFAULT_MODEL
from zoft.registry import entry, full_spec, names, piece_fields

PIECE_KINDS = ("estimator", "perturbation", "update", "noise")
# loss: the task's own training loss (MeZO's: cross-entropy over the label words, or the gold
# option's token loss for multiple choice); choice: cross-entropy over each example's options,
# what dev loss reports; accuracy, f1: the negative of a batch metric
OBJECTIVES = ("loss", "choice", "accuracy", "f1")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The weights' dtype: as asked, or fp32 on CPU and bf16 on CUDA."""
    return DTYPES[name] or (torch.bfloat16 if device == "cuda" else torch.float32)
# piece settings the loop fills in itself, never flags: the tuner's path (--tuner), the batch
# size and horizon (--batch-size, --steps), and what a tuner's header records
DERIVED = {"path", "batch_size", "total_steps", "dim_rule", "tokens_per_example"}


def command_flags(cfg, skip=()) -> str:
    """The command-line flags that rebuild a config dataclass, less the fields in ``skip`` and
    the unset ones."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v not in (None, "") and k not in skip)


def _check_positive(cfg, *names_):
    for name in names_:
        if getattr(cfg, name) < 1:
            raise ZoftError(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")


@dataclass
class TaskConfig:
    """Model, task and data: what zoft eval and zoft finetune share."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "hub id, local path, or the embedded default"})
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
    dtype: str = field(default="auto", metadata={"help": "fp32, bf16 or fp16; auto: fp32 on CPU, bf16 on CUDA"})

    def __post_init__(self):
        _check_positive(self, "num_test", "eval_batch_size", "max_length")
        if self.dtype not in DTYPES:
            raise ZoftError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ZoftError(f"device must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ZoftError("device cuda asked for, but no CUDA device is available")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise ZoftError("device mps asked for, but no Apple GPU (MPS) is available")


@dataclass
class EvalConfig(TaskConfig):
    pass


@dataclass
class AdapterConfig:
    """peft adapters (zoft/adapters.py): what zoft finetune and zoft meta-allocate share, so an
    allocation is measured on the blocks the fine-tune will perturb."""

    peft: str = field(default="none", metadata={"help": "none (full-parameter), lora or prefix, through peft"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""
    prefix_tokens: int = 5

    def unread_adapter_fields(self) -> set[str]:
        """The adapter fields this choice of peft ignores (all of them without peft)."""
        read = {"none": set(), "lora": {"peft", "lora_r", "lora_alpha", "lora_dropout", "lora_targets"},
                "prefix": {"peft", "prefix_tokens"}}[self.peft]
        return {f.name for f in fields(AdapterConfig)} - read

    def adapter_flags(self) -> str:
        """The command-line flags that rebuild these adapters ('' without peft)."""
        adapters = AdapterConfig(**{f.name: getattr(self, f.name) for f in fields(AdapterConfig)})
        return command_flags(adapters, skip=self.unread_adapter_fields())

    def check_adapters(self):
        if self.peft not in ("none", "lora", "prefix"):
            raise ZoftError(f"peft must be none, lora or prefix, got {self.peft!r}")
        if self.peft == "prefix" and self.prefix_tokens < 1:
            raise ZoftError(f"prefix-tokens must be >= 1, got {self.prefix_tokens}")
        if self.peft == "lora" and (self.lora_r < 1 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1):
            raise ZoftError("lora needs lora-r >= 1, lora-alpha > 0 and 0 <= lora-dropout < 1")


@dataclass
class LoopConfig(AdapterConfig, TaskConfig):
    num_train: int = 1000
    num_dev: int | None = field(default=None, metadata={"help": "default: the task's (500; 100 for CB)"})
    steps: int = 1000
    batch_size: int = 16
    directions: int = 1
    accumulate: int = field(default=1, metadata={
        "help": "micro-batches per probe (the same direction for all): the batch's loss in pieces"})
    parallel: str = field(default="data", metadata={
        "help": "under torchrun: data (each rank a shard of the batch) or directions (each rank its own directions)"})
    estimator: str = "spsa"
    perturbation: str = "isotropic"
    update: str = "sgd"
    noise: str = "table"
    tuner: str = "none"
    head_init: str = field(default="none", metadata={
        "help": "probe: first fit the label words' output rows on the frozen model's features (zoft/head.py)"})
    head_share: float = field(default=1.0, metadata={
        "help": "with --head-init probe: the share of the training examples the probe is fitted on; below 1, ZO"
                " trains on the others alone, whose loss the fitted rows have not seen"})
    objective: str = "loss"
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = field(default=25, metadata={
        "help": "steps between resume checkpoints (kilobytes: the trajectory, never the weights)"})
    master_weights: bool = field(default=False, metadata={
        "help": "bf16/fp16: updates go into an fp32 copy of the trainable tensors (4 bytes a parameter)"})
    output_dir: str = "runs"
    run_name: str | None = None
    save_model: bool = False
    report_to: str = "none"
    wandb_project: str = "zoft"

    def __post_init__(self):
        super().__post_init__()
        _check_positive(self, "steps", "batch_size", "directions", "eval_every", "num_train", "checkpoint_every",
                        "accumulate")
        if self.parallel not in ("data", "directions"):
            raise ZoftError(f"parallel must be data or directions, got {self.parallel!r}")
        if self.batch_size % self.accumulate:
            raise ZoftError(f"batch-size {self.batch_size} must be a multiple of accumulate {self.accumulate}")
        if self.num_dev is not None and self.num_dev < 1:
            raise ZoftError(f"num-dev must be >= 1, got {self.num_dev}")
        for kind in PIECE_KINDS:
            if getattr(self, kind) not in names(kind):
                raise ZoftError(f"{kind} must be one of {', '.join(names(kind))}, got {getattr(self, kind)!r}")
        if self.tuner != "none" and self.perturbation != "isotropic":
            raise ZoftError(f"--tuner sets the perturbation; it cannot be combined with --perturbation {self.perturbation}")
        if self.head_init not in ("none", "probe"):
            raise ZoftError(f"head-init must be none or probe, got {self.head_init!r}")
        if not 0 < self.head_share <= 1:
            raise ZoftError(f"head-share must be in (0, 1], got {self.head_share}")
        if self.head_share < 1 and self.head_init != "probe":
            raise ZoftError("--head-share splits the training set between the probe and ZO; it needs --head-init probe")
        if self.objective not in OBJECTIVES:
            raise ZoftError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        self.check_adapters()
        if self.report_to not in ("none", "wandb"):
            raise ZoftError(f"report-to must be none or wandb, got {self.report_to!r}")

    def method(self, tuner_path: str | None = None) -> dict:
        """The three piece specs and the noise spec, every default filled in."""
        return method_from(vars(self), tuner_path)


def method_from(values: Mapping, tuner_path: str | None = None) -> dict:
    """Piece specs from flat settings (a config's fields, or an old run's config.json)."""
    derived = {"total_steps": values.get("steps", 0), "batch_size": values.get("batch_size", 16), "path": tuner_path}
    chosen = {kind: values.get(kind, default) for kind, default in
              (("estimator", "spsa"), ("perturbation", "isotropic"), ("update", "sgd"), ("noise", "table"))}
    if tuner_path:
        chosen["perturbation"] = "learned"
    specs = {}
    for kind, name in chosen.items():
        cfg_cls, _ = entry(kind, name)
        spec = {"name": name}
        for f in fields(cfg_cls):
            source = derived if f.name in DERIVED else values
            if source.get(f.name) is not None:
                spec[f.name] = source[f.name]
        specs[kind] = full_spec(kind, spec)
    return specs


def _piece_field_list() -> list[tuple]:
    types = {"int": int, "float": float, "str": str, "bool": bool}
    out, seen = [], {f.name for f in fields(LoopConfig)}
    for kind in PIECE_KINDS:
        for name, (type_name, default, help_text) in piece_fields(kind).items():
            if name in DERIVED or name in seen:
                continue
            seen.add(name)
            out.append((name, types.get(type_name, str), field(default=default, metadata={"help": help_text})))
    return out


FinetuneConfig = make_dataclass("FinetuneConfig", _piece_field_list(), bases=(LoopConfig,))
FinetuneConfig.__doc__ = "zoft finetune's settings: the loop's and every registered piece's (see config.py)."
FinetuneConfig.__module__ = __name__
