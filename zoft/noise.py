"""Where the random directions z come from. Both sources are pure functions of
(direction seed, block, chunk), so any piece of a direction can be regenerated in isolation.

- ``table`` (default): z is read from one fixed Gaussian table at seeded offsets, the trick of
  evolution-strategies systems. Reading a slice costs nothing next to generating Gaussians,
  which on a CPU costs about half a forward pass per pass over the weights. Over the random
  offsets E[z zᵀ] = I up to the table's sample autocorrelation (about 1/sqrt(size)).
- ``gaussian``: fresh N(0, 1) per chunk from a generator seeded by (seed, block, chunk), as
  MeZO regenerates its noise; exact i.i.d. Gaussian directions at the cost of generating them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoft.blocks import MAX_CHUNK, Block
from zoft.errors import ZoftError
from zoft.registry import build, full_spec, register
from zoft.rng import derive

TABLE_SEED = 20260523


@dataclass
class TableConfig:
    table_size: int = field(default=1 << 22, metadata={"help": "noise table: Gaussians in the table (16 MiB)"})
    table_seed: int = field(default=TABLE_SEED, metadata={"help": "noise table: seed of its Gaussians"})

    def __post_init__(self):
        if self.table_size < 2 * MAX_CHUNK:
            raise ZoftError(f"noise table size must be at least {2 * MAX_CHUNK}, got {self.table_size}")


@dataclass
class GaussianConfig:
    pass


@register("noise", "table", TableConfig)
class NoiseTable:
    name = "table"

    def __init__(self, cfg: TableConfig | None = None):
        self.cfg = cfg or TableConfig()
        self.size, self.seed = self.cfg.table_size, self.cfg.table_seed
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table(self, device) -> torch.Tensor:
        device = torch.device(device)
        table = self._tables.get(device)
        if table is None:
            gen = torch.Generator().manual_seed(self.seed)  # same table on every device
            table = torch.randn(self.size, generator=gen).to(device)
            self._tables[device] = table
        return table

    def _offset(self, seed: int, block: Block, k: int, n: int) -> int:
        return derive(seed, block.index, k) % (self.size - n + 1)

    def chunk(self, seed: int, block: Block, k: int, n: int, device) -> torch.Tensor:
        off = self._offset(seed, block, k, n)
        return self._table(device)[off : off + n]

    def rows(self, seed: int, block: Block, row_ids: torch.Tensor) -> torch.Tensor:
        """z restricted to the given rows of the block, shape (len(row_ids), row_len)."""
        rows_per_chunk = block.chunk_len // block.row_len
        offsets = torch.tensor(
            [self._offset(seed, block, k, n) for k, _, n in block.chunks()], device=row_ids.device
        )
        start = offsets[row_ids // rows_per_chunk] + (row_ids % rows_per_chunk) * block.row_len
        cols = torch.arange(block.row_len, device=row_ids.device)
        return self._table(row_ids.device)[start[:, None] + cols]


@register("noise", "gaussian", GaussianConfig)
class GaussianNoise:
    name = "gaussian"

    def __init__(self, cfg: GaussianConfig | None = None):
        self.cfg = cfg or GaussianConfig()

    def chunk(self, seed: int, block: Block, k: int, n: int, device) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(derive(seed, block.index, k))
        return torch.randn(n, generator=gen, device=device)

    def rows(self, seed: int, block: Block, row_ids: torch.Tensor) -> torch.Tensor:
        rows_per_chunk = block.chunk_len // block.row_len
        out = torch.empty(len(row_ids), block.row_len, device=row_ids.device)
        chunk_of = row_ids // rows_per_chunk
        for k, _, n in block.chunks():
            hit = chunk_of == k
            if hit.any():
                z = self.chunk(seed, block, k, n, row_ids.device).view(-1, block.row_len)
                out[hit] = z[row_ids[hit] % rows_per_chunk]
        return out


def make_noise(spec: str | dict):
    """A noise source from its name or spec ({"name": "table", "size": ..., "table_seed": ...})."""
    return build("noise", {"name": spec} if isinstance(spec, str) else spec)


def noise_spec(noise) -> dict:
    """Everything that determines z: recorded with every trajectory."""
    return full_spec("noise", {"name": noise.name, **vars(noise.cfg)})
