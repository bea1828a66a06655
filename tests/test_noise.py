import pytest
import torch

from zoft.blocks import collect_blocks
from zoft.errors import ZoftError
from zoft.noise import GaussianNoise, NoiseTable, TableConfig, make_noise
from tests.conftest import tiny_llama


def _direction(noise, block, seed):
    return torch.cat([noise.chunk(seed, block, k, n, "cpu") for k, _, n in block.chunks()])


@pytest.mark.parametrize("noise", [NoiseTable(), GaussianNoise()], ids=["table", "gaussian"])
def test_same_seed_same_direction_and_rows_match_chunks(noise):
    blocks = collect_blocks(tiny_llama(), max_chunk=40)  # several chunks per block
    emb = blocks[0]
    z1, z2 = _direction(noise, emb, 7), _direction(noise, emb, 7)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, _direction(noise, emb, 8))
    rows = torch.tensor([5, 0, 63, 5, 17])
    assert torch.equal(noise.rows(7, emb, rows), z1.view(-1, emb.row_len)[rows])


def test_table_directions_look_gaussian():
    table = NoiseTable()
    blocks = collect_blocks(tiny_llama())
    z = torch.cat([_direction(table, b, s) for s in range(50) for b in blocks])
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.02


def test_noise_errors():
    with pytest.raises(ZoftError, match="unknown noise 'pink'"):
        make_noise("pink")
    with pytest.raises(ZoftError, match="at least"):
        TableConfig(table_size=1000)
