"""``zoft grid GRID.yaml``: the cartesian product of listed values, run one after another (or by
several processes at once: each takes the runs no other holds).

    output_dir: runs/tweets-grid
    base: {task: tweets, steps: 100, eval_every: 25}
    grid:
      method:                       # a value may be a mapping: merged into the run's config
        - {estimator: spsa, lr: 3.0e-5}
        - {estimator: kernel, lr: 1.0e-5, eps: 1.0e-2}
      seed: [0, 1, 2]
    name: "{task}-{estimator}-lr{lr:g}-s{seed}"   # optional; default: the grid values
                                                  # (keys starting with _ only name runs)
    compare: {x: forward_passes, metric: dev_acc, out: comparison.png}

Every run's config is checked before the first run starts. A run whose directory holds a
summary is complete and skipped, a killed run continues from its last checkpoint (so a killed
grid resumes where it stopped), and a run another live process holds is left to it. A run that
diverges is a result of the sweep, not the end of it: its error line goes into ``NAME.diverged``
beside the run folders (delete that file to run the point again), its metrics up to that step
into ``NAME.diverged.jsonl``, and the grid goes on. Then the runs are compared (``table.md`` and
the plot in ``output_dir``), the diverged ones listed below, and for every setting run at several
lrs the table says whether its best lr is strictly inside them: a setting picked from a grid is
only trusted when it is.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from dataclasses import asdict, fields
from pathlib import Path

from zoft.errors import ZoftError
from zoft.rundir import safe_name

GRID_KEYS = {"output_dir", "base", "grid", "name", "compare"}


def _read(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ZoftError(f"grid file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ZoftError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or "output_dir" not in spec:
        raise ZoftError(f"{path}: needs a mapping with 'output_dir' and 'grid'")
    unknown = set(spec) - GRID_KEYS
    if unknown:
        raise ZoftError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise ZoftError(f"{path}: grid.{key} must be a non-empty list")
    return spec


def expand(spec: dict) -> list[tuple[str, dict]]:
    """(run name, finetune config fields) for every point of the grid, in YAML order."""
    keys = list(spec["grid"])
    runs = []
    for values in itertools.product(*(spec["grid"][k] for k in keys)):
        config = dict(spec.get("base") or {})
        for key, value in zip(keys, values):
            config.update(value if isinstance(value, dict) else {key: value})
        if "name" in spec:
            try:
                name = spec["name"].format(**config)
            except (KeyError, ValueError) as e:
                raise ZoftError(f"grid name template {spec['name']!r}: {e}") from None
        else:
            name = "_".join(f"{k}-{v}" for k, v in config.items() if k in keys or any(
                isinstance(x, dict) and k in x for x in spec["grid"].values()))
        runs.append((safe_name(name), config))
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ZoftError("two grid points get the same run name; add the varying keys to 'name'")
    return runs


def _coerce(config: dict, path) -> dict:
    """YAML 1.1 reads 1e-5 (no dot) as a string: numbers written so are taken as numbers, and a
    value of the wrong type names its key."""
    from zoft.finetune import FinetuneConfig

    types = {f.name: f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool}.get(
        str(f.type).split(" ")[0], str) for f in fields(FinetuneConfig)}
    out = {}
    for key, value in config.items():
        want = types.get(key, str)
        if want in (int, float) and isinstance(value, str):
            try:
                value = want(float(value)) if want is int and float(value).is_integer() else want(value)
            except ValueError:
                raise ZoftError(f"{path}: {key} must be a number, got {value!r}") from None
        elif want in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ZoftError(f"{path}: {key} must be a number, got {value!r}")
        out[key] = float(value) if want is float else value
    return out


def _run_point(cfg, run_dir: Path, label: str, log) -> bool:
    """Run, resume or skip one point; False when another live process is running it."""
    from zoft.errors import RunDiverged, RunTaken
    from zoft.finetune import resume, run
    from zoft.rundir import RunFolder

    if (run_dir / "summary.json").is_file():
        log(f"{label}: complete, skipped")
        return True
    marker = _diverged_marker(run_dir)
    if marker.is_file():
        log(f"{label}: diverged in an earlier pass, skipped (delete {marker} to run it again)")
        return True
    if run_dir.exists():  # a directory without a summary is not ours to reuse
        raise ZoftError(f"{run_dir} exists but is not a complete run; remove it to rerun")
    folder = RunFolder(run_dir)
    try:
        if folder.held:
            log(f"{label}: running in another process, skipped")
            return False
        if folder.resumable:  # a run that was killed
            log(f"{label}: resumed from its checkpoint")
            resume(run_dir)
        else:
            log(label)
            run(cfg)
    except RunTaken:  # another process took it between the check and the claim
        log(f"{label}: running in another process, skipped")
        return False
    except RunDiverged as e:  # the run removed its folder; what is kept is why, and its curve until then
        if e.metrics:
            _write_whole(run_dir.with_name(f"{run_dir.name}.diverged.jsonl"), e.metrics)
        _write_whole(marker, f"{e}\n")
        log(f"{label}: {e}")
        return True
    except ZoftError:
        if (run_dir / "summary.json").is_file():  # another process finished it as this one started it
            log(f"{label}: finished by another process")
            return True
        raise
    return True


def _diverged_marker(run_dir: Path) -> Path:
    return run_dir.with_name(f"{run_dir.name}.diverged")


def _write_whole(path: Path, text: str):
    """Write beside ``path``, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def lr_brackets(configs, out: Path, diverged) -> list[str]:
    """Where each setting's best lr (mean final dev accuracy over its seeds, ties by the AUC of its
    mean dev curve, as the table prints it; a diverged lr is the worst) sits among the lrs the grid
    ran that setting at."""
    from zoft.compare import load_run, mean_curve, mean_level

    sweeps: dict[str, dict[float, list[str]]] = {}
    for c in configs:
        setting = {k: v for k, v in asdict(c).items() if k not in ("lr", "seed", "run_name")}
        sweeps.setdefault(json.dumps(setting, sort_keys=True, default=str), {}).setdefault(c.lr, []).append(c.run_name)

    def score(names):
        if any(n in diverged for n in names):
            return (float("-inf"), float("-inf"))
        runs = [load_run(out / n) for n in names]
        xs, dev, _, _ = mean_curve(runs, "forward_passes", "dev_acc")
        return statistics.mean(r.summary["final_dev_acc"] for r in runs), mean_level(xs, dev)

    lines = []
    for by_lr in sweeps.values():
        if len(by_lr) < 2:
            continue
        lrs = sorted(by_lr)
        best = max(lrs, key=lambda lr: score(by_lr[lr]))
        where = ("strictly inside" if lrs[0] < best < lrs[-1] else
                 f"on the {'top' if best == lrs[-1] else 'bottom'} edge: extend the grid {'up' if best == lrs[-1] else 'down'}")
        lines.append(f"- {by_lr[best][0]}: best of lr {', '.join(f'{lr:g}' for lr in lrs)}, {where}")
    return lines


