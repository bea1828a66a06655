"""A killed run continues bit for bit: kill -9 at a random step, then --resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoft.cli import main

TIMING = {"train_seconds", "s_per_step", "wall_seconds", "peak_memory_mb", "run_dir"}


def _args(model_dir, out, name, steps, *extra):
    return ["finetune", "--model", str(model_dir), "--output-dir", str(out), "--run-name", name, "--steps", str(steps),
            "--num-train", "32", "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--eval-every", "7",
            "--checkpoint-every", "1", "--lr", "2e-3", "--eps", "1e-2", *extra]


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_run(a: Path, b: Path):
    assert _metrics(a) == _metrics(b)
    summaries = [{k: v for k, v in json.loads((r / "summary.json").read_text()).items() if k not in TIMING} for r in (a, b)]
    assert summaries[0] == summaries[1]
    ta, tb = load_file(a / "trajectory.safetensors"), load_file(b / "trajectory.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _kill_at_random_step(cmd, folder: Path, steps: int, seed: int, marker='"train/loss"', log="metrics.jsonl") -> int:
    """Start ``cmd``, SIGKILL it once its log in ``folder`` shows a random step in [3, steps / 2]."""
    target = random.Random(seed).randint(3, steps // 2)
    # the same thread count as this process, which runs the straight and resumed halves: a CPU
    # matmul's reduction order, and so its last bits, depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = folder / log, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().count(marker) if metrics.is_file() else 0
        if lines >= target:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return target


@pytest.mark.parametrize("extra", [[], ["--update", "momentum", "--window", "3", "--directions", "2"],
                                   ["--estimator", "kernel", "--perturbation", "magnitude_mask"],
                                   ["--head-init", "probe", "--head-share", "0.5"]],
                         ids=["sgd", "momentum", "kernel+mask", "probe+share"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, extra):
    steps = 60
    assert main(_args(tiny_model_dir, tmp_path / "a", "r", steps, *extra)) == 0
    cmd = [sys.executable, "-m", "zoft.cli", *_args(tiny_model_dir, tmp_path / "b", "r", steps, *extra)]
    _kill_at_random_step(cmd, tmp_path / "b" / ".r.partial", steps, seed=len(extra))
    assert not (tmp_path / "b" / "r").exists()
    assert main(["finetune", "--resume", str(tmp_path / "b" / "r")]) == 0
    _same_run(tmp_path / "a" / "r", tmp_path / "b" / "r")
    assert not (tmp_path / "b" / "r" / "checkpoint.safetensors").exists()
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["r"]


def test_resume_errors(tmp_path, tiny_model_dir, capsys):
    assert main(["finetune", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, tmp_path, "done", 2)) == 0
    assert main(["finetune", "--resume", str(tmp_path / "done")]) == 2
    assert "is complete; nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_replay_rebuilds_the_saved_model_bit_for_bit(tmp_path, tiny_model_dir, capsys, dtype):
    assert main(_args(tiny_model_dir, tmp_path, "r", 12, "--save-model", "--weight-decay", "0.1", "--dtype", dtype)) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert 0 < summary["selected_step"] or summary["best_dev_step"] == 0
    assert main(["replay", str(tmp_path / "r"), "--out", str(tmp_path / "replayed")]) == 0
    saved, replayed = tmp_path / "r" / "model", tmp_path / "replayed"
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in replayed.iterdir())
    for f in saved.iterdir():
        assert f.read_bytes() == (replayed / f.name).read_bytes(), f.name
    from huggingface_hub import ModelCard

    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "transformers" and "zoft" in card.data.tags and card.data.datasets == ["tweets"]
    assert '"lr": 0.002' in card.text and "12 steps of batch 4" in card.text

    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(saved / "model.safetensors")
    assert {t.dtype for t in tuned.values()} == {torch.bfloat16 if dtype == "bf16" else torch.float32}
    base = {k: v.to(tuned[k].dtype) for k, v in base.items() if k in tuned}
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k in tuned) == (summary["selected_step"] > 0)
    assert main(["replay", str(tmp_path / "r"), "--out", str(tmp_path / "replayed")]) == 2
    assert "output already exists" in capsys.readouterr().err


def test_a_run_rebuilds_at_any_step_of_its_trajectory(tmp_path, tiny_model_dir):
    """rebuilt_model(run, k): the weights after k steps, the same as a shorter run of the same seed."""
    from zoft.errors import ZoftError
    from zoft.finetune import rebuilt_model

    for name, steps in (("long", 9), ("short", 5)):
        assert main(_args(tiny_model_dir, tmp_path, name, steps)) == 0

    def weights(run, step):
        model = rebuilt_model(tmp_path / run, step)[0]
        return {k: v.clone() for k, v in model.state_dict().items()}

    at_5 = weights("long", 5)
    assert all(torch.equal(at_5[k], v) for k, v in weights("short", 5).items())
    for other in (weights("long", 4), weights("long", 9)):
        assert any(not torch.equal(at_5[k], v) for k, v in other.items())
    with pytest.raises(ZoftError, match="recorded 9 steps, not 10"):
        rebuilt_model(tmp_path / "long", 10)


def test_a_trajectory_rebuilds_point_after_point_as_from_scratch(tmp_path, tiny_model_dir):
    """rebuilt_models(run, [2, 5, 9]) replays one model onward: at each point the same weights as a
    rebuild from step 0; falling points, and several points of an averaged run, are refused."""
    from zoft.errors import ZoftError
    from zoft.finetune import rebuilt_model, rebuilt_models

    def weights(model):
        return {k: v.clone() for k, v in model.state_dict().items()}

    assert main(_args(tiny_model_dir, tmp_path, "run", 9)) == 0
    onward = [weights(model) for model, *_ in rebuilt_models(tmp_path / "run", [2, 5, 9])]
    for k, got in zip((2, 5, 9), onward):
        fresh = weights(rebuilt_model(tmp_path / "run", k)[0])
        assert all(torch.equal(fresh[name], v) for name, v in got.items()), k
    assert any(not torch.equal(onward[0][k], v) for k, v in onward[1].items())
    with pytest.raises(ZoftError, match="must rise"):
        next(rebuilt_models(tmp_path / "run", [5, 2]))
    assert main(_args(tiny_model_dir, tmp_path, "avg", 3, "--average")) == 0
    with pytest.raises(ZoftError, match="replays from step 0 only"):
        next(rebuilt_models(tmp_path / "avg", [1, 3]))
    assert next(rebuilt_models(tmp_path / "avg", [3])) is not None
