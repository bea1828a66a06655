"""The head start alone: dev and test accuracy of the default model after ``--head-init probe``
and before any ZO step, on protocol v2's samples (1000 train, dev 200, test 500, data seed 0).

    python bench/head_probe.py [--tasks tweets sst2] [--data-dir ../shared/data]

The reference row for every run that starts from it: what ZO adds is read against this.
"""

from __future__ import annotations

import argparse

from zoft.config import FinetuneConfig
from zoft.data import candidate_token_ids, encode
from zoft.finetune import checked
from zoft.head import fit_probe, forward_passes
from zoft.models import load_model
from zoft.scoring import evaluate


def probe_alone(task_name: str, data_dir: str | None) -> dict:
    cfg, task, splits = checked(FinetuneConfig(task=task_name, data_dir=data_dir, num_dev=200, num_test=500,
                                               head_init="probe"))
    model, tokenizer = load_model(cfg.model)
    model.eval()
    cand = candidate_token_ids(task, tokenizer)
    train, dev, test = (encode(task, part, tokenizer, cfg.max_length) for part in (splits.train, splits.dev, splits.test))
    pad = tokenizer.pad_token_id
    before = {name: evaluate(model, items, cand, pad)["acc"] for name, items in (("dev", dev), ("test", test))}
    head, metrics = fit_probe(model, train, cand, pad, cfg.eval_batch_size, "cpu", seed=cfg.seed)
    head.apply(model)
    after = {name: evaluate(model, items, cand, pad)["acc"] for name, items in (("dev", dev), ("test", test))}
    return {"task": task_name, "forward_passes": forward_passes(len(train), cfg.batch_size), "l2": metrics["head/l2"],
            "dev_before": before["dev"], "test_before": before["test"], "dev": after["dev"], "test": after["test"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["tweets", "sst2"])
    ap.add_argument("--data-dir", default="../shared/data")
    args = ap.parse_args()
    print("| task | forward passes | l2 (5-fold CV) | dev before → after | test before → after |")
    print("|---|---|---|---|---|")
    for name in args.tasks:
        r = probe_alone(name, args.data_dir)
        print(f"| {r['task']} | {r['forward_passes']} | {r['l2']:g} | {r['dev_before']:.3f} → {r['dev']:.3f} |"
              f" {r['test_before']:.3f} → {r['test']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
