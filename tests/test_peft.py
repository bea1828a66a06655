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


def test_cli_lora_run_saves_an_adapter_that_peft_loads_alone(tmp_path, tiny_model_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tiny_model_dir.parent)  # a relative --model: the adapter still names its base absolutely
    code = main(["finetune", "--model", f"./{tiny_model_dir.name}", "--peft", "lora", "--lora-r", "2", "--steps", "4",
                 "--eval-every", "2", "--lr", "1e-3", "--eps", "1e-2", "--num-train", "16", "--num-dev", "8",
                 "--num-test", "8", "--batch-size", "4", "--output-dir", str(tmp_path), "--run-name", "l",
                 "--save-model"])
    assert code == 0
    saved = tmp_path / "l" / "model"
    assert (saved / "adapter_model.safetensors").is_file()
    adapter = json.loads((saved / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    from huggingface_hub import ModelCard

    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags and "through peft (lora)" in card.text
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved)
    adapters = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert adapters and all(p.abs().sum() > 0 for n, p in adapters.items() if "lora_A" in n)
    assert json.loads((tmp_path / "l" / "config.json").read_text())["trainable_params"] < 2000


def test_lora_config_errors(tmp_path, tiny_model_dir, capsys):
    args = ["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--steps", "1"]
    assert main([*args, "--peft", "lora", "--lora-r", "0"]) == 2
    assert "lora needs lora-r >= 1" in capsys.readouterr().err
    assert main([*args, "--peft", "lora", "--lora-targets", "no_such_proj"]) == 2
    assert "cannot add LoRA adapters" in capsys.readouterr().err
    assert main([*args, "--peft", "ia3"]) == 2
    assert "peft must be none, lora or prefix" in capsys.readouterr().err
    assert main([*args, "--peft", "prefix", "--prefix-tokens", "0"]) == 2
    assert "prefix-tokens must be >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def prefix_model():
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")).eval()


def test_prefix_scoring_equals_peft_forward_and_steps_move_only_the_prefix():
    """Candidate and option scoring feed the prefix as peft's own forward does; a ZO step
    changes only the prefix, and perturbing it restores it exactly."""
    from zoft.data import Encoded, collate
    from zoft.scoring import candidate_logits, option_logits

    model = prefix_model()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_()  # a prefix that matters
    prompts, cand = [[5, 9, 2, 14], [8, 1, 3]], torch.tensor([3, 7])
    batch = collate([Encoded(p, 0) for p in prompts], pad_id=0)
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
        torch.testing.assert_close(candidate_logits(model, batch, cand),
                                   torch.stack([r[cand] for r in reference]), rtol=1e-4, atol=1e-5)
        options = option_logits(model, collate([Encoded(p, 0, ((3,), (7,))) for p in prompts], pad_id=0))
        torch.testing.assert_close(options, torch.stack([r.log_softmax(-1)[cand] for r in reference]),
                                   rtol=1e-4, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = zoft.mezo(model, lr=1e-2, eps=1e-2)
    assert [b.name for b in opt.blocks] == ["prompt_encoder.default.embedding.weight"]
    with torch.no_grad(), opt.perturber.active(3, [1e-2]):
        perturbed = candidate_logits(model, batch, cand)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not torch.equal(perturbed, candidate_logits(model, batch, cand))
    opt.step(lambda: candidate_logits(model, batch, cand).logsumexp(-1).mean())
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != ("prompt_encoder" in n), n


def test_cli_prefix_run_saves_an_adapter_that_peft_loads_alone(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["finetune", "--model", str(tiny_model_dir), "--peft", "prefix", "--prefix-tokens", "2",
                 "--steps", "2", "--lr", "1e-2", "--eps", "1e-1", "--num-train", "16", "--num-dev", "8",
                 "--num-test", "8", "--batch-size", "4", "--output-dir", str(tmp_path), "--run-name", "p",
                 "--save-model"]) == 0
    saved = tmp_path / "p" / "model"
    assert json.loads((saved / "adapter_config.json").read_text())["num_virtual_tokens"] == 2
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved)
    assert loaded.prompt_encoder["default"].embedding.weight.shape[0] == 2


def test_prefix_starts_from_the_models_own_keys_and_values():
    """After the initialisation, peft's prompt is exactly the cache of the random tokens."""
    from zoft.adapters import init_prefix_from_activations

    model = prefix_model()
    init_prefix_from_activations(model, seed=4)
    tokens = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.get_base_model()(input_ids=tokens, use_cache=True).past_key_values
        prompt = model.get_prompt(batch_size=2)
    for mine, theirs in zip(prompt.layers, cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys.expand(2, -1, -1, -1))
        torch.testing.assert_close(mine.values, theirs.values.expand(2, -1, -1, -1))
