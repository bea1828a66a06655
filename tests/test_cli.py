import json

import pytest
from safetensors import safe_open

from zoft.cli import main

SMALL = ["--num-train", "24", "--num-dev", "8", "--num-test", "8", "--batch-size", "4",
         "--eval-batch-size", "8"]


def finetune(tmp_path, model_dir, *extra):
    return main(["finetune", "--model", str(model_dir), "--output-dir", str(tmp_path / "runs"),
                 *SMALL, *extra])


def test_finetune_writes_a_complete_run_directory(tmp_path, tiny_model_dir, capsys):
    assert finetune(tmp_path, tiny_model_dir, "--steps", "4", "--eval-every", "2", "--run-name", "r") == 0
    out = capsys.readouterr().out
    assert "test accuracy: before" in out
    run = tmp_path / "runs" / "r"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]  # no temporary left
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 1e-5 and config["versions"]["torch"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if "dev/acc" in x] == [0, 2, 4]
    assert [x["forward_passes"] for x in lines if "train/loss" in x][-1] == 8
    summary = json.loads((run / "summary.json").read_text())
    assert {"test_acc_before", "test_acc_after", "selected_step", "best_dev_acc"} <= summary.keys()
    with safe_open(run / "trajectory.safetensors", "pt") as f:
        blocks = json.loads(f.metadata()["blocks"])
        assert f.get_tensor("seeds").shape == (4,) and f.get_tensor("terms_per_step").tolist() == [1] * 4
        assert f.get_tensor("scales").shape == (4, len(blocks))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--lr", "0"], "lr must be a finite number > 0"),
        (["--lr=-1e-5"], "lr must be a finite number > 0"),
        (["--eps", "0"], "eps must be a finite number > 0"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--batch-size", "0"], "batch-size must be >= 1"),
        (["--noise", "pink"], "noise must be one of"),
        (["--estimator", "kernel", "--kernel-order", "3"], "kernel order must be 2, 4 or 6"),
        (["--estimator", "fancy"], "estimator must be one of"),
        (["--objective", "bleu"], "objective must be one of loss, choice, accuracy, f1"),
        (["--task", "sst2", "--data-dir", "/no/such/dir"], "data dir not found"),
        (["--model", "/no/such/model"], "model path not found: /no/such/model"),
        (["--model", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
    ],
)
def test_bad_input_is_one_error_line_exit_2_and_no_run_dir(tmp_path, tiny_model_dir, capsys, args, message):
    model = [] if "--model" in args else ["--model", str(tiny_model_dir)]
    code = main(["finetune", *model, "--output-dir", str(tmp_path / "runs"), *SMALL, "--steps", "2", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("zoft: error: ") and message in err
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_nan_loss_mid_run_is_one_error_line_and_no_run_dir(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import torch

    import zoft.finetune

    calls = {"n": 0}
    real = zoft.finetune.classification_loss

    def nan_from_third_step(*args):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] > 4 else real(*args)

    monkeypatch.setattr(zoft.finetune, "classification_loss", nan_from_third_step)
    assert finetune(tmp_path, tiny_model_dir, "--steps", "5") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("zoft: error: non-finite loss at step 2")
    assert not any((tmp_path / "runs").iterdir())


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--steps", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_existing_run_directory_is_refused(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    assert finetune(tmp_path, tiny_model_dir, "--run-name", "taken", "--steps", "1") == 2
    assert "run directory already exists" in capsys.readouterr().err


def test_kernel_estimator_from_the_cli(tmp_path, tiny_model_dir):
    assert finetune(tmp_path, tiny_model_dir, "--steps", "2", "--run-name", "k", "--estimator", "kernel",
                    "--kernel-order", "6", "--r-mode", "block", "--directions", "2") == 0
    config = json.loads((tmp_path / "runs" / "k" / "config.json").read_text())
    assert (config["estimator"], config["kernel_order"], config["r_mode"]) == ("kernel", 6, "block")
    with safe_open(tmp_path / "runs" / "k" / "trajectory.safetensors", "pt") as f:
        scales = f.get_tensor("scales")
    assert scales.shape[0] == 4 and len(set(scales[0].tolist())) > 1  # 2 steps x 2 directions; K(r_b) per block


def test_zero_shot_eval(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "tweets", "--num-test", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tweets: zero-shot test accuracy ") and "(12 examples)" in out
    assert main(["eval", "--model", str(tiny_model_dir), "--num-test", "0"]) == 2


def test_best_step_is_rebuilt_bit_identically_from_the_checkpoint(tiny_model_dir):
    import torch

    import zoft
    from zoft.finetune import restore_step
    from zoft.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    opt = zoft.mezo(model, lr=1e-2, eps=1e-2, weight_decay=0.01, record=True)
    ids = torch.randint(1, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    opt.step(lambda: model(ids, labels=ids).loss)
    after_one = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.step(lambda: model(ids, labels=ids).loss)
    assert restore_step(opt, str(tiny_model_dir), 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_one))
    assert not restore_step(opt, "no/such-model", 1)  # falls back to the final model
