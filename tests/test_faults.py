"""Faults and odd input: one `zoft: error:` line naming the cause, exit 2, nothing left on disk;
and runs that are never lost (concurrent names, grids sharing runs, a full disk, SIGTERM)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zoft.cli import main
from tests.test_resume import _args, _kill_at_random_step, _same_run

ROWS = [{"text": f"the film was good {i}", "label": i % 2} for i in range(60)]


def _finetune(model_dir, out, *extra):
    return ["finetune", "--model", str(model_dir), "--output-dir", str(out), "--steps", "3", "--num-train", "16",
            "--num-dev", "4", "--num-test", "4", "--batch-size", "4", *extra]


def _jsonl(tmp_path, rows, raw: bytes = b"") -> str:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    return f"jsonl:{path}"


def _one_error_line(capsys, expected: str):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("zoft: error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def _jsonl_case(tmp_path, rows, raw=b"", template="{text} It was"):
    return ["--task", _jsonl(tmp_path, rows, raw), "--template", template, "--labels", "terrible,great"]


CASES = {
    "output dir is a file": (lambda t: ["--output-dir", str(t / "afile")], "is not a writable folder"),
    "lr inf": (lambda t: ["--lr", "inf"], "lr must be a finite number > 0"),
    "dtype fp8": (lambda t: ["--dtype", "fp8"], "dtype must be one of auto, fp32, bf16, fp16"),
    "eps inf": (lambda t: ["--eps", "inf"], "eps must be a finite number > 0"),
    "lr 1e3 diverges": (lambda t: ["--lr", "1e3", "--steps", "40"], "lower lr"),
    "lr 1e38": (lambda t: ["--lr", "1e38", "--steps", "40"], "lower lr"),
    "lr 1e3 diverges on --objective choice": (lambda t: ["--lr", "1e3", "--steps", "40", "--objective", "choice"], "lower lr"),
    "label 1.7": (lambda t: _jsonl_case(t, ROWS + [{"text": "x", "label": 1.7}]), "data.jsonl:61: bad row (label 1.7 is not an index"),
    "null field": (lambda t: _jsonl_case(t, [{"text": None, "label": 0}] + ROWS), "data.jsonl:1: bad row (field text is null)"),
    "unknown label word": (lambda t: _jsonl_case(t, ROWS + [{"text": "x", "label": "meh"}]), "label 'meh' is not among the label words"),
    "field in no row": (lambda t: _jsonl_case(t, ROWS, template="{review} It was"), "no row has the field review"),
    "template {}": (lambda t: _jsonl_case(t, ROWS, template="{} It was"), "needs named fields"),
    "unbalanced brace": (lambda t: _jsonl_case(t, ROWS, template="{text It was"), "is not a valid template"),
    "non-UTF-8 byte": (lambda t: _jsonl_case(t, ROWS, raw=b'{"text": "caf\xe9", "label": 0}\n'), "data.jsonl:61: not UTF-8 text (byte 0xe9"),
    "empty test split": (lambda t: _jsonl_case(t, ROWS[:1]), "split (by a hash of each row) is empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(case, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "afile").write_text("")
    flags, expected = CASES[case]
    out = tmp_path / "runs"
    assert main(_finetune(tiny_model_dir, out, *flags(tmp_path))) == 2
    _one_error_line(capsys, expected)
    assert not out.exists() or not [p for p in out.iterdir() if p.name != ".grid.lock"]


def test_other_commands_refuse_bad_input_in_one_line(tmp_path, tiny_model_dir, capsys):
    from zoft.blocks import collect_blocks
    from zoft.models import load_model
    from zoft.tuner import BlockMLPs, save_tuner

    assert main(["meta-train", "--output", str(tmp_path / "t"), "--tasks", ","]) == 2
    _one_error_line(capsys, "--tasks needs at least one task name")
    blocks = collect_blocks(load_model(str(tiny_model_dir))[0])
    nan = BlockMLPs(len(blocks))
    with torch.no_grad():
        nan.w2.fill_(float("nan"))
    save_tuner(tmp_path / "nan" / "tuner.safetensors", nan, blocks, {"base_model": "tiny"})
    save_tuner(tmp_path / "bad" / "tuner.safetensors", BlockMLPs(len(blocks)), blocks, {"estimator": "{not json"})
    from safetensors.torch import load_file, save_file

    (tmp_path / "noblocks").mkdir()
    meta = {"format": "zoft-tuner-1", "features": json.dumps(["mean", "var", "loss_plus_prev", "loss_minus_prev",
                                                              "sigma_prev"]), "hidden": "64"}
    save_file(load_file(tmp_path / "bad" / "tuner.safetensors"), tmp_path / "noblocks" / "tuner.safetensors", metadata=meta)
    for tuner, expected in [(tmp_path / "nan", "non-finite σ"), (tmp_path / "bad", "'estimator' is not JSON"),
                            (tmp_path / "noblocks", "the tuner header's 'blocks' is missing or not JSON")]:
        assert main(_finetune(tiny_model_dir, tmp_path / "runs", "--tuner", str(tuner))) == 2
        _one_error_line(capsys, expected)
    assert not list((tmp_path / "runs").iterdir())
    (tmp_path / "afile").write_text("")
    run = tmp_path / "runs" / "r"
    assert main(_finetune(tiny_model_dir, tmp_path / "runs", "--run-name", "r")) == 0
    capsys.readouterr()
    assert main(["compare", str(run), "--out", str(tmp_path / "afile" / "cmp.png")]) == 2
    _one_error_line(capsys, "cannot write the plot to")


def test_a_truncated_cached_default_model_says_how_to_rebuild_it(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cached = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    shutil.copytree(tiny_model_dir, cached)
    data = (cached / "model.safetensors").read_bytes()
    (cached / "model.safetensors").write_bytes(data[: len(data) // 3])
    monkeypatch.setenv("ZOFT_CACHE", str(tmp_path / "cache"))
    assert main(["eval", "--num-test", "4"]) == 2
    _one_error_line(capsys, f"remove that folder and zoft converts it again from the GGUF: rm -rf {cached}")


def test_grid_reads_yaml_numbers_and_names_a_bad_value(tmp_path, tiny_model_dir):
    from zoft.errors import ZoftError
    from zoft.grid import _coerce

    assert _coerce({"lr": "1e-5", "steps": "3", "task": "tweets"}, "g.yaml") == {"lr": 1e-5, "steps": 3, "task": "tweets"}
    with pytest.raises(ZoftError, match="g.yaml: lr must be a number, got 'fast'"):
        _coerce({"lr": "fast"}, "g.yaml")


def test_four_runs_started_at_once_with_default_names_all_finish(tmp_path, tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "zoft.cli", *_finetune(tiny_model_dir, tmp_path / "runs", "--steps", "4")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    runs = sorted(p for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 4 and all((r / "summary.json").is_file() for r in runs)
    assert sorted(line.split("run: ")[1] for o in outs for line in o.splitlines() if line.startswith("run: ")) == \
        sorted(str(r) for r in runs)


def test_a_second_run_with_a_taken_name_is_refused(tmp_path, tiny_model_dir, capsys):
    from zoft.rundir import RunFolder

    folder = RunFolder(tmp_path / "runs" / "r")
    folder.reserve()  # as a run in progress holds it
    assert main(_finetune(tiny_model_dir, tmp_path / "runs", "--run-name", "r")) == 2
    _one_error_line(capsys, "another run named r is running or was interrupted")
    assert folder.partial.is_dir()  # the first run's folder is untouched
    folder.discard()


def _grid_file(tmp_path, model_dir, seeds) -> Path:
    grid = tmp_path / "g.yaml"
    grid.write_text(f"output_dir: {tmp_path / 'grid'}\nbase: {{model: '{model_dir}', steps: 2, num_train: 16, num_dev: 4,"
                    f" num_test: 4, batch_size: 4}}\ngrid: {{seed: {seeds}}}\nname: 's{{seed}}'\n")
    return grid


def test_a_grid_leaves_a_run_another_process_holds_and_the_last_to_finish_writes_the_table(tmp_path, tiny_model_dir,
                                                                                             capsys):
    from zoft.rundir import RunFolder

    grid = _grid_file(tmp_path, tiny_model_dir, [0, 1])
    held = RunFolder(tmp_path / "grid" / "s0")
    held.reserve()  # as another grid's process running s0
    assert main(["grid", str(grid)]) == 0
    out = capsys.readouterr()
    assert "s0: running in another process, skipped" in out.err and "1 of 2 runs are still running" in out.out
    assert "[1/2] s0\n" not in out.err  # not announced as started
    assert (tmp_path / "grid" / "s1" / "summary.json").is_file() and not (tmp_path / "grid" / "table.md").exists()
    assert held.partial.is_dir()  # left as its holder has it
    held.discard()
    assert main(["grid", str(grid)]) == 0
    assert "s1: complete, skipped" in capsys.readouterr().err
    assert "| 2 |" in (tmp_path / "grid" / "table.md").read_text()  # both seeds, one group


def test_a_run_that_diverged_in_another_process_counts_as_done(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import zoft.grid
    from zoft.rundir import RunFolder

    grid = _grid_file(tmp_path, tiny_model_dir, [0, 1])
    held = RunFolder(tmp_path / "grid" / "s0")
    held.reserve()  # another grid's process runs s0 ...
    real = zoft.grid._run_point

    def and_it_diverges_meanwhile(cfg, run_dir, label, log):
        taken = real(cfg, run_dir, label, log)
        if not taken:  # ... and its run diverges while this process runs s1
            held.discard()
            (run_dir.parent / "s0.diverged").write_text("the run diverges\n")
        return taken

    monkeypatch.setattr(zoft.grid, "_run_point", and_it_diverges_meanwhile)
    assert main(["grid", str(grid)]) == 0
    assert "Diverged (no run folder):\n- s0: the run diverges" in (tmp_path / "grid" / "table.md").read_text()


def test_two_grids_started_at_once_share_the_runs_and_run_each_once(tmp_path, tiny_model_dir):
    grid = _grid_file(tmp_path, tiny_model_dir, [0, 1, 2, 3])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "zoft.cli", "grid", str(grid)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    ran = []  # a run's name is logged as it starts, then again if another process had it
    for log in logs:
        lines = [line.split("] ")[1] for line in log.splitlines() if line.startswith("[")]
        ran += [n for n in lines if n in {"s0", "s1", "s2", "s3"} and not {f"{n}: running in another process, skipped",
                                                                           f"{n}: finished by another process"} & set(lines)]
    assert sorted(ran) == ["s0", "s1", "s2", "s3"]  # every run by exactly one process
    assert all((tmp_path / "grid" / f"s{k}" / "summary.json").is_file() for k in range(4))
    assert "| 4 |" in (tmp_path / "grid" / "table.md").read_text()


@pytest.mark.parametrize("where", ["trajectory", "metrics"])
def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it(where, tmp_path, tiny_model_dir, monkeypatch,
                                                                       capsys):
    import zoft.logging
    import zoft.trajectory

    steps = 12
    assert main(_args(tiny_model_dir, tmp_path / "a", "r", steps)) == 0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "trajectory.safetensors")

    if where == "trajectory":
        monkeypatch.setattr(zoft.trajectory, "save", full)
    else:
        real = zoft.logging.JsonlLogger.log
        monkeypatch.setattr(zoft.logging.JsonlLogger, "log",
                            lambda self, m, step: full() if step == 7 and "train/loss" in m else real(self, m, step))
    assert main(_args(tiny_model_dir, tmp_path / "b", "r", steps)) == 2
    _one_error_line(capsys, "no space left on device")
    monkeypatch.undo()
    assert main(["finetune", "--resume", str(tmp_path / "b" / "r")]) == 0
    _same_run(tmp_path / "a" / "r", tmp_path / "b" / "r")


def test_resume_refuses_a_metrics_file_shorter_than_its_checkpoint_saw(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A metrics.jsonl replaced while the run wrote it (a git stash or checkout under a live run) is
    shorter than the checkpoint recorded: resume says so in one line and leaves the folder as it is,
    instead of padding the gap with NUL bytes."""
    import zoft.logging

    real = zoft.logging.JsonlLogger.log
    monkeypatch.setattr(zoft.logging.JsonlLogger, "log", lambda self, m, step: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")) if step == 7 and "train/loss" in m else real(self, m, step))
    assert main(_args(tiny_model_dir, tmp_path, "r", 12)) == 2
    monkeypatch.undo()
    metrics = tmp_path / ".r.partial" / "metrics.jsonl"
    cut = metrics.read_bytes()[: metrics.stat().st_size // 2]
    metrics.write_bytes(cut)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(tmp_path / "r")]) == 2
    _one_error_line(capsys, "shorter than its checkpoint recorded")
    assert metrics.read_bytes() == cut and (tmp_path / ".r.partial" / "checkpoint.safetensors").is_file()


