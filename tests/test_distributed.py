"""Two gloo processes under torchrun equal one process, bit for bit: no parameter is ever sent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoft.cli import main

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _args(model_dir, out, name, *extra):
    return ["finetune", "--model", str(model_dir), "--output-dir", str(out), "--run-name", name, "--steps", "6",
            "--num-train", "32", "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--eval-every", "3",
            "--lr", "2e-3", "--eps", "1e-2", "--save-model", *extra]


def _torchrun(args, procs=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={procs}", "-m", "zoft.cli", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def _equal(a: Path, b: Path):
    ta, tb = load_file(a / "trajectory.safetensors"), load_file(b / "trajectory.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((b / "summary.json").read_text())["world_size"] == 2


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed beside this python")
@pytest.mark.parametrize("parallel, single, head", [
    ("data", ["--accumulate", "2"], []), ("directions", [], []),
    ("data", ["--accumulate", "2"], ["--head-init", "probe", "--eval-batch-size", "8"])],
    ids=["data", "directions", "data+probe"])
def test_two_gloo_ranks_equal_one_process_bit_for_bit(parallel, single, head, tmp_path, tiny_model_dir, monkeypatch):
    """With a head start the ranks split the feature batches (4 of 8) and share the fitted rows."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # the same kernels as the ranks run
    extra = ["--directions", "2", *head]
    assert main(_args(tiny_model_dir, tmp_path / "one", "r", *extra, *single)) == 0
    done = _torchrun(_args(tiny_model_dir, tmp_path / "two", "r", *extra, "--parallel", parallel))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("run: ") == 1  # rank 0 alone reports and writes
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["r"]
    _equal(tmp_path / "one" / "r", tmp_path / "two" / "r")


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed beside this python")
def test_a_failing_rank_stops_the_job_and_leaves_no_folder(tmp_path, tiny_model_dir):
    done = _torchrun(_args(tiny_model_dir, tmp_path / "two", "r", "--batch-size", "6", "--accumulate", "2"))
    assert done.returncode != 0
    assert "batch size 6 must be a multiple of world size × accumulate = 4" in done.stderr
    assert not (tmp_path / "two" / "r").exists()
