"""The CUDA path (skipped without a GPU): exact restore, a ZO step, and a bf16 fine-tune."""

import pytest
import torch

import zoft
from zoft.blocks import collect_blocks
from zoft.noise import NoiseTable
from zoft.perturb import Perturber
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
IDS = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_bit_identical_after_perturbed_forwards_on_cuda(dtype):
    model = tiny_llama(dtype=dtype).cuda()
    blocks = collect_blocks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturber = Perturber(model, blocks, NoiseTable())
    with torch.no_grad(), perturber.active(3, [0.05] * len(blocks)):
        model(IDS.cuda())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_zo_step_on_cuda_matches_its_replay():
    model = tiny_llama().cuda()
    ids = IDS.cuda()
    start = [p.detach().clone() for p in model.parameters()]
    opt = zoft.mezo(model, lr=1e-3, eps=1e-2, record=True)
    for _ in range(3):
        opt.step(lambda: model(ids, labels=ids).loss)
    tuned = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(start, tuned))
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    opt.replay(opt.history)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), tuned))


def test_finetune_on_cuda_in_bf16(tmp_path, tiny_model_dir):
    from zoft.cli import main

    assert main(["finetune", "--model", str(tiny_model_dir), "--device", "cuda", "--dtype", "bf16", "--steps", "3",
                 "--num-train", "16", "--num-dev", "4", "--num-test", "4", "--batch-size", "4",
                 "--output-dir", str(tmp_path)]) == 0
