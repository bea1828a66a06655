import json
import shutil
from pathlib import Path

import pytest

from zoft.cli import main
from zoft.errors import ZoftError


def fake_run(root, name, estimator, seed, accs, task="tweets", model="m"):
    """A run directory as zoft finetune writes it, dev accuracy every 10 steps (2 fwd/step)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"task": task, "model_id": model, "estimator": estimator,
                                               "kernel_order": 4, "seed": seed}))
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "train/loss": 1.0 / step, "forward_passes": 2 * step,
                      "train_seconds": 0.5 * step})
    for i, acc in enumerate(accs):
        lines.append({"step": 10 * i, "dev/acc": acc, "forward_passes": 20 * i})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (d / "summary.json").write_text(json.dumps({"final_dev_acc": accs[-1], "best_dev_acc": max(accs),
                                                "test_acc_after": accs[-1] - 0.01, "train_seconds": 10.0,
                                                "peak_memory_mb": 900.0}))
    return d


def test_compare_draws_a_png_and_prints_the_table(tmp_path, capsys):
    dirs = [fake_run(tmp_path, "a0", "spsa", 0, [0.5, 0.6, 0.7]), fake_run(tmp_path, "a1", "spsa", 1, [0.5, 0.62, 0.74]),
            fake_run(tmp_path, "b0", "kernel", 0, [0.5, 0.75, 0.8]), fake_run(tmp_path, "b1", "kernel", 1, [0.5, 0.71, 0.76])]
    out = tmp_path / "cmp.png"
    assert main(["compare", *map(str, dirs), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    # mean curves at 0/20/40 fwd: spsa .50 .61 .72, kernel .50 .73 .78; the target, spsa's final
    # .72, is crossed by kernel at 20 × .22/.23 = 19.1 fwd (interpolated), 0.48× spsa's 40;
    # area ÷ span: (.555 + .665)/2 = .610 and (.615 + .755)/2 = .685
    assert "| tweets | spsa | 2 | 0.720 ± 0.028 | 0.720 ± 0.028 | 0.710 ± 0.028 | 40 | 1.00× | 0.610 | 10 | 900 |" in table
    assert "| tweets | kernel4 | 2 | 0.780 ± 0.028 | 0.780 ± 0.028 | 0.770 ± 0.028 | 19 | 0.48× | 0.685 | 10 | 900 |" in table
    assert "| tweets | target | | 0.720 |" in table
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert main(["compare", *map(str, dirs), "--metric", "train_loss", "--x", "seconds", "--out", str(out)]) == 0


def test_compare_refuses_mixed_tasks_and_models(tmp_path, capsys):
    a = fake_run(tmp_path, "a", "spsa", 0, [0.5, 0.6])
    b = fake_run(tmp_path, "b", "spsa", 0, [0.5, 0.7], task="sst2")
    c = fake_run(tmp_path, "c", "spsa", 0, [0.5, 0.7], model="other")
    assert main(["compare", str(a), str(b)]) == 2
    assert "pass --facet task" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--facet", "task", "--out", str(tmp_path / "f.png")]) == 0
    assert "| sst2 | spsa |" in capsys.readouterr().out
    assert main(["compare", str(a), str(c)]) == 2
    assert "different models" in capsys.readouterr().err
    (a / "summary.json").unlink()
    assert main(["compare", str(a)]) == 2
    assert "not a complete run directory (missing summary.json)" in capsys.readouterr().err
    assert main(["compare", str(b), "--x", "tokens"]) == 2


def _grid_file(tmp_path, model_dir, schedule: str, rest: str) -> Path:
    """A grid of tiny runs into tmp_path/out: ``schedule`` joins the base settings, ``rest`` is
    the grid's body and what follows it."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"output_dir: {tmp_path / 'out'}\nbase: {{model: \"{model_dir}\", {schedule}, num_train: 16,"
                    f" num_dev: 8, num_test: 8, batch_size: 4}}\ngrid:{rest}\n")
    return grid


