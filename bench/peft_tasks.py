"""Zero-shot accuracy and accuracy after a fixed ZO budget with LoRA, on the local SuperGLUE/GLUE tasks.

    python bench/peft_tasks.py [--out bench/results/peft_tasks] [--steps 40] [--lr 1e-3]

Every task runs ``zoft.finetune.run`` (the CLI's code path) with ``--peft lora`` (r 8, α 16,
peft's default targets: q_proj and v_proj for Llama), the same budget, seed and data seed. The
zero-shot column is the run's own test accuracy before the first step, on the same test sample.
The model tested after training is the best on dev among the start and the end, as MeZO selects
it; ``selected_step`` says which. BoolQ is left out: its train split is not in ../shared/data.
Finished runs are skipped, so a killed benchmark resumes. Writes ``peft_tasks.json`` and prints
the README table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zoft.finetune import FinetuneConfig, run  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ["sst2", "rte", "cb", "wsc", "wic", "copa", "multirc"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/peft_tasks")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--num-dev", type=int, default=50)
    ap.add_argument("--num-test", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for task in args.tasks:
        name = f"{task}-lora-s{args.seed}"
        run_dir = out / "runs" / name
        if not (run_dir / "summary.json").is_file():
            print(f"== {name}", file=sys.stderr, flush=True)
            run(FinetuneConfig(task=task, data_dir=str(SHARED_DATA), peft="lora", steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, eps=args.eps, num_dev=args.num_dev,
                               num_test=args.num_test, eval_every=args.steps, seed=args.seed,
                               output_dir=str(out / "runs"), run_name=name))
        summary = json.loads((run_dir / "summary.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
        dev = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"dev/loss"' in x]
        rows.append({"dev_loss": [dev[0]["dev/loss"], dev[-1]["dev/loss"]],"task": task, "zero_shot": summary["test_acc_before"], "after": summary["test_acc_after"],
                     "selected_step": summary["selected_step"], "num_test": config["split_sizes"]["test"],
                     "num_train": config["split_sizes"]["train"], "s_per_step": summary["s_per_step"],
                     "trainable_params": config["trainable_params"]})
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "tasks": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "peft_tasks.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(result) -> str:
    s = result["settings"]
    rows = [f"LoRA (r 8, α 16), {s['steps']} steps of {s['batch_size']} (lr {s['lr']:g}, eps {s['eps']:g}), seed {s['seed']}",
            "", "| task | test examples | zero-shot | after ZO-LoRA | change | selected step | dev loss, start → end | s/step |",
            "|---|---|---|---|---|---|---|---|"]
    for r in result["tasks"]:
        rows.append(f"| {r['task']} | {r['num_test']} | {r['zero_shot']:.3f} | {r['after']:.3f} | "
                    f"{100 * (r['after'] - r['zero_shot']):+.1f} pts | {r['selected_step']} | "
                    f"{r['dev_loss'][0]:.3f} → {r['dev_loss'][1]:.3f} | {r['s_per_step']:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
