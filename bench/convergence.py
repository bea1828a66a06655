"""Dev accuracy against forward passes, per method, at an equal forward-pass budget.

    python bench/convergence.py [--out bench/results/convergence] [--steps 100] [--seeds 0 1 2]

Every method runs the same lr × eps grid on the first task and seed; the best setting of each
method there (final dev accuracy, then dev loss) then runs on every task and seed, so the other
tasks also show whether the setting transfers. The tuner methods get their own grid too: the
tuner's normalisation keeps the total perturbation energy of the isotropic direction, but it moves
that energy onto a few blocks, where a large eps leaves the linear regime (it was meta-trained at
eps 1e-3) and a large lr becomes unstable. All runs go through
``zoft.finetune.run`` (the CLI's code path) with the same data sample. Finished runs are skipped,
so a killed benchmark resumes. Writes ``convergence.json`` and ``convergence.png``.

fwd_ratio_to_match_spsa: the forward passes a method's mean dev curve (over seeds) needs to reach
SPSA's final mean dev accuracy, divided by SPSA's forward passes; null when it never does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zoft.finetune import FinetuneConfig, run  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TUNER = str(Path(__file__).resolve().parents[1] / "pretrained_tuners" / "smollm2-135m-instruct")
METHODS = {
    "spsa": {"estimator": "spsa"},
    "kernel": {"estimator": "kernel", "kernel_order": 4},
    "tuner": {"estimator": "spsa", "tuner": TUNER},
    "tuner+kernel": {"estimator": "kernel", "kernel_order": 4, "tuner": TUNER},
}


def dev_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fwd_at = {x["step"]: x["forward_passes"] for x in lines if "forward_passes" in x}
    return [(fwd_at.get(x["step"], 0), x["dev/acc"], x["dev/loss"]) for x in lines if "dev/acc" in x]


def one_run(out: Path, task: str, method: str, lr: float, eps: float, seed: int, args) -> dict:
    name = f"{task}-{method}-lr{lr:g}-eps{eps:g}-s{seed}"
    run_dir = out / "runs" / name
    if not (run_dir / "summary.json").is_file():
        cfg = FinetuneConfig(task=task, data_dir=str(SHARED_DATA) if task == "sst2" else None,
                             steps=args.steps, lr=lr, eps=eps, seed=seed, eval_every=args.eval_every,
                             num_dev=args.num_dev, num_test=args.num_test, output_dir=str(out / "runs"),
                             run_name=name, **METHODS[method])
        print(f"== {name}", file=sys.stderr, flush=True)
        run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"name": name, "lr": lr, "eps": eps, "seed": seed, "curve": dev_curve(run_dir),
            "final_dev_acc": summary["final_dev_acc"], "test_acc": summary["test_acc_after"],
            "test_acc_before": summary["test_acc_before"], "forward_passes": summary["forward_passes"],
            "s_per_step": summary["s_per_step"]}


def mean_curve(runs):
    points = list(zip(*[r["curve"] for r in runs]))
    return [(p[0][0], statistics.mean(x[1] for x in p)) for p in points]


def forward_passes_to_reach(curve, target):
    return next((fwd for fwd, acc in curve if acc >= target - 1e-12), None)


def spread(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def add_budget_args(ap):
    """Seeds and the per-run budget, shared with the scripts that add runs to this benchmark."""
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--num-dev", type=int, default=200)
    ap.add_argument("--num-test", type=int, default=500)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/convergence")
    ap.add_argument("--tasks", nargs="+", default=["tweets", "sst2"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 3e-5])
    ap.add_argument("--epss", nargs="+", type=float, default=[1e-3, 1e-2])
    add_budget_args(ap)
    args = ap.parse_args()
    out = Path(args.out)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "grid": {}, "tasks": {}}
    best = {}
    for method in args.methods:
        grid = [one_run(out, args.tasks[0], method, lr, eps, args.seeds[0], args)
                for lr, eps in itertools.product(args.lrs, args.epss)]
        best[method] = max(grid, key=lambda r: (r["final_dev_acc"], -r["curve"][-1][2]))
        result["grid"][method] = [{k: r[k] for k in ("lr", "eps", "final_dev_acc", "test_acc")} for r in grid]
    for task in args.tasks:
        per_method = {}
        for method in args.methods:
            lr, eps = best[method]["lr"], best[method]["eps"]
            runs = [one_run(out, task, method, lr, eps, s, args) for s in args.seeds]
            per_method[method] = {
                "best": {"lr": lr, "eps": eps},
                "final_dev_acc": spread([r["final_dev_acc"] for r in runs]),
                "test_acc": spread([r["test_acc"] for r in runs]),
                "forward_passes": runs[0]["forward_passes"],
                "s_per_step": statistics.mean(r["s_per_step"] for r in runs),
                "mean_dev_curve": mean_curve(runs),
                "dev_curves": [r["curve"] for r in runs],
                "test_acc_before": runs[0]["test_acc_before"],
            }
        target = per_method["spsa"]["final_dev_acc"]["mean"] if "spsa" in per_method else None
        for m in per_method.values():
            reach = forward_passes_to_reach(m["mean_dev_curve"], target) if target is not None else None
            m["fwd_ratio_to_match_spsa"] = None if reach is None else reach / per_method["spsa"]["forward_passes"]
        result["tasks"][task] = per_method
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "convergence.png")
    print(table(result))


def table(result) -> str:
    rows = [f"grid on {next(iter(result['tasks']))}, seed {result['settings']['seeds'][0]} (final dev acc):"]
    for method, grid in result["grid"].items():
        rows.append(f"- {method}: " + ", ".join(f"lr {g['lr']:g} eps {g['eps']:g}: {g['final_dev_acc']:.3f}" for g in grid))
    rows += ["", "| task | method | lr / eps | final dev acc | test acc | fwd to match SPSA |",
             "|---|---|---|---|---|---|"]
    for task, methods in result["tasks"].items():
        for name, m in methods.items():
            d, t, r = m["final_dev_acc"], m["test_acc"], m["fwd_ratio_to_match_spsa"]
            rows.append(f"| {task} | {name} | {m['best']['lr']:g} / {m['best']['eps']:g} | "
                        f"{d['mean']:.3f} ± {d['std']:.3f} | {t['mean']:.3f} ± {t['std']:.3f} | "
                        f"{'not reached' if r is None else f'{r:.2f}×'} |")
    rows += ["", "mean dev acc by step:"]
    for task, methods in result["tasks"].items():
        for name, m in methods.items():
            rows.append(f"- {task} {name}: " + " / ".join(f"{acc:.3f}" for _, acc in m["mean_dev_curve"]))
    return "\n".join(rows)


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (task, methods) in zip(axes[0], tasks.items()):
        for name, m in methods.items():
            curves = m["dev_curves"]
            x = [p[0] for p in curves[0]]
            ys = [[p[1] for p in c] for c in curves]
            mean = [statistics.mean(v) for v in zip(*ys)]
            lo, hi = [min(v) for v in zip(*ys)], [max(v) for v in zip(*ys)]
            line, = ax.plot(x, mean, label=f"{name} (lr {m['best']['lr']:g}, eps {m['best']['eps']:g}, {len(ys)} seeds)")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set(title=task, xlabel="forward passes", ylabel="dev accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
