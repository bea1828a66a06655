"""``zoft meta-train``, registered through the ``zoft.commands`` entry point."""

from __future__ import annotations

import sys
from dataclasses import fields


def register(subparsers):
    from zoft.cli import add_config_flags

    from meta_train.train import MetaTrainConfig

    parser = subparsers.add_parser("meta-train", help="meta-train a base model's perturbation tuner")
    # the meta-objective, whose own help must win over zoft finetune's --objective in the shared table
    objective = next(f.metadata["help"] for f in fields(MetaTrainConfig) if f.name == "objective")
    add_config_flags(parser, MetaTrainConfig, {
        "objective": objective,
        "tasks": "comma-separated tasks, taken round-robin (keep them apart from the tasks you judge it on)",
        "estimator": "the estimator the tuner is fitted to: spsa or kernel",
        "lr_update": "η_u, the look-ahead step (separate from any fine-tuning lr)",
        "lr_tuner": "SGD lr of the tuner's networks",
        "lr_llm": "lr of the first-order trajectory (SGD, momentum --momentum)",
        "restart_every": "steps between resets of the LLM to its initial weights",
    })
    parser.set_defaults(handler=_run)


def _run(args):
    from zoft.cli import _quiet_transformers

    from meta_train.train import MetaTrainConfig, meta_train

    _quiet_transformers()
    cfg = MetaTrainConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "handler")})
    print(f"tuner: {meta_train(cfg)}", file=sys.stdout)
