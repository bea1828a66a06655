"""bf16 against fp32 on the default model: accuracy after the same steps, and what the fp32
master copy changes.

    python bench/dtype.py [--steps 60] [--out bench/results/dtype]

Three `zoft finetune` runs on tweets with one setting (SPSA, lr 3e-5, eps 1e-3, batch 16, seed
0, dev 100 every 30 steps, test 200): fp32, bf16, and bf16 with --master-weights. Prints a
markdown table of test accuracy before and after, final dev accuracy and seconds per step.
Finished runs are skipped, so a killed bench resumes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zoft.finetune import FinetuneConfig, run  # noqa: E402

SETTINGS = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}, "bf16+master": {"dtype": "bf16", "master_weights": True}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="bench/results/dtype")
    args = ap.parse_args()
    out = Path(args.out)
    print("| weights | test acc before | test acc after | final dev acc | s/step |\n|---|---|---|---|---|")
    for name, extra in SETTINGS.items():
        run_dir = out / f"tweets-{name}-s{args.steps}"
        if not (run_dir / "summary.json").is_file():
            run(FinetuneConfig(task="tweets", steps=args.steps, lr=3e-5, eps=1e-3, eval_every=30, num_dev=100,
                               num_test=200, seed=0, output_dir=str(out), run_name=run_dir.name, **extra))
        s = json.loads((run_dir / "summary.json").read_text())
        print(f"| {name} | {s['test_acc_before']:.3f} | {s['test_acc_after']:.3f} | {s['final_dev_acc']:.3f} |"
              f" {s['s_per_step']:.2f} |")


if __name__ == "__main__":
    main()
