"""Blocks: the trainable tensors of a model in a fixed order, each perturbed as one unit.

A block is one trainable tensor of ``model.named_parameters()`` (tied weights appear once).
Its direction is read chunk by chunk; chunks hold whole rows so that the rows of an embedding
can be perturbed without materialising the whole direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: Upper bound on the elements of one chunk of a direction (4 MiB of fp32).
MAX_CHUNK = 1 << 20


@dataclass(eq=False)
class Block:
    index: int
    name: str
    param: nn.Parameter
    no_decay: bool
    row_len: int  # elements per row (last dimension; the whole tensor for 1-D)
    chunk_len: int  # elements per chunk, a multiple of row_len when row_len <= MAX_CHUNK
    is_embedding: bool = False  # a lookup table: a step reads only the rows its batch holds

    @property
    def numel(self) -> int:
        return self.param.numel()

    def chunks(self):
        """(chunk index, start, length) over the flattened tensor."""
        n = self.numel
        for k, start in enumerate(range(0, n, self.chunk_len)):
            yield k, start, min(self.chunk_len, n - start)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    # HF defines its own norm classes per architecture (LlamaRMSNorm, Qwen2RMSNorm, ...).
    return type(module).__name__.endswith(("Norm", "NormLayer"))


def collect_blocks(model: nn.Module, max_chunk: int = MAX_CHUNK) -> list[Block]:
    """Trainable tensors in ``named_parameters`` order; biases and norm weights are not decayed."""
    no_decay: set[int] = set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if _is_norm(module) or pname == "bias" or pname.endswith("_bias"):
                no_decay.add(id(p))
    blocks = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not p.is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous; zoft perturbs flat views")
        row_len = p.shape[-1] if p.dim() >= 2 else p.numel()
        chunk_len = row_len * max(1, max_chunk // row_len) if row_len <= max_chunk else max_chunk
        blocks.append(Block(len(blocks), name, p, id(p) in no_decay, row_len, chunk_len, id(p) in embeddings))
    if not blocks:
        raise ValueError("the model has no trainable parameters")
    return blocks
