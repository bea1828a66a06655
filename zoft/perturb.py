"""Applying directions to a model: out of place while the loss is evaluated, in place to update.

While a direction is active, a pre-hook on each module that owns trainable tensors swaps in a
perturbed copy (``p.data = θ + s·z``) and a post-hook swaps the original storage back. The
weights are never written during evaluation, so "restoring" them is exact in every dtype (MeZO's
+ε, −2ε, +ε round trip drifts, badly in fp16), and it costs the same memory traffic as an
in-place perturbation. Embedding lookups are perturbed after the gather, row by row, so a large
vocabulary never needs a second copy; ``perturbed_rows`` gives any code (a candidate-scoring
head, say) the rows of a weight as the active direction sees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from zoft.blocks import Block

_active: Perturber | None = None


def perturbed_rows(weight: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
    """``weight[row_ids]``, plus the active direction's perturbation of those rows if any."""
    rows = weight[row_ids]
    if _active is None:
        return rows
    if weight.dim() == 1:  # a bias: elements, not rows
        return _active.perturb_elements(weight, row_ids, rows)
    return _active.perturb_rows(weight, row_ids, rows)


def _moments(sums: torch.Tensor, n: int) -> torch.Tensor:
    """[Σx, Σx²] of n elements → [mean, unbiased var], combined in float64."""
    total, squares = sums.double()
    mean = total / n
    return torch.stack([mean, ((squares - n * mean**2) / max(n - 1, 1)).clamp(min=0)]).float()


def _gathers_rows(module: nn.Module) -> bool:
    # Only a plain lookup can be perturbed after the gather (max_norm would rewrite the weight).
    return type(module).forward is nn.Embedding.forward and module.max_norm is None


