"""PEFT adapters through peft (LoRA, prefix tuning), built the same way by a run, its resume and
its replay."""

from __future__ import annotations

from dataclasses import fields

import torch

from zoft.errors import ZoftError


def with_adapters(model, cfg, seed: int):
    """LoRA or prefix tuning through peft (``cfg``: an AdapterConfig); LoRA's target modules default
    to peft's choice for the architecture. Seeded, so a resume or a replay rebuilds the same
    starting adapters."""
    if cfg.peft == "none":
        return model
    return _adapted(model, cfg, seed).eval()  # peft may leave the model in train mode: dropout would differ per probe


def with_recorded_adapters(model, recorded: dict):
    """The adapters that a tuner's meta-training config records (its peft flags and seed), rebuilt:
    a tuner made for LoRA blocks is read on the same blocks."""
    from zoft.config import AdapterConfig

    cfg = AdapterConfig(**{f.name: recorded[f.name] for f in fields(AdapterConfig) if f.name in recorded})
    return with_adapters(model, cfg, recorded.get("seed", 0))


def _adapted(model, cfg, seed: int):
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are drawn from the global generator
    if cfg.peft == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=cfg.prefix_tokens, task_type="CAUSAL_LM"))
        try:
            init_prefix_from_activations(model, seed)
        except Exception as e:  # peft's prefix path does not support every attention layout
            kind = type(model.get_base_model().config).model_type
            raise ZoftError(f"prefix tuning does not work on {kind} here ({type(e).__name__}: {str(e)[:120]});"
                            " use --peft lora") from None
        return model
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] or None

    def lora(target_modules):
        return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                target_modules=target_modules, task_type="CAUSAL_LM"))

    try:
        return lora(targets)
    except ValueError as e:
        if targets is not None:
            raise ZoftError(f"cannot add LoRA adapters: {str(e).splitlines()[0]}") from None
    return lora(_attention_projections(model))  # peft has no default for this architecture


def _attention_projections(model) -> list[str]:
    """LoRA targets where peft has no default for the architecture: its attention projections."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for choice in (["q_proj", "v_proj"], ["qkv_proj"], ["query_key_value"], ["c_attn"], ["Wqkv"]):
        if set(choice) <= linear:
            return choice
    raise ZoftError(f"no default LoRA targets for {type(model.config).model_type}; pass --lora-targets with some of:"
                    f" {', '.join(sorted(linear))}")


@torch.no_grad()
def init_prefix_from_activations(model, seed: int):
    """MeZO's prefix initialisation (its App. E.5 calls it crucial for stability): the keys and
    values the model itself computes for random vocabulary tokens, instead of peft's N(0, 1)
    draws, which no layer has ever seen. Written in peft's layout: row p of the prefix embedding
    is [layer, key|value, head, head_dim] flattened."""
    config, weight = model.active_peft_config, model.prompt_encoder[model.active_adapter].embedding.weight
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.get_base_model().config.vocab_size, (1, config.num_virtual_tokens), generator=gen)
    cache = model.get_base_model()(input_ids=tokens.to(weight.device), use_cache=True).past_key_values
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # [2, heads, P, dim]
    stacked = torch.stack(per_layer)  # [layers, 2, heads, P, dim]
    weight.copy_(stacked.permute(3, 0, 1, 2, 4).reshape(config.num_virtual_tokens, -1))
