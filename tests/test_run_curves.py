"""bench/run_curves.py: dev curves and windowed training loss, read from a run folder."""

import json

from conftest import bench_script

curves = bench_script("run_curves")


def _run(path, losses, dev):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"objective": "choice"}))
    (path / "summary.json").write_text("{}")
    lines = [{"step": s, "dev/acc": a, "dev/loss": l} for s, a, l in dev]
    lines += [{"step": i + 1, "train/loss": x} for i, x in enumerate(losses)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_windows_average_the_training_loss_and_the_last_one_may_be_short(tmp_path, capsys):
    run = _run(tmp_path / "r", [4.0, 2.0, 1.0, 3.0, 5.0], [(0, 0.5, 0.7), (5, 0.625, 0.65)])
    assert curves.main([str(run), "--window", "2"]) == 0
    out = capsys.readouterr().out
    assert "r (objective choice, evaluations at steps 0 5)" in out
    assert "- dev acc: 0.500 0.625\n- dev loss: 0.700 0.650\n" in out
    assert "- mean train loss over steps 1-2 3-4 5-5: 3.000 2.000 5.000\n" in out


def test_a_folder_that_is_not_a_run_is_one_error_line(tmp_path, capsys):
    assert curves.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("zoft: error:") == 1 and "is not a complete run directory" in err