class Perturber:
    def __init__(self, model: nn.Module, blocks: Sequence[Block], noise):
        self.blocks, self.noise = list(blocks), noise
        self._block_of = {id(b.param): b for b in self.blocks}
        self._seed: int | None = None
        # the perturbation's reshaping of every chunk of a direction (a mask, say); None: z as drawn
        self.shaper = None
        self._scales: Sequence[float] = ()
        self._swapped: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        # Perturbed copies reuse buffers: fresh pages cost the kernel a zero-fill each forward.
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self.touched: set[int] = set()  # blocks the last active direction reached
        self._handles = []
        self._own: dict[int, list[tuple[nn.Parameter, Block]]] = {}  # module -> its blocks
        self.install(model)

    def install(self, model: nn.Module):
        """Register the hooks (done at construction; again after ``remove``)."""
        self.remove()
        for module in model.modules():
            own = [(p, self._block_of[id(p)]) for p in module.parameters(recurse=False) if id(p) in self._block_of]
            if not own:
                continue
            self._own[id(module)] = own
            if _gathers_rows(module):
                self._handles.append(
                    module.register_forward_hook(self._perturb_lookup, with_kwargs=True)
                )
            else:
                self._handles.append(module.register_forward_pre_hook(self._swap_in))
                self._handles.append(module.register_forward_hook(self._swap_out, always_call=True))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def active(self, seed: int, scales: Sequence[float]):
        """Evaluate the model at θ + scales[b]·z_b(seed) for every block b; θ is untouched."""
        global _active
        if _active is not None:
            raise RuntimeError("a perturbation is already active")
        self._seed, self._scales, self.touched = seed, scales, set()
        _active = self
        try:
            yield self
        finally:
            _active, self._seed = None, None
            for swapped in self._swapped.values():  # a forward that raised skips no restore
                for p, original in swapped:
                    self._release(p, original)
            self._swapped.clear()

    def z(self, seed: int, block: Block, k: int, n: int, weights: torch.Tensor) -> torch.Tensor:
        """Chunk k of block b's direction: where every direction is made, for the losses, the
        update, clipping norms and meta-training alike. ``weights`` is that chunk of θ_b (a
        shaper may read it)."""
        z = self.noise.chunk(seed, block, k, n, weights.device)
        return z if self.shaper is None else self.shaper(block, z, weights)

    def direction_chunks(self, seed: int, block: Block):
        flat = block.param.detach().view(-1)
        for k, start, n in block.chunks():
            yield start, n, self.z(seed, block, k, n, flat[start : start + n])

    def losses_at(self, seed: int, points, sigma, closure) -> list[torch.Tensor]:
        """L(θ + m_b σ_b z_b(seed)) at each probe point m (one list per point); θ untouched. The
        one probe routine, for the optimizer and meta-training alike."""
        losses = []
        for point in points:
            # inference mode: no autograd bookkeeping at all in the forward passes
            with self.active(seed, [m * s for m, s in zip(point, sigma)]), torch.inference_mode():
                losses.append(torch.as_tensor(closure()).reshape(()))
        return losses

    @torch.no_grad()
    def add_(self, seed: int, scales: Sequence[float], targets: Sequence[torch.Tensor] | None = None,
             with_stats: bool = False) -> torch.Tensor | None:
        """θ_b += scales[b]·z_b(seed) in place (or into ``targets[b]``, tensors shaped like
        the blocks): the update, one pass over each block. With ``with_stats``, also returns each
        block's [mean, unbiased var] after the update, [n, 2], from the chunks while they are
        still in cache: no extra pass over the weights."""
        stats = []
        for b in self.blocks:
            s = scales[b.index]
            flat = (b.param.data if targets is None else targets[b.index]).view(-1)
            parts = []
            for start, n, z in self.direction_chunks(seed, b) if s != 0.0 or with_stats else ():
                chunk = flat[start : start + n]
                if s != 0.0:
                    chunk.add_(z, alpha=s)
                if with_stats:  # sum and sum of squares: fast reductions (var_mean is a slow Welford pass);
                    # small blocks (norms: mean ~1, var ~0) in float64 against cancellation
                    c = chunk.double() if n <= 1 << 16 else chunk.float()
                    parts.append(torch.stack([c.sum(), torch.dot(c, c)]).double())
            if with_stats:
                stats.append(_moments(torch.stack(parts).sum(0), b.numel))
        return torch.stack(stats) if with_stats else None

    @torch.no_grad()
    def combination_norms(self, seeds: Sequence[int], coefs: torch.Tensor) -> list[float]:
        """‖Σ_i coefs[i, b]·z_b(seeds[i])‖ for every block b, from the directions' Gram matrix
        accumulated chunk by chunk: one extra read of the directions, no gradient buffer."""
        norms = []
        for b in self.blocks:
            gram = torch.zeros(len(seeds), len(seeds), dtype=torch.float64)
            flat = b.param.detach().view(-1)
            for k, start, n in b.chunks():
                z = torch.stack([self.z(seed, b, k, n, flat[start : start + n]) for seed in seeds])
                gram += (z @ z.T).double().cpu()
            a = coefs[:, b.index].double()
            norms.append(float(a @ gram @ a) ** 0.5)
        return norms

    def _perturbed_copy(self, block: Block, original: torch.Tensor, s: float) -> torch.Tensor:
        free = self._free.get((original.shape, original.dtype, original.device))
        out = free.pop() if free else torch.empty_like(original)
        src, dst = original.view(-1), out.view(-1)
        if block.numel <= block.chunk_len:  # one chunk: most blocks, and the hot path
            torch.add(src, self.z(self._seed, block, 0, block.numel, src), alpha=s, out=dst)
            return out
        for k, start, n in block.chunks():
            part = src[start : start + n]
            torch.add(part, self.z(self._seed, block, k, n, part), alpha=s, out=dst[start : start + n])
        return out

    def _swap_in(self, module, args):
        if self._seed is None or id(module) in self._swapped:
            return
        swapped = []
        for p, block in self._own[id(module)]:
            if self._scales[block.index] == 0.0:
                continue
            original = p.data
            p.data = self._perturbed_copy(block, original, self._scales[block.index])
            swapped.append((p, original))
            self.touched.add(block.index)
        if swapped:
            self._swapped[id(module)] = swapped

    def _swap_out(self, module, args, output):
        for p, original in self._swapped.pop(id(module), ()):
            self._release(p, original)

    def _release(self, p, original):
        copy, p.data = p.data, original
        self._free.setdefault((copy.shape, copy.dtype, copy.device), []).append(copy)

    def _perturb_lookup(self, module, args, kwargs, output):
        if self._seed is None:
            return None
        ids = args[0] if args else kwargs["input"]
        rows = output.reshape(-1, output.shape[-1])  # a plain lookup's output is weight[ids]
        perturbed = self.perturb_rows(module.weight, ids.reshape(-1), rows)
        return None if perturbed is rows else perturbed.view(output.shape)

    def perturb_elements(self, tensor, ids, values):
        """values (= tensor[ids]) + s·z[ids], for a small 1-D tensor read by index (an output bias)."""
        block = self._block_of.get(id(tensor))
        if block is None or self._scales[block.index] == 0.0:
            return values
        self.touched.add(block.index)
        z = torch.cat([z for _, _, z in self.direction_chunks(self._seed, block)])
        return values + self._scales[block.index] * z[ids].to(tensor.dtype)

    def perturb_rows(self, weight, row_ids, rows):
        """rows (= weight[row_ids]) + s·z[row_ids]; ``rows`` itself if unperturbed."""
        block = self._block_of.get(id(weight))
        if block is None or self._scales[block.index] == 0.0:
            return rows
        self.touched.add(block.index)
        z = self.noise.rows(self._seed, block, row_ids)
        if self.shaper is not None:
            z = self.shaper(block, z, rows)
        return rows + self._scales[block.index] * z.to(weight.dtype)
