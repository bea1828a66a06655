"""Cost of a ZO step against forward passes, and peak memory against inference and AdamW.

    python bench/step.py [--json] [--rounds 7]

Timings run in this process on the default model, batch 16 tweets, one direction: each round
times one forward (the loss closure alone), then one step in each mode, on the same batch;
medians over the rounds are reported. Peak RSS is measured in a fresh subprocess per setting
(inference, ZO fine-tuning, AdamW steps) so that peaks do not mix; the high-water mark is reset
after the model is loaded, so each figure is the peak of that work with the weights resident
(Linux only: /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import zoft
from zoft.data import Batches, candidate_token_ids, encode
from zoft.blocks import collect_blocks
from zoft.models import load_model
from zoft.optimizer import make_parts
from zoft.perturbations import LearnedScale, LearnedScaleConfig
from zoft.tuner import BlockMLPs
from zoft.scoring import classification_loss
from zoft.tasks import get_task, sample_splits


def setup(batch_size=16, group_by_length=1):
    """The model and one batch of 16 training tweets: a random one (MeZO's batching), or with
    ``group_by_length`` the first batch of zoft's trainer, which holds similar lengths."""
    model, tok = load_model()
    task = get_task("tweets")
    splits = sample_splits(task, None, 1000, 10, 10, seed=0)
    items = encode(task, splits.train, tok, 256)
    batch = next(Batches(items, batch_size, 0, tok.pad_token_id, group_by_length=group_by_length))
    cand = candidate_token_ids(task, tok)
    return model, batch, cand


def mezo_reference_step(model, closure, seed, lr=1e-5, eps=1e-3):
    """MeZO's own perturbation code (large_models/trainer.py), kept here as the baseline:
    global RNG re-seeded, z regenerated four times, ``p.data = p.data + ...`` per tensor."""
    params = [p for p in model.parameters() if p.requires_grad]

    def perturb(scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * eps

    with torch.no_grad():
        perturb(1)
        loss1 = closure()
        perturb(-2)
        loss2 = closure()
        perturb(1)
        g = ((loss1 - loss2) / (2 * eps)).item()
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data - lr * g * z
    return loss1


def timings(rounds: int) -> dict:
    model, batch, cand = setup()
    _, grouped_batch, _ = setup(group_by_length=16)

    def closure():
        return classification_loss(model, batch, cand)

    # a learned tuner: its cost does not depend on its weights
    learned = LearnedScale(LearnedScaleConfig(), net=BlockMLPs(len(collect_blocks(model))))
    estimator, _, update = make_parts({"name": "spsa"}, {"name": "isotropic"}, {"name": "sgd"})
    tuned = zoft.ZOOptimizer(model, estimator, learned, update)
    modes = {"table": zoft.mezo(model, noise="table"), "gaussian": zoft.mezo(model, noise="gaussian"),
             "tuner": tuned}
    for opt in modes.values():
        opt.step(closure)
        opt.perturber.remove()  # each mode's hooks are installed only while it is timed
    mezo_reference_step(model, closure, seed=0)

    def timed_step(opt, loss):
        opt.perturber.install(model)
        t = time.perf_counter()
        opt.step(loss)
        elapsed = time.perf_counter() - t
        opt.perturber.remove()
        return elapsed

    times = {k: [] for k in ("forward", "table", "gaussian", "tuner", "mezo_reference", "forward_grouped",
                             "table_grouped")}
    for r in range(rounds):
        with torch.inference_mode():
            t = time.perf_counter()
            classification_loss(model, grouped_batch, cand)
            classification_loss(model, grouped_batch, cand)
            times["forward_grouped"].append((time.perf_counter() - t) / 2)
        times["table_grouped"].append(timed_step(modes["table"], lambda: classification_loss(model, grouped_batch, cand)))
        with torch.inference_mode():  # two forwards back to back, as inside a step
            t = time.perf_counter()
            closure()
            closure()
            times["forward"].append((time.perf_counter() - t) / 2)
        for name, opt in modes.items():
            times[name].append(timed_step(opt, closure))
        t = time.perf_counter()
        mezo_reference_step(model, closure, seed=r + 1)
        times["mezo_reference"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd = med["forward"]
    return {
        "forward_s": fwd,
        "step_s": med["table"],
        "step_over_2fwd": med["table"] / (2 * fwd),
        "step_s_mezo_exact": med["gaussian"],
        "step_over_2fwd_mezo_exact": med["gaussian"] / (2 * fwd),
        "step_s_mezo_reference": med["mezo_reference"],
        "step_over_2fwd_mezo_reference": med["mezo_reference"] / (2 * fwd),
        "step_s_tuner": med["tuner"],
        "tuner_overhead_frac": med["tuner"] / med["table"] - 1,
        "batch_tokens": tuple(batch["input_ids"].shape),
        "forward_s_grouped": med["forward_grouped"],
        "step_over_2fwd_grouped": med["table_grouped"] / (2 * med["forward_grouped"]),
        "batch_tokens_grouped": tuple(grouped_batch["input_ids"].shape),
        "rounds": rounds,
    }


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def peak_rss(setting: str) -> dict:
    """Run one setting in this (fresh) process. Peak RSS in MB of the work itself (model
    resident, loading excluded: its transient copy would mask every difference) and of loading."""
    model, batch, cand = setup()
    with torch.no_grad():  # fault in every weight: loading maps the file lazily, and inference
        for p in model.parameters():  # alone would never touch most rows of the embedding
            p.sum()
    load_peak = _vm_hwm_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    if setting == "infer":
        with torch.inference_mode():
            for _ in range(3):
                classification_loss(model, batch, cand)
    elif setting == "zo":
        opt = zoft.mezo(model)
        for _ in range(3):
            opt.step(lambda: classification_loss(model, batch, cand))
    elif setting == "adamw":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(2):
            classification_loss(model, batch, cand).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"peak": _vm_hwm_mb(), "load_peak": load_peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--rss", choices=["infer", "zo", "adamw"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ZOFT_THREADS", torch.get_num_threads())))
    if args.rss:
        print(json.dumps(peak_rss(args.rss)))
        return
    result = timings(args.rounds)
    for setting in ("infer", "zo", "adamw"):
        out = subprocess.run([sys.executable, __file__, "--rss", setting], check=True,
                             capture_output=True, text=True).stdout
        rss = json.loads(out.strip().splitlines()[-1])
        result[f"rss_{setting}_mb"] = rss["peak"]
        result["rss_load_mb"] = rss["load_peak"]
    result["rss_zo_over_infer"] = result["rss_zo_mb"] / result["rss_infer_mb"]
    result["rss_adamw_over_infer"] = result["rss_adamw_mb"] / result["rss_infer_mb"]
    result["device"] = "cpu"
    result["threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")


if __name__ == "__main__":
    main()
