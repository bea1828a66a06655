"""Candidate scoring, computing only what the loss needs.

For single-token label words the loss is cross-entropy over the label words' log-probabilities
at the answer position; the log-normaliser over the vocabulary is shared by all candidates and
cancels, so only the hidden state at that position times the label words' rows of the output
embedding is computed: K rows instead of the whole vocabulary at every position.

Otherwise each (prompt, option) sequence is scored by the mean log-probability of the option's
tokens (MeZO §6.1), with the output layer applied at option positions only. Multiple-choice
tasks train on the gold option's token loss (§6.2), which needs the gold sequences alone.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter

import torch
import torch.nn.functional as F

from zoft.data import collate
from zoft.errors import ZoftError
from zoft.perturb import perturbed_rows


def hidden_states(model, input_ids) -> torch.Tensor:
    """The decoder's last hidden states. A peft prefix enters as peft feeds it: its virtual
    tokens' keys and values as a past, attended by every position."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    past = model.get_prompt(batch_size=input_ids.shape[0])
    mask = torch.ones(input_ids.shape[0], config.num_virtual_tokens + input_ids.shape[1], device=input_ids.device)
    return model.get_decoder()(input_ids=input_ids, past_key_values=past, attention_mask=mask).last_hidden_state


def answer_states(model, batch) -> torch.Tensor:
    """Final hidden state at each prompt's last token, shape (batch, hidden)."""
    hidden = hidden_states(model, batch["input_ids"])
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["lengths"] - 1]


def softcapped(model, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logit soft-capping (Gemma 2: cap · tanh(logits / cap)), as its own head applies it."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def candidate_logits(model, batch, candidate_ids: torch.Tensor) -> torch.Tensor:
    head = model.get_output_embeddings()
    h = answer_states(model, batch)
    logits = h @ perturbed_rows(head.weight, candidate_ids).T
    if getattr(head, "bias", None) is not None:  # perturbed too: the loss reads it (Phi)
        logits = logits + perturbed_rows(head.bias, candidate_ids)
    return softcapped(model, logits)


def option_log_likelihoods(model, batch) -> torch.Tensor:
    """Per (prompt, option) sequence: its option tokens' log-probabilities, summed; and their count."""
    ids = batch["input_ids"]
    hidden = hidden_states(model, ids)
    target = torch.arange(1, ids.shape[1], device=ids.device)[None]  # position of the predicted token
    scored = (target >= batch["option_start"][:, None]) & (target < batch["lengths"][:, None])
    rows, cols = scored.nonzero(as_tuple=True)
    logits = softcapped(model, model.get_output_embeddings()(hidden[rows, cols]).float())
    token_logp = logits.log_softmax(-1).gather(1, ids[rows, cols + 1][:, None]).squeeze(1)
    sums = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, rows, token_logp)
    return sums, scored.sum(1)


def option_logits(model, batch) -> torch.Tensor:
    """[examples, most options]: mean option log-likelihoods, −inf where an example has fewer."""
    sums, counts = option_log_likelihoods(model, batch)
    out = torch.full((len(batch["labels"]), int(batch["slot"].max()) + 1), float("-inf"), device=sums.device)
    out[batch["owner"], batch["slot"]] = sums / counts
    return out


def gold_option_loss(model, batch) -> torch.Tensor:
    """Teacher-forced LM loss of the gold options (prompt tokens masked), per token."""
    gold = batch["slot"] == batch["labels"][batch["owner"]]
    sub = {k: batch[k][gold] for k in ("input_ids", "lengths", "option_start")}
    longest = int(sub["lengths"].max())
    sums, counts = option_log_likelihoods(model, {**sub, "input_ids": sub["input_ids"][:, :longest]})
    return -sums.sum() / counts.sum()


def task_logits(model, batch, candidate_ids) -> torch.Tensor:
    if candidate_ids is None:
        return option_logits(model, batch)
    return candidate_logits(model, batch, candidate_ids).float()


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


def classification_loss(model, batch, candidate_ids, objective: str = "loss", train_loss: str = "choice"):
    """The training objective. ``objective`` "loss": the task's ``train_loss``, "choice" (the
    cross-entropy over the candidates) or "lm" (the gold option's token loss); "choice": that
    cross-entropy whatever the task trains on; a metric's name: −metric."""
    if objective == "loss" and train_loss == "lm":
        return gold_option_loss(model, batch)
    logits = task_logits(model, batch, candidate_ids)
    if objective in ("loss", "choice"):
        return F.cross_entropy(logits, batch["labels"])
    return torch.tensor(-METRICS[objective](logits.argmax(-1), batch["labels"]))


