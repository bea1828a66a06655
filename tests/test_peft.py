import json

import torch

import zoft
from zoft.cli import main
from tests.conftest import tiny_llama

IDS = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(5))


def lora_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero in peft; move it so the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.eval()


def test_lora_steps_move_only_adapters_and_perturbations_restore_them_exactly():
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = zoft.mezo(model, lr=1e-2, eps=1e-2)
    assert {b.name for b in opt.blocks} == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in b.name for b in opt.blocks)
    with torch.no_grad(), opt.perturber.active(7, [1e-2] * len(opt.blocks)):
        perturbed = model(IDS).logits
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        assert not torch.equal(perturbed, model(IDS).logits)
    opt.step(lambda: model(IDS, labels=IDS).loss)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != ("lora_" in n), n


def test_cli_lora_run_saves_an_adapter_that_peft_loads_alone(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code = main(["finetune", "--model", str(tiny_model_dir), "--mode", "lora", "--lora-r", "2", "--steps", "4",
                 "--eval-every", "2", "--lr", "1e-3", "--eps", "1e-2", "--num-train", "16", "--num-dev", "8",
                 "--num-test", "8", "--batch-size", "4", "--output-dir", str(tmp_path), "--run-name", "l",
                 "--save-model"])
    assert code == 0
    saved = tmp_path / "l" / "model"
    assert (saved / "adapter_model.safetensors").is_file()
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 2
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved)
    adapters = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert adapters and all(p.abs().sum() > 0 for n, p in adapters.items() if "lora_A" in n)
    assert json.loads((tmp_path / "l" / "config.json").read_text())["trainable_params"] < 2000


def test_lora_config_errors(tmp_path, tiny_model_dir, capsys):
    args = ["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--steps", "1"]
    assert main([*args, "--mode", "lora", "--lora-r", "0"]) == 2
    assert "lora needs lora-r >= 1" in capsys.readouterr().err
    assert main([*args, "--mode", "lora", "--lora-targets", "no_such_proj"]) == 2
    assert "cannot add LoRA adapters" in capsys.readouterr().err
    assert main([*args, "--mode", "prefix"]) == 2
    assert not any(tmp_path.iterdir())