def test_grid_resumes_after_a_kill_without_rerunning_finished_runs(tmp_path, tiny_model_dir, monkeypatch):
    import zoft.finetune
    from zoft.grid import run_grid

    grid = _grid_file(tmp_path, tiny_model_dir, "steps: 2, eval_every: 1", """
  method: [{estimator: spsa, lr: 1.0e-3}, {estimator: kernel, lr: 1.0e-4}]
  seed: [0, 1]
name: "{estimator}-s{seed}"
compare: {out: cmp.png}""")
    real, calls = zoft.finetune.run, []

    def killed_on_third(cfg):
        calls.append(cfg.run_name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cfg)

    monkeypatch.setattr(zoft.finetune, "run", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, log=lambda m: None)
    done = {p.name for p in (tmp_path / "out").iterdir()} - {".grid.lock"}
    assert done == {"spsa-s0", "spsa-s1"}
    stamp = (tmp_path / "out" / "spsa-s0" / "summary.json").stat().st_mtime_ns
    calls.clear()
    table = run_grid(grid, log=lambda m: None)
    assert calls == ["kernel-s0", "kernel-s1"]
    assert (tmp_path / "out" / "spsa-s0" / "summary.json").stat().st_mtime_ns == stamp
    assert "| tweets | spsa | 2 |" in table and "| tweets | kernel4 | 2 |" in table
    assert (tmp_path / "out" / "cmp.png").is_file() and (tmp_path / "out" / "table.md").is_file()


def test_a_diverging_point_is_recorded_and_the_grid_goes_on(tmp_path, tiny_model_dir, monkeypatch):
    import zoft.finetune
    from zoft.grid import run_grid

    grid = _grid_file(tmp_path, tiny_model_dir, "steps: 40, eval_every: 20", "\n  lr: [1.0e+3, 1.0e-3]\nname: \"lr{lr:g}\"")
    real, calls = zoft.finetune.run, []
    monkeypatch.setattr(zoft.finetune, "run", lambda cfg: calls.append(cfg.run_name) or real(cfg))
    table = run_grid(grid, log=lambda m: None)
    out = tmp_path / "out"
    assert calls == ["lr1000", "lr0.001"]
    assert not (out / "lr1000").exists() and (out / "lr0.001" / "summary.json").is_file()
    assert "lower lr" in (out / "lr1000.diverged").read_text()
    curve = [json.loads(line) for line in (out / "lr1000.diverged.jsonl").read_text().splitlines()]
    assert curve[0]["step"] == 0 and "dev/acc" in curve[0] and 0 < curve[-1]["step"] < 40
    assert "| tweets | spsa | 1 |" in table and "Diverged (no run folder):\n- lr1000: " in table
    assert (out / "table.md").read_text().strip() == table
    calls.clear()
    assert run_grid(grid, log=lambda m: None) == table and calls == []  # nothing reruns
    (out / "lr1000.diverged").unlink()
    run_grid(grid, log=lambda m: None)
    assert calls == ["lr1000"]


