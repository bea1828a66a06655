"""How the cost of a ZO step grows with the model, and the data-parallel speed-up.

    python bench/scale.py [--json] [--sizes 135m 360m 1b] [--rounds 2]

Randomly initialised Llama-shaped models (SmolLM2's 135M and 360M configs, and a 1B one; built
from their configs, nothing downloaded), fp32 on CPU, a batch of 16 random prompts of 53
tokens scored on two candidate tokens as zoft trains: one forward, one ZO step (table noise)
and their ratio (medians of interleaved rounds); peak RSS of ZO fine-tuning and of inference in
fresh processes (all weights faulted in first), and of one AdamW step where it fits in memory.
Then the data-parallel speed-up on the default model: 2 processes of one thread each under
torchrun against 1 process of one thread, the same global batch, seconds per step of
``zoft finetune`` (its own s_per_step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "135m": (576, 1536, 30, 9, 3),
    "360m": (960, 2560, 32, 15, 5),
    "1b": (2048, 8192, 16, 32, 8),
}
ADAMW_LIMIT_GB = 16  # weights, gradients and two moments: 16 bytes a parameter


def build(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    batch = {"input_ids": torch.randint(0, 49152, (16, 53)), "lengths": torch.full((16,), 53),
             "labels": torch.randint(0, 2, (16,))}
    return model, batch, torch.tensor([3, 7])


def timings(size: str, rounds: int) -> dict:
    import zoft
    from zoft.scoring import classification_loss

    model, batch, cand = build(size)
    opt = zoft.mezo(model)

    def closure():
        return classification_loss(model, batch, cand)

    opt.step(closure)
    fwd, step = [], []
    for _ in range(rounds):
        with torch.inference_mode():
            t = time.perf_counter()
            closure()
            closure()
            fwd.append((time.perf_counter() - t) / 2)
        t = time.perf_counter()
        opt.step(closure)
        step.append(time.perf_counter() - t)
    f, s = statistics.median(fwd), statistics.median(step)
    params = sum(p.numel() for p in model.parameters())
    return {"params_m": params / 1e6, "forward_s": f, "step_s": s, "step_over_2fwd": s / (2 * f)}


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def peak_rss(size: str, setting: str) -> float:
    import zoft
    from zoft.scoring import classification_loss

    model, batch, cand = build(size)
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    if setting == "infer":
        with torch.inference_mode():
            classification_loss(model, batch, cand)
    elif setting == "zo":
        zoft.mezo(model).step(lambda: classification_loss(model, batch, cand))
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        classification_loss(model, batch, cand).backward()
        opt.step()
    return _vm_hwm_mb()


def _fresh(size: str, setting: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss", size, setting], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def speedup() -> dict:
    """s/step of zoft finetune on the default model: 1 process × 1 thread against 2 × 1."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            args = ["finetune", "--steps", "12", "--eval-every", "1000", "--num-dev", "16", "--num-test", "16",
                    "--output-dir", tmp, "--run-name", f"p{procs}", "--accumulate", "2" if procs == 1 else "1"]
            cmd = [sys.executable, "-m", "zoft.cli", *args] if procs == 1 else \
                [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "zoft.cli", *args]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            result[f"s_per_step_{procs}proc"] = json.loads((Path(tmp) / f"p{procs}" / "summary.json").read_text())["s_per_step"]
    result["dp_speedup_2proc"] = result["s_per_step_1proc"] / result["s_per_step_2proc"]
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rss", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss:
        print(peak_rss(*args.rss))
        return
    rows = {}
    for size in args.sizes:
        row = timings(size, args.rounds)
        row["rss_infer_mb"], row["rss_zo_mb"] = _fresh(size, "infer"), _fresh(size, "zo")
        row["rss_zo_over_infer"] = row["rss_zo_mb"] / row["rss_infer_mb"]
        fits = row["params_m"] * 16 / 1024 < ADAMW_LIMIT_GB
        row["rss_adamw_over_infer"] = _fresh(size, "adamw") / row["rss_infer_mb"] if fits else None
        rows[size] = row
        print(f"{size}: {row}", file=sys.stderr, flush=True)
    result = {"sizes": rows, **speedup(), "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("| model | params | forward s | ZO step s | step ÷ 2 fwd | RSS ZO ÷ inference | RSS AdamW ÷ inference |")
    print("|---|---|---|---|---|---|---|")
    for size, r in rows.items():
        adamw = "does not fit" if r["rss_adamw_over_infer"] is None else f"{r['rss_adamw_over_infer']:.2f}"
        print(f"| {size} | {r['params_m']:.0f}M | {r['forward_s']:.2f} | {r['step_s']:.2f} | {r['step_over_2fwd']:.3f} |"
              f" {r['rss_zo_over_infer']:.3f} | {adamw} |")
    print(f"\ndata parallel, default model: {result['s_per_step_1proc']:.2f} s/step on 1 process,"
          f" {result['s_per_step_2proc']:.2f} on 2 (one thread each): {result['dp_speedup_2proc']:.2f}x")


if __name__ == "__main__":
    main()
