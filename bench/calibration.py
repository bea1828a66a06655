"""How much of a run's gain is calibration: along a run's trajectory, dev accuracy as the model
stands and after the one bias shift on the label-logit margin that is best on dev, and test
accuracy before and after that dev-chosen shift (two-class tasks).

    python bench/calibration.py RUN_DIR [RUN_DIR ...] [--steps 0,50,150,300]

The weights at each step are rebuilt from the base model and the run's trajectory.safetensors
(as ``zoft replay`` does), so nothing parameter-sized has to be stored. If the step-0 model with
its best shift is as accurate as the trained one, the run has so far learned the label prior
and little else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from zoft.data import candidate_token_ids, collate, encode
from zoft.errors import ZoftError
from zoft.finetune import checked, rebuilt_models, saved_config
from zoft.scoring import task_logits

SHIFTS = torch.linspace(-8, 8, 321)


@torch.inference_mode()
def margins(model, items, cand, pad_id):
    """Label-logit margin (class 1 minus class 0) and gold label of every example, in batches of
    similar length so that padding stays small."""
    items = sorted(items, key=lambda item: len(item.input_ids))
    out, gold = [], []
    for i in range(0, len(items), 32):
        batch = collate(items[i : i + 32], pad_id, "cpu")
        logits = task_logits(model, batch, cand).double()
        out.append(logits[:, 1] - logits[:, 0])
        gold.append(batch["labels"])
    return torch.cat(out), torch.cat(gold)


def accuracy(margin, gold, shift=0.0) -> float:
    return float(((margin + shift > 0).long() == gold).double().mean())


def along(run: Path, points: list[int]):
    """One row per step in ``points``: the run's weights there, rebuilt from its trajectory."""
    _, task, splits = checked(saved_config(json.loads((run / "config.json").read_text())))
    if len(task.label_words) != 2:
        raise SystemExit(f"{run}: {task.name} is not a two-class task")
    encoded = None  # every step shares the run's tokenizer: dev and test are encoded once
    for k, (model, tokenizer, cfg, _) in zip(points, rebuilt_models(run, points)):
        model.eval()
        if encoded is None:
            encoded = [encode(task, part, tokenizer, cfg.max_length) for part in (splits.dev, splits.test)]
            cand = candidate_token_ids(task, tokenizer)
        dev, test = encoded
        (md, gd), (mt, gt) = margins(model, dev, cand, tokenizer.pad_token_id), margins(model, test, cand, tokenizer.pad_token_id)
        best = max(SHIFTS.tolist(), key=lambda s: accuracy(md, gd, s))
        yield {"step": k, "dev": accuracy(md, gd), "mean_margin": float(md.mean()), "best_shift": best,
               "dev_shifted": accuracy(md, gd, best), "test": accuracy(mt, gt), "test_shifted": accuracy(mt, gt, best)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--steps", default="0,50,150,300")
    args = ap.parse_args()
    points = sorted(int(x) for x in args.steps.split(","))
    print("| run | step | dev | mean margin | best shift | dev, shifted | test | test, dev-chosen shift |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        try:
            for r in along(run, points):
                print(f"| {run.name} | {r['step']} | {r['dev']:.3f} | {r['mean_margin']:+.2f} | {r['best_shift']:+.2f} |"
                      f" {r['dev_shifted']:.3f} | {r['test']:.3f} | {r['test_shifted']:.3f} |", flush=True)
        except ZoftError as e:
            raise SystemExit(f"calibration: {e}") from None


if __name__ == "__main__":
    main()
