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


def accuracy(predictions: torch.Tensor, golds: torch.Tensor) -> float:
    return (predictions == golds).float().mean().item()


def macro_f1(predictions: torch.Tensor, golds: torch.Tensor) -> float:
    """Mean over the classes present in golds or predictions of 2·TP / (2·TP + FP + FN)."""
    scores = []
    for c in torch.unique(torch.cat([predictions, golds])).tolist():
        tp = ((predictions == c) & (golds == c)).sum().item()
        fp = ((predictions == c) & (golds != c)).sum().item()
        fn = ((predictions != c) & (golds == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


# A metric objective is any callable (predictions, golds) -> float, higher is better; ZO needs
# only the scalar, so the optimiser minimises its negative, gradient or not.
METRICS = {"accuracy": accuracy, "f1": macro_f1}


def classification_loss(model, batch, candidate_ids, objective: str = "loss") -> torch.Tensor:
    logits = candidate_logits(model, batch, candidate_ids).float()
    if objective == "loss":
        return F.cross_entropy(logits, batch["labels"])
    return torch.tensor(-METRICS[objective](logits.argmax(-1), batch["labels"]))


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
