"""Command line: parsing only. Any user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from dataclasses import fields

from zoft.errors import ZoftError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# loop settings; the pieces' settings (eps, lr, kernel-order, ...) take their help from their
# config dataclasses, and the piece choices list what the registry holds
_HELP = {
    "model": "hub id, local path, or the embedded default (smollm2-135m)",
    "task": "tweets (embedded); sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop"
            " (--data-dir or the hub); or jsonl:PATH",
    "template": "jsonl task: the prompt, with {field} placeholders, e.g. '{text} It was'",
    "labels": "jsonl task: comma-separated label words, in label order, e.g. 'bad,good'",
    "label_field": "jsonl task: the field that holds the label (an index or a label word)",
    "data_dir": "folder with the task's official files (e.g. ../shared/data)",
    "directions": "directions per step (n-SPSA, 2n forwards per step)",
    "tuner": "learned perturbation tuner: none, auto (the shipped tuner made for this model) or a path",
    "peft": "none (every weight), lora or prefix (peft adapters; only they are perturbed and trained)",
    "prefix_tokens": "virtual tokens of --peft prefix",
    "lora_targets": "comma-separated module names; default: peft's choice for the architecture (q_proj,v_proj for Llama)",
    "objective": "what ZO minimises on a batch: loss (the task's: cross-entropy over the label words, or the gold"
                 " option's LM loss for multiple choice), choice (cross-entropy over each example's options), or"
                 " the negative of accuracy or macro f1 (for squad and drop, f1: the token F1 of greedy answers, MeZO §6.4)",
    "data_seed": "seed of the train/dev/test sampling (kept apart from --seed)",
    "eval_every": "steps between dev evaluations",
    "report_to": "none or wandb (offline unless an API key is set)",
    "save_model": "save the selected (best dev) model into the run directory",
}


def _piece_choices() -> dict[str, str]:
    from zoft.registry import names

    return {kind: f"{kind}: {' | '.join(names(kind))}" for kind in ("estimator", "perturbation", "update", "noise")}


def add_config_flags(parser, config_cls, help_texts=None):
    """One flag per field of a config dataclass (bools become switches)."""
    help_texts = {**_HELP, **_piece_choices(), **(help_texts or {})}
    for f in fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=help_texts.get(f.name))
            continue
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        kind = {"int": int, "float": float, "int | None": int}.get(type_name, str)
        text = help_texts.get(f.name) or f.metadata.get("help") or f"default {f.default}"
        parser.add_argument(flag, type=kind, default=f.default, help=text)


def build_parser():
    from zoft import __version__
    from zoft.finetune import EvalConfig, FinetuneConfig

    parser = _Parser(prog="zoft", description="Zeroth-order fine-tuning of language models.")
    parser.add_argument("--version", action="version", version=f"zoft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ft = sub.add_parser("finetune", help="fine-tune with forward passes only (MeZO's protocol)")
    add_config_flags(ft, FinetuneConfig)
    ft.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint"
                    " (with the settings it was started with; other flags are ignored)")
    ft.set_defaults(handler=_finetune)
    rp = sub.add_parser("replay", help="rebuild a run's selected model from the base model and its trajectory")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    rp.add_argument("--out", required=True, help="folder to write the model into (as --save-model does)")
    rp.set_defaults(handler=_replay)
    ev = sub.add_parser("eval", help="zero-shot metrics of a model on a task's test sample")
    add_config_flags(ev, EvalConfig)
    ev.set_defaults(handler=_eval)
    cmp = sub.add_parser("compare", help="compare run directories: plot and markdown table")
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp.add_argument("--x", default="forward_passes", help="forward_passes | steps | seconds")
    cmp.add_argument("--metric", default="dev_acc", help="dev_acc | train_loss")
    cmp.add_argument("--out", help="write the plot to this PNG file")
    cmp.add_argument("--facet", choices=["task"], help="one panel per task (runs of several tasks)")
    cmp.add_argument("--baseline", help="method whose final dev accuracy is the target (default spsa)")
    cmp.add_argument("--target", type=float, help="dev accuracy target for 'forward passes to target'")
    cmp.set_defaults(handler=_compare)
    hm = sub.add_parser("tuner-heatmap", help="draw a tuner's effective scales (layer × module type) into a PNG")
    hm.add_argument("tuner", metavar="TUNER")
    hm.add_argument("--model", default=None, help="the model it was made for (default: the embedded default)")
    hm.add_argument("--out", required=True, help="PNG file")
    hm.set_defaults(handler=_heatmap)
    grid = sub.add_parser("grid", help="run the cartesian product of a grid file, then compare")
    grid.add_argument("grid_file", metavar="GRID.yaml")
    grid.set_defaults(handler=_grid)
    # Other packages add commands through this entry-point group (meta_train adds meta-train),
    # so zoft never imports them by name.
    from importlib.metadata import entry_points

    for ep in entry_points(group="zoft.commands"):
        ep.load()(sub)
    return parser


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _compare(args):
    from zoft.compare import compare

    print(compare(args.run_dirs, args.x, args.metric, args.out, args.facet, args.baseline, args.target))


def _grid(args):
    from zoft.grid import run_grid

    _quiet_transformers()
    print(run_grid(args.grid_file, log=lambda m: print(m, file=sys.stderr)))


def _eval(args):
    from zoft.finetune import EvalConfig, zero_shot

    _quiet_transformers()
    r = zero_shot(EvalConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "handler")}))
    metric = f"F1 {r['f1']:.4f}, exact match {r['em']:.4f}" if "f1" in r else f"accuracy {r['acc']:.4f}"
    print(f"{r['task']}: zero-shot test {metric}, loss {r['loss']:.4f} ({r['num_test']} examples)")


def _heatmap(args):
    from zoft.adapters import with_recorded_adapters
    from zoft.models import DEFAULT_MODEL, load_model
    from zoft.tuner import read_tuner
    from zoft.tuner_heatmap import draw, effective_scales

    _quiet_transformers()
    trained = json.loads(read_tuner(args.tuner)[1].get("meta_train", "{}"))  # a LoRA tuner's blocks are adapters
    model = with_recorded_adapters(load_model(args.model or DEFAULT_MODEL)[0], trained)
    blocks, scales = effective_scales(args.tuner, model)
    draw(blocks, scales, Path(args.out), title=Path(args.tuner).name)
    print(f"heatmap: {args.out}")


def _replay(args):
    from zoft.finetune import replay_run

    _quiet_transformers()
    print(f"model: {replay_run(args.run_dir, args.out)}")


def _finetune(args):
    from zoft.finetune import FinetuneConfig, resume, run

    _quiet_transformers()
    if args.resume:
        s = resume(args.resume)
    else:
        s = run(FinetuneConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "handler", "resume")}))
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"run: {s['run_dir']}")
    print(f"test {'F1' if s['metric'] == 'f1' else 'accuracy'}: before {s['test_acc_before']:.4f}  after {s['test_acc_after']:.4f}"
          f"  (model at step {s['selected_step']}, best dev {s['best_dev_acc']:.4f})")
    print(f"{s['steps']} steps, {s['forward_passes']} forward passes, {s['s_per_step']:.2f} s/step,"
          f" peak memory {s['peak_memory_mb']:.0f} MB")


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except ZoftError as e:
        rank = os.environ.get("RANK", "0")  # under torchrun, rank 0 speaks for the job
        print(f"zoft: error: {e}" if rank == "0" else f"zoft: error: [rank {rank}] {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("zoft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
