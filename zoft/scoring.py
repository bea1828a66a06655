"""Classification by candidate scoring, computing only what the loss needs.

For single-token label words the loss is cross-entropy over the label words' log-probabilities
at the answer position; the log-normaliser over the vocabulary is shared by all candidates and
cancels, so only the hidden state at that position times the label words' rows of the output
embedding is computed: K rows instead of the whole vocabulary at every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoft.data import collate
from zoft.perturb import perturbed_rows


def answer_states(model, batch) -> torch.Tensor:
    """Final hidden state at each prompt's last token, shape (batch, hidden)."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["lengths"] - 1]


def candidate_logits(model, batch, candidate_ids: torch.Tensor) -> torch.Tensor:
    head = model.get_output_embeddings()
    h = answer_states(model, batch)
    logits = h @ perturbed_rows(head.weight, candidate_ids).T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[candidate_ids]
    return logits


def classification_loss(model, batch, candidate_ids) -> torch.Tensor:
    return F.cross_entropy(candidate_logits(model, batch, candidate_ids).float(), batch["labels"])


@torch.inference_mode()
def evaluate(model, items, candidate_ids, pad_id: int, batch_size: int = 32, device="cpu") -> dict:
    """Accuracy and mean loss; batches are sorted by length so padding stays small."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        batch = collate([items[i] for i in order[start : start + batch_size]], pad_id, device)
        logits = candidate_logits(model, batch, candidate_ids).float()
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    return {"acc": correct / max(1, len(items)), "loss": loss_sum / max(1, len(items))}
