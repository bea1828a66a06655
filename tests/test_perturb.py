import copy

import pytest
import torch

from zoft.blocks import collect_blocks
from zoft.noise import GaussianNoise, NoiseTable
from zoft.perturb import Perturber
from tests.conftest import tiny_llama

NOISES = [NoiseTable(), GaussianNoise()]
IDS = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noise", NOISES, ids=["table", "gaussian"])
def test_weights_bit_identical_after_perturbed_forwards(dtype, noise):
    model = tiny_llama(dtype=dtype)
    blocks = collect_blocks(model)
    perturber = Perturber(model, blocks, noise)
    before = _snapshot(model)
    outputs = []
    with torch.no_grad():
        for sign in (+1, -1):
            with perturber.active(3, [sign * 0.05] * len(blocks)):
                outputs.append(model(IDS).logits)
        plain = model(IDS).logits
    assert not torch.equal(outputs[0], outputs[1])  # the perturbation did act
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(torch.equal(before[n].view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           p.detach().view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
               for n, p in model.named_parameters())
    assert torch.equal(plain, tiny_llama(dtype=dtype)(IDS).logits)


def test_restored_even_when_the_forward_raises():
    model = tiny_llama()
    blocks = collect_blocks(model)
    perturber = Perturber(model, blocks, NoiseTable())
    before = _snapshot(model)

    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = model.model.layers[1].mlp.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"), perturber.active(1, [0.1] * len(blocks)):
        model(IDS)
    handle.remove()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("noise", NOISES, ids=["table", "gaussian"])
@pytest.mark.parametrize("tied", [True, False])
def test_hooked_forward_equals_forward_of_perturbed_weights(noise, tied):
    """Out-of-place perturbation (per-module swap, embedding rows) = moving the weights."""
    model = tiny_llama(tied=tied)
    reference = copy.deepcopy(model)
    blocks, ref_blocks = collect_blocks(model, max_chunk=48), collect_blocks(reference, max_chunk=48)
    scales = [0.01 * (i + 1) for i in range(len(blocks))]
    perturber = Perturber(model, blocks, noise)
    Perturber(reference, ref_blocks, noise).add_(11, scales)
    with torch.no_grad(), perturber.active(11, scales):
        hooked = model(IDS).logits
    assert perturber.touched == set(range(len(blocks)))
    torch.testing.assert_close(hooked, reference(IDS).logits, rtol=1e-5, atol=1e-6)


def test_zero_scale_leaves_block_unperturbed():
    model = tiny_llama()
    blocks = collect_blocks(model)
    perturber = Perturber(model, blocks, NoiseTable())
    with torch.no_grad():
        plain = model(IDS).logits
        with perturber.active(5, [0.0] * len(blocks)):
            same = model(IDS).logits
    assert torch.equal(plain, same) and perturber.touched == set()


def test_blocks_dedupe_tied_weights_and_mark_no_decay():
    model = tiny_llama(tied=True)
    blocks = collect_blocks(model)
    names = [b.name for b in blocks]
    assert "lm_head.weight" not in names and names[0] == "model.embed_tokens.weight"
    no_decay = {b.name for b in blocks if b.no_decay}
    assert no_decay == {n for n in names if "norm" in n}
    with pytest.raises(ValueError, match="no trainable parameters"):
        collect_blocks(model.requires_grad_(False))
