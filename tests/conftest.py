import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn



def bench_script(name: str):
    """A script of bench/ as a module: bench/ is not a package, and its scripts import their neighbours."""
    bench = Path(__file__).parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORDS = "terrible great it was the a movie film good bad not very is and of to".split()


def tiny_llama(seed: int = 0, dtype=torch.float32, vocab: int = 64, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_tokenizer():
    """A word-level tokenizer in which ' terrible' and ' great' are single tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


class Quadratic(nn.Module):
    """0.5 Σ c_i θ_i²: the curvatures make the landscape ill-conditioned on purpose."""

    def __init__(self, curvatures, start=1.0):
        super().__init__()
        self.register_buffer("c", torch.as_tensor(curvatures, dtype=torch.float32))
        self.theta = nn.Parameter(torch.full_like(self.c, start))

    def forward(self):
        return 0.5 * (self.c * self.theta**2).sum()
