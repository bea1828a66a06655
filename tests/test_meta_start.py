"""bench/meta_start.py: LoRA adapters trained first-order on meta-training tasks, scored on held-out ones."""

import json

from conftest import bench_script

meta_start = bench_script("meta_start")


def _rows(model_dir, lr, tmp_path):
    out = tmp_path / f"lr{lr}.json"
    result = meta_start.main(["--model", str(model_dir), "--meta", "tweets", "--held", "tweets", "--steps", "4",
                              "--every", "2", "--lr", str(lr), "--json", str(out)])
    assert out.is_file()
    return [r["tweets"] for r in result["rows"]]


def test_held_out_scores_move_only_when_the_adapters_train(tmp_path, tiny_model_dir, capsys):
    """At lr 0 the adapters stay at B = 0 and every row is the base model's; at lr > 0 they move the scores."""
    still, trained = _rows(tiny_model_dir, 0.0, tmp_path), _rows(tiny_model_dir, 1e-2, tmp_path)
    assert [r["step"] for r in json.loads((tmp_path / "lr0.0.json").read_text())["rows"]] == [0, 2, 4]
    assert all(r == still[0] for r in still)
    assert trained[0] == still[0] and any(r != trained[0] for r in trained[1:])
    assert all(r["dev_shifted"] >= r["dev"] for r in still + trained)
    assert len(capsys.readouterr().out.splitlines()) == 2 * (2 + 3)  # header, rule and one line a row, per run


def test_the_first_row_is_the_dev_accuracy_a_zo_lora_run_starts_from(tmp_path, tiny_model_dir, capsys):
    from zoft.cli import main as zoft_main

    assert zoft_main(["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "r",
                      "--peft", "lora", "--steps", "1", "--num-train", "1000", "--num-dev", "200", "--num-test", "500",
                      "--eval-every", "1"]) == 0
    logged = [m for m in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) if "dev/acc" in m]
    assert _rows(tiny_model_dir, 0.0, tmp_path)[0]["dev"] == logged[0]["dev/acc"]
