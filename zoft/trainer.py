"""transformers.Trainer with forward-only steps: change ``Trainer(`` to ``ZOTrainer(``.

    trainer = ZOTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                        zo={"estimator": {"name": "spsa", "eps": 1e-3}})
    trainer.train()

Each training step is one ZO step on the Trainer's own ``compute_loss`` (no backward, no
gradient buffers); the Trainer keeps logging, evaluation, checkpointing and its LR schedule:
its optimizer is a stand-in whose ``step`` does nothing, so its scheduler's lr is the lr the ZO
update uses at every step. Directions are seeded by the global step, so a run resumed from a
Trainer checkpoint continues with the seeds it would have used.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from zoft.errors import ZoftError
from zoft.optimizer import ZOOptimizer, make_parts


class _LearningRate(torch.optim.Optimizer):
    """The Trainer's optimizer slot: holds param_groups for its scheduler; the ZO step moves the weights."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        return None


class ZOTrainer(Trainer):
    def __init__(self, *args, zo: dict | None = None, **kwargs):
        """``zo``: the estimator and perturbation specs (default SPSA at eps 1e-3, isotropic),
        ``directions`` and ``noise``; the lr and its schedule come from the TrainingArguments."""
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ZoftError("ZOTrainer takes gradient_accumulation_steps=1 (a ZO step reads the whole batch)")
        self.zo_settings = {"estimator": {"name": "spsa", "eps": 1e-3}, "perturbation": {"name": "isotropic"},
                            "directions": 1, "noise": "table", **(zo or {})}
        self.zo: ZOOptimizer | None = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            s = self.zo_settings
            estimator, perturbation, update = make_parts(
                s["estimator"], s["perturbation"],
                {"name": "sgd", "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay})
            self.zo = ZOOptimizer(model, estimator, perturbation, update, noise=s["noise"],
                                  num_directions=s["directions"], seed=self.args.seed)
            self.optimizer = _LearningRate([p for p in model.parameters() if p.requires_grad], self.args.learning_rate)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.eval()  # both probes of a step must see the same function: no dropout
        inputs = self._prepare_inputs(inputs)
        self.zo.step_count = self.state.global_step
        lr = self.optimizer.param_groups[0]["lr"]
        with self.compute_loss_context_manager():
            loss = self.zo.step(lambda: self.compute_loss(model, inputs), lr=lr)
        return torch.tensor(loss, device=self.args.device)
