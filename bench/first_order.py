"""First-order reference on protocol v2 (issue 11): what backpropagation reaches on the same
training sample, batches and evaluation, as a ceiling for "ends ≥ 2 points higher on test".

    python bench/first_order.py [--task tweets] [--lrs 3e-6,1e-5,3e-5] [--steps 100] [--head-share S] [--peft lora] [--json OUT]

Full fine-tuning with AdamW (β = 0.9, 0.999, no weight decay, constant lr) on the run's own
sample (1000 train, dev 200 every 25 steps, test 500 at the best dev step), batch 16 drawn by
zoft's trainer with seed 0. Not memory-lean: this is the reference, not a method.

With ``--head-share S`` it starts where the flagship's ZO starts: the label rows fitted by
``--head-init probe`` on the first share S of the sample, then AdamW on the rest alone. Whether
gradients gain anything there says whether ZO (and a tuner shaping it) has anything left to find.
With ``--peft lora`` AdamW trains zoft's LoRA adapters (r 8 on q_proj/v_proj) from there instead of
every weight: whether the adapters can hold what full fine-tuning finds, apart from ZO's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from zoft.adapters import with_adapters  # noqa: E402
from zoft.data import Batches, candidate_token_ids, collate, encode  # noqa: E402
from zoft.finetune import FinetuneConfig, checked, head_split  # noqa: E402
from zoft.head import fit_probe  # noqa: E402
from zoft.models import load_model  # noqa: E402
from zoft.scoring import classification_loss, evaluate_task  # noqa: E402


def fine_tune(cfg: FinetuneConfig, lr: float) -> dict:
    cfg, task, splits = checked(cfg)
    model, tokenizer = load_model(cfg.model)
    model.eval()  # dropout off, as in zoft's runs
    cand = candidate_token_ids(task, tokenizer)
    train, dev, test = (encode(task, part, tokenizer, cfg.max_length) for part in (splits.train, splits.dev, splits.test))
    head_items, train = head_split(train, cfg)
    if head_items:
        fit_probe(model, head_items, cand, tokenizer.pad_token_id, cfg.eval_batch_size, "cpu", seed=cfg.seed)[0].apply(model)
    model = with_adapters(model, cfg, cfg.seed)  # after the probe: it fits the base model's features, as a zoft run does
    evaluate = lambda items: evaluate_task(model, task, items, cand, tokenizer, cfg.eval_batch_size)["acc"]  # noqa: E731
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    batches = Batches(train, cfg.batch_size, cfg.seed, tokenizer.pad_token_id)
    curve, best, started = [(0, evaluate(dev))], None, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        opt.zero_grad(set_to_none=True)
        classification_loss(model, collate(batches.next_items(), tokenizer.pad_token_id), cand).backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append((step, evaluate(dev)))
            if best is None or curve[-1][1] > best[1]:
                best = (step, curve[-1][1], {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    return {"lr": lr, "dev_curve": curve, "best_dev_step": best[0], "best_dev_acc": best[1],
            "final_dev_acc": curve[-1][1], "test_acc": evaluate(test), "seconds": time.perf_counter() - started}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tweets")
    ap.add_argument("--lrs", default="3e-6,1e-5,3e-5")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--head-share", type=float, default=None, help="start from the cross-fitted head start (--head-init probe)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--peft", default="none", choices=["none", "lora"])
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    head = {} if args.head_share is None else {"head_init": "probe", "head_share": args.head_share}
    cfg = FinetuneConfig(task=args.task, steps=args.steps, eval_every=25, num_dev=200, num_test=500, seed=0,
                         data_dir=args.data_dir, peft=args.peft, **head)
    results = []
    print("| lr | dev acc at steps 0, 25, … | best dev (step) | test at best dev |\n|---|---|---|---|", flush=True)
    for lr in (float(x) for x in args.lrs.split(",")):
        r = fine_tune(cfg, lr)
        results.append(r)
        print(f"| {lr:g} | {' '.join(f'{a:.3f}' for _, a in r['dev_curve'])} | {r['best_dev_acc']:.3f} ({r['best_dev_step']})"
              f" | {r['test_acc']:.3f} |", flush=True)
        if args.json:  # after every lr, so an interrupted bench keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"task": args.task, "steps": args.steps, "optimizer": "AdamW", "head_share": args.head_share,
                           "peft": args.peft, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
