"""Tokenise once, then batch: right-padded token ids plus each prompt's length."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from zoft.errors import ZoftError


@dataclass
class Encoded:
    input_ids: list[int]
    label: int


def encode(task, examples, tokenizer, max_length: int) -> list[Encoded]:
    """Prompts as token ids; an over-long prompt keeps its end, where the answer cue is."""
    texts = [task.render(ex) for ex in examples]
    ids = tokenizer(texts)["input_ids"]
    return [Encoded(i[-max_length:], ex.label) for i, ex in zip(ids, examples)]


def candidate_token_ids(task, tokenizer) -> torch.Tensor:
    ids = []
    for word in task.label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ZoftError(
                f"label word {word!r} of task {task.name} is {len(tokens)} tokens for this"
                " tokenizer; candidate scoring needs single-token label words"
            )
        ids.append(tokens[0])
    return torch.tensor(ids)


def collate(items: list[Encoded], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """Right padding: a causal model's state at a prompt's last token never sees the pads."""
    lengths = torch.tensor([len(it.input_ids) for it in items])
    input_ids = torch.full((len(items), int(lengths.max())), pad_id, dtype=torch.long)
    for row, it in enumerate(items):
        input_ids[row, : len(it.input_ids)] = torch.tensor(it.input_ids)
    labels = torch.tensor([it.label for it in items])
    return {"input_ids": input_ids.to(device), "lengths": lengths.to(device), "labels": labels.to(device)}


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

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            take = self._order[self.position : self.position + self.batch_size - len(picked)]
            picked += take
            self.position += len(take)
        return collate([self.items[i] for i in picked], self.pad_id, self.device)

    def __iter__(self):
        return self
