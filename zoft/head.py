"""A head start for classification: the label words' output rows fitted on frozen features.

ZO fine-tuning spends its first 100-150 steps on little more than the label prior
(bench/results/ceiling/calibration.md). A linear probe gets there, and past it, in one pass over
the training set (LP-FT, Kumar et al. 2022): the answer states of the training examples are
forward passes of the untouched model, and the K label words' rows of the output embedding are
then fitted to them as a K-class logistic regression pulled towards the pretrained rows by
``l2 · ‖rows − rows₀‖²``, solved exactly (L-BFGS, float64: a K × hidden problem). The pull's
strength is chosen by k-fold cross-validation on the training set alone. Nothing else moves; with
tied embeddings the label tokens' input embeddings move with their output rows.

A run records the fitted rows (``HeadStart``): resume, best-dev selection and ``zoft replay``
start from them, not from the base model's rows.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoft.data import collate
from zoft.distributed import Group
from zoft.errors import ZoftError
from zoft.scoring import answer_states, softcapped

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FOLDS = 5


@dataclass
class HeadStart:
    """The rows a run starts from: ``weight[ids] = rows`` in the output embedding."""

    ids: torch.Tensor  # [K] the label words' token ids
    rows: torch.Tensor  # [K, hidden] in the weight's dtype

    @torch.no_grad()
    def apply(self, model):
        weight = model.get_output_embeddings().weight
        weight[self.ids.to(weight.device)] = self.rows.to(weight.device, weight.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"head/ids": self.ids.cpu(), "head/rows": self.rows.cpu().contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> HeadStart | None:
        if "head/rows" not in tensors:
            return None
        return cls(tensors["head/ids"], tensors["head/rows"])


@torch.no_grad()  # not inference mode: the fit differentiates through these states
def answer_features(model, items, pad_id: int, batch_size: int, device, group=Group()) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer states [N, hidden] in float64, labels [N]) of the model as it stands, in batches of
    similar length (little padding); under torchrun each rank computes every world-th batch and
    the sum over ranks fills in the rest (each row written by one rank, the others add 0: exact)."""
    states = torch.zeros(len(items), model.config.hidden_size, dtype=torch.float64)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for rows in batches[group.rank :: group.world]:
        states[rows] = answer_states(model, collate([items[i] for i in rows], pad_id, device)).double().cpu()
    return group.sum_(states), torch.tensor([it.label for it in items])


def _logits(model, states, rows, bias):
    logits = states @ rows.T
    return softcapped(model, logits if bias is None else logits + bias)


def _fit(model, states, labels, rows0, bias, l2: float) -> torch.Tensor:
    delta = torch.zeros_like(rows0, requires_grad=True)
    solver = torch.optim.LBFGS([delta], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                               line_search_fn="strong_wolfe")

    def loss():
        solver.zero_grad()
        value = F.cross_entropy(_logits(model, states, rows0 + delta, bias), labels) + l2 * delta.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        solver.step(loss)
    return (rows0 + delta).detach()


def choose_l2(model, states, labels, rows0, bias, seed: int) -> tuple[float, dict[float, float]]:
    """The grid's l2 with the lowest held-out cross-entropy over FOLDS folds of the training set,
    and every l2's held-out loss."""
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    folds = [torch.tensor(order[k::FOLDS]) for k in range(FOLDS)]
    held_out = {}
    for l2 in L2_GRID:
        total = 0.0
        for fold in folds:
            keep = torch.ones(len(labels), dtype=torch.bool)
            keep[fold] = False
            rows = _fit(model, states[keep], labels[keep], rows0, bias, l2)
            total += F.cross_entropy(_logits(model, states[fold], rows, bias), labels[fold], reduction="sum").item()
        held_out[l2] = total / len(labels)
    return min(held_out, key=held_out.get), held_out


def fit_probe(model, items, candidate_ids, pad_id: int, batch_size: int, device, group=Group(), seed: int = 0):
    """(HeadStart, metrics) for the model as it stands: its answer states on ``items`` and the label
    rows fitted to them; every rank returns rank 0's rows."""
    if candidate_ids is None:
        raise ZoftError("--head-init probe needs a classification task whose label words are single tokens")
    if len(items) < 2 * FOLDS:
        raise ZoftError(f"--head-init probe needs at least {2 * FOLDS} training examples, got {len(items)}")
    head = model.get_output_embeddings()
    states, labels = answer_features(model, items, pad_id, batch_size, device, group)
    rows0 = head.weight[candidate_ids].detach().double().cpu()
    bias = None if getattr(head, "bias", None) is None else head.bias[candidate_ids].detach().double().cpu()
    l2, held_out = choose_l2(model, states, labels, rows0, bias, seed)
    rows = _fit(model, states, labels, rows0, bias, l2)
    if not torch.isfinite(rows).all():
        raise ZoftError("the head probe's fit is not finite")
    if not group.main:
        rows.zero_()
    group.sum_(rows)  # rank 0's rows on every rank, whatever each rank's arithmetic did
    train_acc = (_logits(model, states, rows, bias).argmax(-1) == labels).double().mean().item()
    metrics = {"head/l2": l2, "head/held_out_loss": held_out[l2], "head/train_acc": train_acc,
               "head/row_change": (rows - rows0).norm().item() / rows0.norm().item()}
    return HeadStart(candidate_ids.cpu(), rows.to(head.weight.dtype)), metrics


def forward_passes(num_items: int, batch_size: int) -> int:
    """The features' cost in the unit a run counts: forward passes of a training batch."""
    return math.ceil(num_items / batch_size)
