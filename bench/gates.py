"""Issue 11's must-show gates, per seed, from a grid's run folders alone (no model is loaded).

    python bench/gates.py [bench/results/v2/seeds ...] [--baseline spsa] [--passes 0.5] [--points 2]

For every task and every non-baseline method: each seed's dev accuracy at step 0 (after any head
start), its range over the run, final dev, the model the run tested (best dev) and its test
accuracy; the forward passes for that seed's curve to reach the baseline's mean final dev
accuracy (interpolated, as ``zoft compare`` does for the mean curve) ÷ those of the baseline's mean
curve; and the test gain over the baseline's mean test accuracy. A gate holds on a task when it
holds on every seed: reach ≤ ``--passes`` × the baseline's forward passes and test ≥ ``--points``
points above it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from zoft.compare import curve, first_crossing, group_runs, load_run, mean_curve


def seed_rows(runs, goal: float, base_reach: float, passes: float, points: float, base_test: float):
    rows, ok = [], True
    for r in sorted(runs, key=lambda r: r.config["seed"]):
        xs, dev = curve(r, "forward_passes", "dev_acc")
        reach = first_crossing(xs, dev, goal)
        ratio = None if reach is None else reach / base_reach
        gain = 100 * (r.summary["test_acc_after"] - base_test)
        holds = ratio is not None and ratio <= passes and gain >= points
        ok &= holds
        rows.append(f"| {r.config['seed']} | {dev[0]:.3f} | {min(dev):.3f}–{max(dev):.3f} | {dev[-1]:.3f} | "
                    f"{r.summary.get('selected_step', '–')} | {r.summary['test_acc_after']:.3f} | "
                    f"{'not reached' if reach is None else f'{reach:.0f} ({ratio:.2f}×)'} | {gain:+.1f} | "
                    f"{'yes' if holds else 'no'} |")
    return rows, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid_dirs", nargs="*", default=["bench/results/v2/seeds"],
                    help="grid folders whose runs are pooled (the baseline's may be in another than a method's)")
    ap.add_argument("--baseline", default="spsa", help="the baseline's method label, as zoft compare prints it")
    ap.add_argument("--passes", type=float, default=0.5, help="reach the baseline's final dev in at most this × its forward passes")
    ap.add_argument("--points", type=float, default=2.0, help="and end at least this many test points above it")
    args = ap.parse_args(argv)
    run_dirs = sorted(p for d in args.grid_dirs for p in Path(d).iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = group_runs([load_run(p) for p in run_dirs], facet="task")
    verdicts = []
    for task, methods in groups.items():
        if args.baseline not in methods:
            sys.exit(f"zoft: error: no {args.baseline!r} runs for {task} in {', '.join(args.grid_dirs)}")
        base = methods[args.baseline]
        goal = statistics.mean(r.summary["final_dev_acc"] for r in base)
        base_test = statistics.mean(r.summary["test_acc_after"] for r in base)
        xs, mean, _, _ = mean_curve(base, "forward_passes", "dev_acc")
        base_reach = first_crossing(xs, mean, goal)
        for name, runs in methods.items():
            if name == args.baseline:
                continue
            print(f"\n{task}, {name} against {args.baseline} ({len(base)} seeds: final dev {goal:.3f}, reached by its "
                  f"mean curve at {base_reach:.0f} forward passes; test {base_test:.3f})\n")
            print("| seed | dev at step 0 | dev range | final dev | tested step | test | fwd passes to the baseline's "
                  "final dev | test gain, points | gates hold |\n|---|---|---|---|---|---|---|---|---|")
            rows, ok = seed_rows(runs, goal, base_reach, args.passes, args.points, base_test)
            print("\n".join(rows))
            verdicts.append(f"{task}, {name}: {'both gates hold on every seed' if ok else 'a gate fails'} "
                            f"(≤ {args.passes:g}× the forward passes, ≥ {args.points:g} test points)")
    print("\n" + "\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