def loss_terms(model, batch, candidate_ids, objective: str = "loss", train_loss: str = "choice"):
    """(sum, count) of the objective over a micro-batch, so that micro-batches and ranks add up to
    the global batch's mean exactly: per example for cross-entropy and accuracy, per token for the
    LM loss. Macro F1 is not a sum over examples and is refused."""
    if objective == "loss" and train_loss == "lm":
        gold = batch["slot"] == batch["labels"][batch["owner"]]
        sub = {k: batch[k][gold] for k in ("input_ids", "lengths", "option_start")}
        sums, counts = option_log_likelihoods(model, {**sub, "input_ids": sub["input_ids"][:, : int(sub["lengths"].max())]})
        return -sums.sum(), counts.sum()
    logits = task_logits(model, batch, candidate_ids)
    if objective in ("loss", "choice"):
        return F.cross_entropy(logits, batch["labels"], reduction="sum"), len(batch["labels"])
    if objective == "accuracy":
        return -(logits.argmax(-1) == batch["labels"]).sum().float(), len(batch["labels"])
    raise ZoftError(f"objective {objective} is not a mean over examples: it cannot be split into micro-batches or ranks")


def _progress(iterable, desc: str):
    """A progress bar on stderr, shown only when stderr is a terminal (tqdm's ``disable=None``),
    so logs and captured output stay clean."""
    import sys

    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)


@torch.inference_mode()
def evaluate(model, items, candidate_ids, pad_id: int, batch_size: int = 32, device="cpu") -> dict:
    """Accuracy and mean cross-entropy over the candidates. Batches are sorted by length so
    padding stays small, and hold at most ``batch_size`` sequences (an example with K options is
    K sequences)."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    groups, size = [[]], 0
    for i in order:
        n = len(items[i].options) if items[i].options is not None else 1
        if groups[-1] and size + n > batch_size:
            groups.append([])
            size = 0
        groups[-1].append(items[i])
        size += n
    correct, loss_sum = 0, 0.0
    for group in _progress(groups, "eval"):
        batch = collate(group, pad_id, device)
        logits = task_logits(model, batch, candidate_ids)
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    return {"acc": correct / max(1, len(items)), "loss": loss_sum / max(1, len(items))}


_PUNCTUATION = frozenset(string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalise_answer(prediction).split(), normalise_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_scores(prediction: str, golds) -> tuple[float, float]:
    """(token F1, exact match) against the best-matching gold answer."""
    return (max(token_f1(prediction, g) for g in golds),
            max(float(normalise_answer(prediction) == normalise_answer(g)) for g in golds))


@functools.lru_cache(maxsize=4)
def _stop_ids(tokenizer) -> list[int]:
    """Tokens holding a newline, and end-of-text: decoding stops at any of them. Decoding the
    whole vocabulary once per tokenizer, not at every evaluation."""
    ids = [i for i, text in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))])) if "\n" in text]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@torch.inference_mode()
def generate_answers(model, items, tokenizer, batch_size: int = 8, max_new_tokens: int = 50) -> list[str]:
    """Greedy decoding from left-padded prompts, each answer cut at its first newline (MeZO)."""
    answers = []
    for start in _progress(range(0, len(items), batch_size), "generate"):
        answers += _greedy_answers(model, items[start : start + batch_size], tokenizer, max_new_tokens)
    return answers


def _greedy_answers(model, items, tokenizer, max_new_tokens: int) -> list[str]:
    """One batch, without a progress bar: the F1 objective decodes at every probe."""
    device = next(model.parameters()).device
    prompts = [it.input_ids for it in items]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=_stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return [t.split("\n", 1)[0].strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


@torch.inference_mode()
def answer_f1_terms(model, items, tokenizer, max_new_tokens: int = 50) -> tuple[torch.Tensor, int]:
    """(−Σ token F1, count) of the greedy answers to a micro-batch, each against its best gold
    answer: MeZO's non-differentiable objective (§6.4). ZO needs only its value; a mean over
    examples, so micro-batches and ranks add up to the global batch's."""
    answers = _greedy_answers(model, items, tokenizer, max_new_tokens)
    f1 = sum(answer_scores(a, it.answers)[0] for a, it in zip(answers, items))
    return torch.tensor(-f1, dtype=torch.float64), len(items)


def evaluate_generation(model, items, tokenizer, batch_size: int = 8, max_new_tokens: int = 50) -> dict:
    """Mean token F1 (also under "acc": the task's metric, which selection and summaries read),
    exact match, and the gold answers' token loss."""
    predictions = generate_answers(model, items, tokenizer, batch_size, max_new_tokens)
    scores = [answer_scores(p, it.answers) for p, it in zip(predictions, items)]
    device = next(model.parameters()).device
    with torch.inference_mode():
        losses = [gold_option_loss(model, collate(items[i : i + batch_size], tokenizer.pad_token_id, device)).item()
                  * len(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    n = max(1, len(items))
    f1 = sum(f for f, _ in scores) / n
    return {"acc": f1, "f1": f1, "em": sum(e for _, e in scores) / n, "loss": sum(losses) / n}


def evaluate_task(model, task, items, candidate_ids, tokenizer, batch_size: int = 32, device="cpu") -> dict:
    """The task's metric under "acc" (accuracy; token F1 for generation tasks) and a loss."""
    if task.generates:
        return evaluate_generation(model, items, tokenizer, max(1, batch_size // 4))
    return evaluate(model, items, candidate_ids, tokenizer.pad_token_id, batch_size, device)