def test_a_grid_says_whether_each_settings_best_lr_is_inside_its_lrs(tmp_path, tiny_model_dir):
    from zoft.grid import grid_configs, lr_brackets

    grid = _grid_file(tmp_path, tiny_model_dir, "steps: 2, eval_every: 1",
                      '\n  estimator: [spsa, kernel]\n  lr: [1.0e-3, 2.0e-3, 4.0e-3]\nname: "{estimator}-lr{lr:g}"')
    # dev curves (steps 0, 1, 2): spsa peaks at 2e-3; kernel ties at 1e-3 and 4e-3 on final dev, and
    # 4e-3 got there sooner (larger dev AUC)
    curves = {"spsa-lr0.001": [0.5, 0.5, 0.6], "spsa-lr0.002": [0.5, 0.7, 0.8], "spsa-lr0.004": [0.5, 0.6, 0.7],
              "kernel-lr0.001": [0.5, 0.5, 0.8], "kernel-lr0.002": [0.5, 0.6, 0.6], "kernel-lr0.004": [0.5, 0.8, 0.8]}
    out = tmp_path / "out"
    for name, dev in curves.items():
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text(json.dumps({"task": "tweets"}))
        (out / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "dev/acc": a, "forward_passes": 2 * i}) + "\n" for i, a in enumerate(dev)))
        (out / name / "summary.json").write_text(json.dumps({"final_dev_acc": dev[-1]}))
    configs = grid_configs(grid)
    assert lr_brackets(configs, out, {}) == [
        "- spsa-lr0.002: best of lr 0.001, 0.002, 0.004, strictly inside",
        "- kernel-lr0.004: best of lr 0.001, 0.002, 0.004, on the top edge: extend the grid up"]
    # a diverged lr is the worst of the sweep, and it still bounds the bracket
    for name in ("spsa-lr0.004", "spsa-lr0.002"):
        shutil.rmtree(out / name)
    spsa = lr_brackets(configs, out, {"spsa-lr0.004": "diverges", "spsa-lr0.002": "diverges"})[0]
    assert spsa == "- spsa-lr0.001: best of lr 0.001, 0.002, 0.004, on the bottom edge: extend the grid down"


def test_grid_errors(tmp_path):
    from zoft.grid import run_grid

    bad = tmp_path / "g.yaml"
    for text, msg in [("grid: {lr: [1]}", "needs a mapping with 'output_dir' and 'grid'"),
                      (f"output_dir: {tmp_path}\ngrid: {{lr: []}}", "grid.lr must be a non-empty list"),
                      (f"output_dir: {tmp_path}\ngrid: {{lrr: [1]}}", "unknown finetune settings ['lrr']"),
                      (f"output_dir: {tmp_path}\ngrid: {{lr: [0.0]}}", "lr must be a finite number > 0"),
                      (f"output_dir: {tmp_path}\ngird: {{}}\ngrid: {{lr: [1]}}", "unknown keys ['gird']"),
                      ("a: [", "is not valid YAML")]:
        bad.write_text(text)
        with pytest.raises(ZoftError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            run_grid(bad)
    with pytest.raises(ZoftError, match="grid file not found"):
        run_grid(tmp_path / "none.yaml")


def test_a_head_start_and_its_share_name_the_method():
    from zoft.compare import method_labels

    configs = [{"estimator": "spsa", "seed": 0}, {"estimator": "spsa", "head_init": "probe"},
               {"estimator": "spsa", "head_init": "probe", "head_share": 0.5}]
    assert method_labels(configs) == ["spsa", "spsa+probe", "spsa+probe0.5"]


def test_one_tuner_file_read_from_two_checkouts_is_one_method_and_another_file_is_not():
    from zoft.compare import method_labels
    from zoft.config import method_from

    def config(path, sha):
        values = {"estimator": "spsa", "tuner": path}
        return {**values, "method": method_from(values, path), "tuner_path": path, "tuner_sha256": sha}

    labels = method_labels([config("/a/t.safetensors", "ab" * 32), config("/b/t.safetensors", "ab" * 32),
                            config("/a/u.safetensors", "cd" * 32)])
    assert labels[0] == labels[1] != labels[2] and "sha256:cdcdcdcdcdcd" in labels[2]


def test_a_default_run_name_says_what_ran():
    """The folder of a run started without --run-name carries compare's label for its method."""
    from zoft.config import FinetuneConfig
    from zoft.rundir import default_run_name

    name = default_run_name(FinetuneConfig(head_init="probe", head_share=0.5, seed=2), "jsonl:a b.jsonl")
    assert name.startswith("jsonl-a-b.jsonl-spsa-probe0.5-s2-")
    assert default_run_name(FinetuneConfig(tuner="smollm2"), "tweets").startswith("tweets-tuner-spsa-s0-")
    assert default_run_name(FinetuneConfig(), "tweets") != default_run_name(FinetuneConfig(), "tweets")
