"""``zoft compare``: runs side by side, from their run directories alone.

Runs are grouped by (task, method); the runs of a group are seeds. Each group draws its mean
curve with a min–max band; the table gives final and best dev accuracy and test accuracy (mean ±
sd over seeds), forward passes for the mean curve to reach a target (by default the baseline's
final dev accuracy; interpolated between evaluations) and as a multiple of the baseline's, the
area under the mean dev curve ÷ its span, time and peak memory.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from zoft.errors import ZoftError

X_AXES = ("forward_passes", "steps", "seconds")
METRICS = ("dev_acc", "train_loss")


def method_of(config: dict) -> dict:
    """A run's full method: the piece specs it recorded (or, for runs from before they were
    recorded, the specs its flat settings give) plus directions, PEFT mode, objective and head start."""
    from zoft.config import method_from

    method = config.get("method") or method_from(config, config.get("tuner_path"))
    if config.get("tuner_sha256"):  # the same tuner file, wherever it was read from, is the same method
        method = {**method, "perturbation": {**method["perturbation"], "path": f"sha256:{config['tuner_sha256'][:12]}"}}
    return {**method, "directions": config.get("directions", 1), "peft": config.get("peft", "none"),
            "objective": config.get("objective", "loss"), "head_init": config.get("head_init", "none"),
            "head_share": config.get("head_share", 1.0)}


def short_label(method: dict) -> str:
    est, pert, upd = method["estimator"], method["perturbation"], method["update"]
    label = est["name"]
    if label == "kernel":
        label += f"{est.get('kernel_order', 4)}" + ("/block" if est.get("r_mode") == "block" else "")
    if pert["name"] == "learned":
        label = f"tuner+{label}"
    elif pert["name"] != "isotropic":
        label = f"{pert['name']}+{label}"
    extras = [upd["name"]] if upd["name"] != "sgd" else []
    extras += ["avg"] * bool(upd.get("average")) + ["clip"] * bool(upd.get("clip_norm"))
    extras += [f"n{method['directions']}"] * (method["directions"] > 1)
    extras += [method["peft"]] * (method["peft"] != "none") + [method["objective"]] * (method["objective"] != "loss")
    share = method.get("head_share", 1.0)
    extras += [f"probe{share:g}" if share < 1 else "probe"] * (method.get("head_init", "none") == "probe")
    label = "+".join([label, *extras])
    return label if method["noise"]["name"] == "table" else f"{label} ({method['noise']['name']})"


def _flat(method: dict) -> dict:
    return {(f"{k}.{f}" if isinstance(v, dict) else k): (x if isinstance(v, dict) else v)
            for k, v in method.items() for f, x in (v.items() if isinstance(v, dict) else [(None, v)])}


def method_labels(configs: list[dict]) -> list[str]:
    """One label per run: runs get the same label only when their methods are identical. Methods
    that share a short label are told apart by the settings in which they differ."""
    methods = [method_of(c) for c in configs]
    shorts = [short_label(m) for m in methods]
    labels = []
    for m, short in zip(methods, shorts):
        rivals = [_flat(o) for o, s in zip(methods, shorts) if s == short]
        differing = sorted(k for k in _flat(m) if len({json.dumps(r.get(k)) for r in rivals}) > 1)
        mine = _flat(m)
        labels.append(short + "".join(f" {k.split('.')[-1]}={mine[k]:g}" if isinstance(mine[k], float)
                                      else f" {k.split('.')[-1]}={mine[k]}" for k in differing))
    return labels


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    train: list[dict] = field(default_factory=list)  # per-step lines
    dev: list[dict] = field(default_factory=list)  # evaluation lines


def load_run(path: Path) -> Run:
    files = {name: path / name for name in ("config.json", "metrics.jsonl", "summary.json")}
    missing = [n for n, f in files.items() if not f.is_file()]
    if missing:
        raise ZoftError(f"{path} is not a complete run directory (missing {', '.join(missing)})")
    try:
        lines = [json.loads(x) for x in files["metrics.jsonl"].read_text().splitlines() if x.strip()]
        run = Run(path, json.loads(files["config.json"].read_text()), json.loads(files["summary.json"].read_text()))
    except json.JSONDecodeError as e:
        raise ZoftError(f"{path}: corrupt run file ({e})") from None
    run.train = [x for x in lines if "train/loss" in x]
    run.dev = [x for x in lines if "dev/acc" in x]
    return run


def curve(run: Run, x: str, metric: str) -> tuple[list[float], list[float]]:
    seconds = {t["step"]: t["train_seconds"] for t in run.train}
    seconds[0] = 0.0
    if metric == "dev_acc":
        points = [(p["step"], p.get("forward_passes", 0), p["dev/acc"]) for p in run.dev]
    else:  # train loss, smoothed over a window of 10 steps
        losses = [t["train/loss"] for t in run.train]
        smooth = [statistics.mean(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        points = [(t["step"], t["forward_passes"], v) for t, v in zip(run.train, smooth)]
    xs = {"steps": [p[0] for p in points], "forward_passes": [p[1] for p in points],
          "seconds": [seconds.get(p[0], 0.0) for p in points]}[x]
    return xs, [p[2] for p in points]


def group_runs(runs: list[Run], facet: str | None) -> dict[str, dict[str, list[Run]]]:
    """{task: {method: runs}}; several tasks only with facet 'task', one model always."""
    models = {r.config.get("model_id", r.config.get("model")) for r in runs}
    if len(models) > 1:
        raise ZoftError(f"runs of different models cannot be compared: {sorted(models)}")
    tasks = sorted({r.config["task"] for r in runs})
    if len(tasks) > 1 and facet != "task":
        raise ZoftError(f"runs of different tasks ({', '.join(tasks)}); pass --facet task for one panel per task")
    groups: dict[str, dict[str, list[Run]]] = {}
    for r, label in zip(runs, method_labels([r.config for r in runs])):
        groups.setdefault(r.config["task"], {}).setdefault(label, []).append(r)
    return groups


def mean_curve(runs: list[Run], x: str, metric: str):
    curves = [curve(r, x, metric) for r in runs]
    n = min(len(c[1]) for c in curves)
    xs = [statistics.mean(c[0][i] for c in curves) for i in range(n)]
    ys = [[c[1][i] for c in curves] for i in range(n)]
    return xs, [statistics.mean(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def first_crossing(xs, ys, target):
    """Where the curve first reaches ``target``, interpolated linearly between evaluations."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= target - 1e-12:
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (x - x0) * (target - y0) / (y - y0)
    return None


