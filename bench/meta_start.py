"""Is a start made once per base model worth having? LoRA adapters trained first-order on the
meta-training tasks only, scored zero-shot on held-out tasks along the way (issue 11's "the start").

    python bench/meta_start.py [--meta rte,cb,wic] [--held tweets,sst2] [--steps 100] [--lr 1e-3] [--data-dir ../shared/data] [--json OUT]

AdamW (no weight decay) on zoft's LoRA adapters (r 8 on q_proj/v_proj, B = 0 at the start, as a
ZO-LoRA run starts), one batch of 16 from each meta-training task in turn, each task's own
candidate words. Every ``--every`` steps each held-out task's dev split (protocol v2's 200
examples, data seed 0) is scored as it stands and after the one bias shift on the label-logit
margin that is best on dev (``bench/calibration.py``): the first is the start a ZO-LoRA run would
get from these adapters; the second tells a better-read input from a shifted label prior, which
ZO and the head start already find in a few steps. A start worth shipping raises the held-out
tasks' shifted accuracy above the base model's.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from zoft.adapters import with_adapters  # noqa: E402
from zoft.data import Batches, candidate_token_ids, collate, encode  # noqa: E402
from zoft.finetune import FinetuneConfig, checked  # noqa: E402
from zoft.models import load_model  # noqa: E402
from zoft.scoring import classification_loss  # noqa: E402

from calibration import SHIFTS, accuracy, margins  # noqa: E402  (bench/, the script's own folder)


def task_parts(names: str, args, tokenizer, part: str):
    """{task: (items of the split, candidate token ids)} on the protocol's sample of each task."""
    out = {}
    for name in (n.strip() for n in names.split(",")):
        cfg, task, splits = checked(FinetuneConfig(task=name, model=args.model, num_dev=200, num_test=500,
                                                   data_dir=args.data_dir, peft="lora"))
        out[name] = (encode(task, getattr(splits, part), tokenizer, cfg.max_length), candidate_token_ids(task, tokenizer))
    return out


def held_out_row(model, held, pad_id) -> dict:
    row = {}
    for name, (dev, cand) in held.items():
        margin, gold = margins(model, dev, cand, pad_id)
        row[name] = {"dev": accuracy(margin, gold), "dev_shifted": max(accuracy(margin, gold, s) for s in SHIFTS.tolist())}
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--meta", default="rte,cb,wic")
    ap.add_argument("--held", default="tweets,sst2", help="two-class tasks never trained on")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data-dir", default=None, help="where SuperGLUE files are (../shared/data)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    model.eval()  # dropout off, as in zoft's runs
    pad = tokenizer.pad_token_id
    meta, held = task_parts(args.meta, args, tokenizer, "train"), task_parts(args.held, args, tokenizer, "dev")
    if any(len(cand) != 2 for _, cand in held.values()):
        ap.error("every --held task must be a two-class task (the shift is on a two-class margin)")
    model = with_adapters(model, FinetuneConfig(task="tweets", peft="lora"), seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    batches = {name: Batches(items, 16, 0, pad) for name, (items, _) in meta.items()}
    names = list(held)
    print(f"| step | meta loss (last {args.every}) | " + " | ".join(f"{n} dev / shifted" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    rows, losses = [], []
    result = {"meta": args.meta, "held": args.held, "lr": args.lr, "steps": args.steps, "optimizer": "AdamW", "rows": rows}

    def record(row):  # printed and written row by row, so a stopped bench keeps what it measured
        rows.append(row)
        print(f"| {row['step']} | {row.get('meta_loss', '–')} | "
              + " | ".join(f"{row[n]['dev']:.3f} / {row[n]['dev_shifted']:.3f}" for n in names) + " |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    record({"step": 0, **held_out_row(model, held, pad)})
    for step in range(1, args.steps + 1):
        name = list(meta)[(step - 1) % len(meta)]
        opt.zero_grad(set_to_none=True)
        loss = classification_loss(model, collate(batches[name].next_items(), pad), meta[name][1])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.every == 0 or step == args.steps:
            record({"step": step, "meta_loss": round(sum(losses) / len(losses), 4), **held_out_row(model, held, pad)})
            losses = []
    return result


if __name__ == "__main__":
    main()