def test_sigterm_checkpoints_and_stops_then_resume_finishes(tmp_path, tiny_model_dir):
    steps = 60
    assert main(_args(tiny_model_dir, tmp_path / "a", "r", steps)) == 0
    cmd = [sys.executable, "-m", "zoft.cli", *_args(tiny_model_dir, tmp_path / "b", "r", steps, "--checkpoint-every", "1000")]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "b" / ".r.partial" / "metrics.jsonl"
    while proc.poll() is None and (not metrics.is_file() or metrics.read_text().count('"train/loss"') < 5):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "zoft: error: stopped by SIGTERM at step" in err, err
    assert main(["finetune", "--resume", str(tmp_path / "b" / "r")]) == 0
    _same_run(tmp_path / "a" / "r", tmp_path / "b" / "r")


def test_sigterm_before_the_first_step_stops_at_once_and_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The evaluations before training take minutes on a real model: a stop asked then must not
    wait for them (there is no step to checkpoint)."""
    import zoft.finetune

    reached = []

    def start_then_evaluate(s, p):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs here
        reached.append("evaluations")  # not reached when the stop is immediate

    monkeypatch.setattr(zoft.finetune, "_start", start_then_evaluate)
    assert main(_finetune(tiny_model_dir, tmp_path / "runs", "--run-name", "r")) == 143
    _one_error_line(capsys, "stopped by SIGTERM before the first step; nothing to resume")
    assert not reached and not any((tmp_path / "runs").iterdir())


def test_stale_folders_of_dead_runs_are_removed_and_resumable_ones_kept(tmp_path, tiny_model_dir):
    cmd = [sys.executable, "-m", "zoft.cli", *_args(tiny_model_dir, tmp_path, "killed", 60)]
    _kill_at_random_step(cmd, tmp_path / ".killed.partial", 60, seed=3)
    debris = tmp_path / ".dead.partial"
    debris.mkdir()
    (debris / ".lock").write_text("")
    assert main(_finetune(tiny_model_dir, tmp_path, "--run-name", "next")) == 0
    assert not debris.exists() and (tmp_path / ".killed.partial" / "checkpoint.safetensors").is_file()


def test_a_run_committing_while_another_process_sweeps_stale_partials_keeps_its_folder(tmp_path, monkeypatch):
    import zoft.rundir
    from zoft.rundir import RunFolder, remove_stale

    folder = RunFolder(tmp_path / "grid" / "s1")
    folder.reserve()
    (folder.partial / "summary.json").write_text("{}\n")
    real_rename = os.rename

    def another_grid_sweeps_first(src, dst):  # a second grid's reserve() runs between the clean-up and the rename
        remove_stale(tmp_path / "grid")
        real_rename(src, dst)

    monkeypatch.setattr(zoft.rundir.os, "rename", another_grid_sweeps_first)
    folder.commit()
    assert sorted(p.name for p in folder.run_dir.iterdir()) == ["summary.json"]
    assert not folder.partial.exists()