def mean_level(xs, ys) -> float:
    """Area under the curve ÷ its span: the mean dev accuracy over the run, which rewards getting
    there early as well as where it ends."""
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    return area / (xs[-1] - xs[0]) if len(xs) > 1 and xs[-1] > xs[0] else ys[0]


def _best_of(methods: dict, short: str) -> str | None:
    """Of the methods labelled ``short`` (at any settings), the one with the best mean final dev
    accuracy: the baseline at its best setting."""
    found = [m for m in methods if m == short or m.startswith(short + " ")]
    return max(found, key=lambda m: statistics.mean(r.summary["final_dev_acc"] for r in methods[m]), default=None)


def table(groups, baseline: str | None, target: float | None) -> str:
    rows = ["| task | method | runs | final dev acc | best dev acc | test acc | fwd passes to target | "
            "÷ baseline's | dev AUC | train s | peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(values):
        return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    for task, methods in groups.items():
        base = baseline if baseline in methods else _best_of(methods, baseline or "spsa")
        goal = target
        if goal is None and base is not None:
            goal = statistics.mean(r.summary["final_dev_acc"] for r in methods[base])
        curves = {name: mean_curve(runs, "forward_passes", "dev_acc") for name, runs in methods.items()}
        reach = {name: None if goal is None else first_crossing(xs, mean, goal) for name, (xs, mean, _, _) in curves.items()}
        for name, runs in methods.items():
            xs, mean, _, _ = curves[name]
            mine, theirs = reach[name], reach.get(base)
            rows.append(
                f"| {task} | {name} | {len(runs)} | {ms([r.summary['final_dev_acc'] for r in runs])} | "
                f"{ms([r.summary['best_dev_acc'] for r in runs])} | {ms([r.summary['test_acc_after'] for r in runs])} | "
                f"{'–' if goal is None else ('not reached' if mine is None else f'{mine:.0f}')} | "
                f"{f'{mine / theirs:.2f}×' if mine is not None and theirs else '–'} | {mean_level(xs, mean):.3f} | "
                f"{statistics.mean(r.summary['train_seconds'] for r in runs):.0f} | "
                f"{max(r.summary['peak_memory_mb'] for r in runs):.0f} |")
        if goal is not None:
            rows.append(f"| {task} | target | | {goal:.3f} | | | | | | | |")
    return "\n".join(rows)


def plot(groups, x: str, metric: str, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (task, methods) in zip(axes[0], groups.items()):
        for name, runs in sorted(methods.items()):
            xs, mean, lo, hi = mean_curve(runs, x, metric)
            line, = ax.plot(xs, mean, label=f"{name} ({len(runs)} runs)")
            if len(runs) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set(title=task, xlabel=x.replace("_", " "), ylabel=metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=120)
        tmp.replace(out)  # never a half-written picture
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ZoftError(f"cannot write the plot to {out} ({e.strerror or e})") from None
    finally:
        plt.close(fig)


def compare(run_dirs, x="forward_passes", metric="dev_acc", out=None, facet=None, baseline=None,
            target=None) -> str:
    if x not in X_AXES:
        raise ZoftError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    if metric not in METRICS:
        raise ZoftError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not run_dirs:
        raise ZoftError("no run directories given")
    for d in run_dirs:
        if not Path(d).is_dir():
            raise ZoftError(f"run directory not found: {d}")
    groups = group_runs([load_run(Path(d)) for d in run_dirs], facet)
    if out is not None:
        plot(groups, x, metric, Path(out))
    return table(groups, baseline, target)