def grid_configs(path) -> list:
    """Every point's checked FinetuneConfig, in YAML order; nothing runs."""
    from zoft.finetune import FinetuneConfig
    from zoft.optimizer import make_parts

    path = Path(path)
    spec = _read(path)
    known = {f.name for f in fields(FinetuneConfig)} - {"output_dir", "run_name"}
    configs = []
    for name, config in expand(spec):
        config = {k: v for k, v in config.items() if not k.startswith("_")}  # _keys only name runs
        unknown = set(config) - known
        if unknown:
            raise ZoftError(f"{path}: unknown finetune settings {sorted(unknown)}")
        cfg = FinetuneConfig(**_coerce(config, path), output_dir=str(Path(spec["output_dir"])), run_name=name)
        make_parts(**cfg.method())
        configs.append(cfg)
    return configs


def run_grid(path, log=print) -> str:
    """Every point in turn, then the comparison. Several ``zoft grid`` processes can share one grid
    (a process per GPU): each skips the runs another one holds, and the one that completes the
    last run writes the table."""
    from zoft.compare import compare
    from zoft.rundir import TableLock, check_writable

    spec = _read(Path(path))
    out = Path(spec["output_dir"])
    configs = grid_configs(path)
    check_writable(out, "grid output_dir")
    elsewhere = [c.run_name for i, c in enumerate(configs, 1)
                 if not _run_point(c, out / c.run_name, f"[{i}/{len(configs)}] {c.run_name}", log)]
    elsewhere = [name for name in elsewhere  # what the other processes finished, or saw diverge, is done
                 if not ((out / name / "summary.json").is_file() or _diverged_marker(out / name).is_file())]
    if elsewhere:
        return (f"{len(elsewhere)} of {len(configs)} runs are still running in other processes"
                f" ({', '.join(elsewhere)}); the grid that finishes the last one writes {out / 'table.md'}")
    markers = {c.run_name: _diverged_marker(out / c.run_name) for c in configs}
    diverged = {name: marker.read_text().strip() for name, marker in markers.items() if marker.is_file()}
    opts = dict(spec.get("compare") or {})
    if "out" in opts:
        opts["out"] = out / opts["out"]
    with TableLock(out) as lock:
        if not lock.held:
            opts.pop("out", None)  # another process is writing the same plot
        finished = [out / c.run_name for c in configs if c.run_name not in diverged]
        result = compare(finished, facet=opts.pop("facet", "task"), **opts) if finished else "No run finished."
        if diverged:
            result += "\n\nDiverged (no run folder):\n" + "\n".join(f"- {n}: {why}" for n, why in diverged.items())
        brackets = lr_brackets(configs, out, diverged)
        if brackets:
            result += "\n\nlr brackets (best by final dev acc, ties by dev AUC):\n" + "\n".join(brackets)
        if lock.held:
            _write_whole(out / "table.md", result + "\n")
    return result


if __name__ == "__main__":
    print(run_grid(sys.argv[1]))
