"""The shipped tuner at a lower lr than SPSA's best, on tweets: is its early lead kept?

    python bench/tuner_lr.py [--lr 1e-5] [--seeds 0 1 2]

At SPSA's best setting (lr 3e-5, eps 1e-2) the tuner leads SPSA for the first 25 steps and then
falls back (bench/convergence.py): its scales raise the step on some blocks (the embedding's
variance 6.6×), which that lr cannot carry. This runs the tuner at ``--lr`` with the same eps,
budget, data and seeds as the convergence benchmark (same run folders), and prints the mean dev
curve beside SPSA's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import add_budget_args, mean_curve, one_run  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/convergence")
    ap.add_argument("--task", default="tweets")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--eps", type=float, default=1e-2)
    add_budget_args(ap)
    args = ap.parse_args()
    out = Path(args.out)
    rows = {"spsa (lr 3e-5)": [one_run(out, args.task, "spsa", 3e-5, args.eps, s, args) for s in args.seeds],
            "tuner (lr 3e-5)": [one_run(out, args.task, "tuner", 3e-5, args.eps, s, args) for s in args.seeds],
            f"tuner (lr {args.lr:g})": [one_run(out, args.task, "tuner", args.lr, args.eps, s, args) for s in args.seeds]}
    steps = [fwd // 2 for fwd, _ in mean_curve(next(iter(rows.values())))]
    print(f"{args.task}, eps {args.eps:g}, {len(args.seeds)} seeds: mean dev accuracy at steps {steps}; test accuracy")
    print("| method | " + " | ".join(f"step {s}" for s in steps) + " | test acc |")
    print("|---|" + "---|" * (len(steps) + 1))
    for name, runs in rows.items():
        curve = " | ".join(f"{acc:.3f}" for _, acc in mean_curve(runs))
        print(f"| {name} | {curve} | {statistics.mean(r['test_acc'] for r in runs):.3f} |")


if __name__ == "__main__":
    main()
