"""Every causal LM family zoft promises, as tiny random models: a few steps in every mode pass or
stop with one clear line; candidate scoring equals the model's own full-logits loss; best-dev
restore rebuilds the selected weights exactly."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import zoft
from zoft.cli import main
from zoft.data import candidate_token_ids, collate, encode
from zoft.scoring import classification_loss
from zoft.tasks import Example, get_task
from tests.conftest import tiny_tokenizer

V, H = 64, 32  # vocabulary, hidden size


def _configs():
    import transformers as t

    common = dict(vocab_size=V, pad_token_id=0)
    llama = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": t.LlamaConfig(**common, **llama, tie_word_embeddings=True),
        "llama-untied": t.LlamaConfig(**common, **llama, tie_word_embeddings=False),
        "gpt2": t.GPT2Config(**common, n_embd=H, n_layer=2, n_head=4, n_positions=128),
        "opt": t.OPTConfig(**common, hidden_size=H, ffn_dim=2 * H, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=H, max_position_embeddings=128),
        "qwen2": t.Qwen2Config(**common, **llama),
        "qwen3": t.Qwen3Config(**common, **llama, head_dim=8),
        "mistral": t.MistralConfig(**common, **llama),
        "gemma": t.GemmaConfig(**common, **llama, head_dim=8),
        "gemma2": t.Gemma2Config(**common, **llama, head_dim=8, final_logit_softcapping=2.0),
        "phi": t.PhiConfig(**common, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4),
        "phi3": t.Phi3Config(**common, **llama),
        "gpt_neox": t.GPTNeoXConfig(**common, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                                    num_attention_heads=4, tie_word_embeddings=False),
        "falcon": t.FalconConfig(**common, hidden_size=H, num_hidden_layers=2, num_attention_heads=4),
        "mixtral": t.MixtralConfig(**common, **llama, num_local_experts=2, num_experts_per_tok=1),
    }


ARCHS = list(_configs())


def _model(arch: str, scale: float = 1.0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch]).eval()
    if scale != 1.0:  # logits large enough for a soft cap to matter
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(arch)
        _model(arch).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.mark.parametrize("perturbed", [False, True], ids=["plain", "perturbed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_candidate_scoring_equals_the_models_own_loss(arch, perturbed):
    """Under a perturbation too: every tensor the head reads (its bias, for Phi) is perturbed in both."""
    model = _model(arch, scale=40.0)
    tok = tiny_tokenizer()
    task = get_task("tweets")
    examples = [Example({"sentence": s}, i % 2) for i, s in enumerate(["the film was good", "a bad movie is not good"])]
    batch = collate(encode(task, examples, tok, 64), tok.pad_token_id)
    cand = candidate_token_ids(task, tok)
    from zoft.blocks import collect_blocks
    from zoft.noise import NoiseTable
    from zoft.perturb import Perturber

    blocks = collect_blocks(model)
    perturber = Perturber(model, blocks, NoiseTable())
    active = perturber.active(11, [0.05] * len(blocks)) if perturbed else torch.no_grad()
    with torch.no_grad(), active:
        logits = model(batch["input_ids"]).logits  # the model's own head, soft cap included
        last = logits[torch.arange(2), batch["lengths"] - 1][:, cand]
        expected = F.cross_entropy(last.float(), batch["labels"])
        ours = classification_loss(model, batch, cand)
    assert last.abs().max() > 1.0  # the cap (2.0 for gemma2) is in play
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_best_dev_restore_rebuilds_the_selected_weights(arch, model_dirs):
    from zoft.finetune import restore_step
    from zoft.models import load_model

    model, _ = load_model(str(model_dirs[arch]))
    opt = zoft.mezo(model, lr=1e-3, eps=1e-2, record=True)
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(1))
    opt.step(lambda: model(ids, labels=ids).loss)
    after_one = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: model(ids, labels=ids).loss)
    assert restore_step(opt, str(model_dirs[arch]), 1)
    assert all(torch.equal(p, after_one[n]) for n, p in model.named_parameters())


MODES = {"full": [], "lora": ["--peft", "lora"], "prefix": ["--peft", "prefix"], "kernel": ["--estimator", "kernel"]}
# where peft cannot run the mode with some transformers versions, zoft stops with one line instead
# of a traceback (Falcon prefix: a shape mismatch inside the attention with transformers 5.24; it
# runs with 5.25)
MAY_STOP = {("falcon", "prefix")}


@pytest.fixture
def own_tokenizer_class(monkeypatch):
    """transformers 5 replaces the tokenizer class a folder names with its own for some model
    types (qwen2: Qwen2Tokenizer, byte-level), which breaks the fixtures' word-level vocabulary;
    a real Qwen2 checkpoint ships that tokenizer, so the fixture keeps its own."""
    from transformers.models.auto import tokenization_auto

    monkeypatch.setattr(tokenization_auto, "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS", set())


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_steps_in_every_mode_pass_or_stop_in_one_line(arch, mode, model_dirs, tmp_path, capsys,
                                                            own_tokenizer_class):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["finetune", "--model", str(model_dirs[arch]), "--output-dir", str(tmp_path), "--steps", "2",
                     "--num-train", "8", "--num-dev", "4", "--num-test", "4", "--batch-size", "4", "--eval-every", "1",
                     *MODES[mode]])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not [w for w in caught if "active dropout" in str(w.message)]  # eval mode kept, adapters too
    if code == 2 and (arch, mode) in MAY_STOP:
        lines = [x for x in err.splitlines() if x.startswith("zoft: error:")]
        assert len(lines) == 1, err
        assert not list(tmp_path.iterdir())
    else:
        assert code == 0, err
        assert [p.name for p in tmp_path.iterdir() if (p / "summary.json").is_file()]


def test_a_model_left_in_train_mode_with_dropout_is_warned_about():
    model = _model("gpt2").train()  # GPT-2's configs default to dropout 0.1
    with pytest.warns(UserWarning, match="train mode with .* active dropout layers"):
        zoft.mezo(model)
