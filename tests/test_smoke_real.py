"""The real default model (SmolLM2-135M-Instruct from the embedded GGUF): a short run."""

import json

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.smoke]


def test_real_model_exact_restore_and_short_finetune(tmp_path, capsys):
    import zoft
    from zoft.cli import main
    from zoft.data import Batches, candidate_token_ids, encode
    from zoft.models import load_model
    from zoft.scoring import classification_loss
    from zoft.tasks import get_task, sample_splits

    model, tok = load_model()
    task = get_task("tweets")
    items = encode(task, sample_splits(task, None, 16, 1, 1, 0).train, tok, 64)
    batch, cand = next(Batches(items, 8, 0, tok.pad_token_id)), candidate_token_ids(task, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = zoft.mezo(model)
    with torch.no_grad(), opt.perturber.active(1, [1e-3] * len(opt.blocks)):
        perturbed = classification_loss(model, batch, cand)
    assert perturbed.isfinite() and opt.perturber.touched == set(range(len(opt.blocks)))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    del model, before

    code = main(["finetune", "--steps", "3", "--eval-every", "3", "--num-train", "32", "--num-dev", "16",
                 "--num-test", "16", "--output-dir", str(tmp_path), "--run-name", "smoke"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert summary["forward_passes"] == 6 and 0 <= summary["test_acc_after"] <= 1

    # the demo's flagship: a head start on the real model (32 examples: 2 batches of 16 for the features)
    code = main(["finetune", "--head-init", "probe", "--steps", "1", "--eval-every", "1", "--num-train", "32",
                 "--num-dev", "16", "--num-test", "16", "--output-dir", str(tmp_path), "--run-name", "probe"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "probe" / "summary.json").read_text())["forward_passes"] == 2 + 2

    # the allocation shipped for ZO-LoRA on this model: --scales-file auto finds it by the adapters' layout
    code = main(["finetune", "--peft", "lora", "--perturbation", "block_scales", "--scales-file", "auto", "--lr", "5e-3",
                 "--eps", "1e-2", "--steps", "1", "--eval-every", "1", "--num-train", "16", "--num-dev", "16",
                 "--num-test", "16", "--output-dir", str(tmp_path), "--run-name", "lora"])
    assert code == 0, capsys.readouterr().err
    assert "allocation-lora.safetensors" in capsys.readouterr().err
