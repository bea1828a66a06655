"""An existing transformers.Trainer script switches to ZO by changing one line."""

import torch

from tests.conftest import tiny_llama


def test_zo_trainer_lowers_the_loss_with_the_trainers_own_loop(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from zoft.trainer import ZOTrainer

    torch.manual_seed(0)
    rows = torch.randint(1, 64, (8, 12))
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8,
                             learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=10, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, max_grad_norm=0.0)

    def loss():
        with torch.no_grad():
            return model(rows, labels=rows).loss.item()

    before = [p.detach().clone() for p in model.parameters()]
    start = loss()
    trainer = ZOTrainer(model=model, args=args, train_dataset=data, zo={"estimator": {"name": "spsa", "eps": 1e-2}})
    trainer.train()
    assert loss() < start - 0.05  # forward passes only moved the weights, downhill
    assert all(p.grad is None for p in model.parameters())  # no backward ever ran
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and trainer.zo.step_count == 40
