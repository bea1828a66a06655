"""Scale-out on torch.distributed without sending a parameter: every rank rebuilds every
direction from its seed, so ranks only share loss scalars.

- **Data parallel** (``--parallel data``): each rank evaluates the step's directions on its
  shard of the global batch (split further into ``--accumulate`` micro-batches); one all-reduce
  per probe carries the micro-batches' loss sums and counts in float64, each slot written by
  exactly one rank (the others add 0, which is exact), and every rank sums the slots in the same
  order. The loss, and so the trajectory, equals a single process that splits the same global
  batch into the same micro-batches (``--accumulate world × accumulate``), bit for bit.
- **Direction parallel** (``--parallel directions``): ranks take different directions of the
  same step on the whole batch, and the 2n losses are gathered the same way.

Under ``torchrun`` (gloo on CPU, NCCL on CUDA) rank 0 alone writes the run folder and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from zoft.errors import ZoftError

PARALLEL = ("data", "directions")


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """In place: the sum over ranks (a no-op on one process)."""
        if self.world > 1:
            import torch.distributed as dist

            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            moved = values.to(backend_device)
            dist.all_reduce(moved)
            values.copy_(moved)
        return values

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (a run name: default names hold a random part)."""
        if self.world == 1:
            return text
        import torch.distributed as dist

        data = torch.zeros(1024, dtype=torch.uint8)
        raw = text.encode()[:1024]
        data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        moved = data.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(moved, 0)
        return bytes(moved.cpu()[moved.cpu() != 0].tolist()).decode()

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def from_env(device: str) -> Group:
    """The process group torchrun set up (WORLD_SIZE, RANK, MASTER_ADDR in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Group()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Group(dist.get_rank(), dist.get_world_size())


class ShardedLoss:
    """The mean objective of one global batch, from this rank's micro-batches and the others'.
    ``prepare`` turns a micro-batch's items into what ``terms`` scores (collated tensors, or the
    items themselves for a metric of generated answers) once per step; ``terms`` gives its
    (sum, count) at the current weights."""

    def __init__(self, prepare, terms, accumulate: int, group: Group):
        self.prepare, self.terms, self.accumulate, self.group = prepare, terms, accumulate, group

    def closure(self, items: list):
        parts = self.group.world * self.accumulate
        if len(items) % parts:
            raise ZoftError(f"batch size {len(items)} must be a multiple of world size × accumulate = {parts}")
        size = len(items) // parts
        mine = range(self.group.rank * self.accumulate, (self.group.rank + 1) * self.accumulate)
        batches = {j: self.prepare(items[j * size : (j + 1) * size]) for j in mine}

        def loss() -> torch.Tensor:
            terms = torch.zeros(2, parts, dtype=torch.float64)
            for j, batch in batches.items():
                total, count = self.terms(batch)
                terms[0, j], terms[1, j] = float(total), float(count)
            self.group.sum_(terms)
            return terms[0].sum() / terms[1].sum()

        return loss
