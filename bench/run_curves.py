"""What a run's committed metrics say beyond `zoft compare`'s table: dev accuracy and dev loss at each
evaluation, and the mean training loss over windows of steps (whether ZO moved its own objective
when the dev metric did not move).

    python bench/run_curves.py RUN_DIR [RUN_DIR ...] [--window 50]

Prints one markdown block per run; reads run folders only (no model is loaded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from zoft.compare import load_run
from zoft.errors import ZoftError


def describe(run_dir: Path, window: int) -> str:
    run = load_run(run_dir)
    dev = " ".join(f"{p['dev/acc']:.3f}" for p in run.dev)
    dev_loss = " ".join(f"{p['dev/loss']:.3f}" for p in run.dev)
    losses = [t["train/loss"] for t in run.train]
    windows = [(i + 1, min(i + window, len(losses)), statistics.mean(losses[i : i + window]))
               for i in range(0, len(losses), window)]
    train = " ".join(f"{mean:.3f}" for _, _, mean in windows)
    spans = " ".join(f"{a}-{b}" for a, b, _ in windows)
    objective = run.config.get("objective", "loss")
    return (f"{run_dir.name} (objective {objective}, evaluations at steps {' '.join(str(p['step']) for p in run.dev)}):\n"
            f"- dev acc: {dev}\n- dev loss: {dev_loss}\n- mean train loss over steps {spans}: {train}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--window", type=int, default=50)
    args = ap.parse_args(argv)
    if args.window < 1:
        ap.error(f"--window must be at least 1, got {args.window}")
    try:
        print("\n".join(describe(r, args.window) for r in args.runs))
    except ZoftError as e:
        print(f"zoft: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
