"""bench/calibration.py: dev and test accuracy along a run, rebuilt from its trajectory."""

import json

import pytest

from conftest import bench_script

calibration = bench_script("calibration")


@pytest.mark.parametrize("peft, lr", [("none", "5e-2"), ("lora", "1.0")])  # LoRA starts at B = 0: a larger step
def test_each_rebuilt_step_scores_dev_as_the_run_did(tmp_path, tiny_model_dir, capsys, peft, lr):
    """Dev accuracy at every rebuilt step equals what the run logged there, test at step 0 the run's test
    before training; the best shift is never worse."""
    from zoft.cli import main as zoft_main

    assert zoft_main(["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "r",
                      "--peft", peft, "--steps", "6", "--num-train", "64", "--num-dev", "32", "--num-test", "16",
                      "--batch-size", "4", "--eval-every", "2", "--lr", lr, "--eps", "1e-2"]) == 0
    capsys.readouterr()
    run = tmp_path / "r"
    logged = {m["step"]: m["dev/acc"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "dev/acc" in m}
    summary = json.loads((run / "summary.json").read_text())
    rows = list(calibration.along(run, [0, 2, 6]))
    assert [r["step"] for r in rows] == [0, 2, 6]
    assert [r["dev"] for r in rows] == pytest.approx([logged[k] for k in (0, 2, 6)])
    assert len({r["dev"] for r in rows}) > 1, "the tiny run must move dev for this test to tell steps apart"
    assert rows[0]["test"] == pytest.approx(summary["test_acc_before"])
    assert all(r["dev_shifted"] >= r["dev"] for r in rows)
