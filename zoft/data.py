"""Tokenise once, then batch: right-padded token ids plus each prompt's length.

Two batch layouts. Single-token label words shared by every example (the common case) need only
the prompt: one hidden state scores all candidates. Otherwise (multiple choice, multi-token label
words) every (prompt, option) pair is one sequence, and the batch says where each option starts,
which example owns it and which of that example's options it is."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from zoft.errors import ZoftError


@dataclass
class Encoded:
    input_ids: list[int]
    label: int
    options: tuple[tuple[int, ...], ...] | None = None  # each option's tokens (sequence scoring)
    answers: tuple[str, ...] = ()  # a generation task's gold answers


def encode(task, examples, tokenizer, max_length: int) -> list[Encoded]:
    """Prompts as token ids; an over-long prompt keeps its end, where the answer cue is. When the
    task needs sequence scoring, each example also carries its options' tokens, and the prompt is
    cut so that the prompt and its longest option fit in ``max_length``."""
    ids = tokenizer([task.render(ex) for ex in examples])["input_ids"]
    if candidate_token_ids(task, tokenizer) is not None:
        return [Encoded(i[-max_length:], ex.label) for i, ex in zip(ids, examples)]
    encoded = []
    for prompt, ex in zip(ids, examples):
        options = tuple(tuple(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in task.options(ex))
        if not options or not all(options):
            raise ZoftError(f"{task.name}: an example has no options or an empty one")
        room = max_length - max(len(o) for o in options)
        if room < 1:
            raise ZoftError(f"{task.name}: an option is longer than max_length {max_length}")
        encoded.append(Encoded(prompt[-room:], ex.label, options, ex.options if task.generates else ()))
    return encoded


def candidate_token_ids(task, tokenizer, device="cpu") -> torch.Tensor | None:
    """The label words' token ids when each is one token and every example shares them; None
    when the task needs sequence scoring (multiple choice, multi-token label words)."""
    if task.train_loss != "choice":
        return None
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in task.label_words]
    if any(len(t) != 1 for t in ids):
        return None
    return torch.tensor([t[0] for t in ids], device=device)


def collate(items: list[Encoded], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """Right padding: a causal model's state at a prompt's last token never sees the pads."""
    if items[0].options is not None:
        return _collate_options(items, pad_id, device)
    lengths = torch.tensor([len(it.input_ids) for it in items])
    input_ids = torch.full((len(items), int(lengths.max())), pad_id, dtype=torch.long)
    for row, it in enumerate(items):
        input_ids[row, : len(it.input_ids)] = torch.tensor(it.input_ids)
    labels = torch.tensor([it.label for it in items])
    return {"input_ids": input_ids.to(device), "lengths": lengths.to(device), "labels": labels.to(device)}


def _collate_options(items: list[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    pairs = [(row, k, it.input_ids + list(opt), len(it.input_ids))
             for row, it in enumerate(items) for k, opt in enumerate(it.options)]
    batch = collate([Encoded(seq, 0) for _, _, seq, _ in pairs], pad_id, device)
    columns = {"owner": [p[0] for p in pairs], "slot": [p[1] for p in pairs], "option_start": [p[3] for p in pairs]}
    return {"input_ids": batch["input_ids"], "lengths": batch["lengths"],
            "labels": torch.tensor([it.label for it in items], device=device),
            **{k: torch.tensor(v, device=device) for k, v in columns.items()}}


class Batches:
    """Endless seeded shuffles of the training set; its state is (epoch, position).

    With ``group_by_length`` (as in HF Trainer) each shuffle is sorted by length within windows
    of ``group_by_length`` batches and the batches are shuffled again: batches stay random
    samples but hold prompts of similar length, so little compute goes to padding.
    """

    def __init__(self, items: list[Encoded], batch_size: int, seed: int, pad_id: int, device="cpu",
                 group_by_length: int = 16):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.pad_id, self.device, self.group_by_length = pad_id, device, group_by_length
        self.epoch, self.position = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.items)))
        rng.shuffle(order)
        if self.group_by_length > 1:
            window = self.batch_size * self.group_by_length
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s : s + window], key=lambda i: len(self.items[i].input_ids))]
            batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
            rng.shuffle(batches)
            order = [i for b in batches for i in b]
        return order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict):
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate(self.next_items(), self.pad_id, self.device)

    def next_items(self) -> list[Encoded]:
        """The next batch's examples, not yet collated (to split it into micro-batches)."""
        picked = []
        while len(picked) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            take = self._order[self.position : self.position + self.batch_size - len(picked)]
            picked += take
            self.position += len(take)
        return [self.items[i] for i in picked]

    def __iter__(self):
        return self
