"""Where could the kernel estimator win? SPSA against KerZOO's kernels on the label rows alone
(``bench/readout_zo.py``'s setting: the loss is exact and a run takes a second), over ε and with
either training objective: cross-entropy, or the accuracy objective, a step function, where the
smoothing bias that the kernel cancels is largest.

    python bench/readout_kernel.py --data-dir ../shared/data [--eps 1e-4,1e-3,1e-2,1e-1,1] [--json OUT]

Per objective, ε and estimator: the lr with the best final dev on the first task at seed 0 (a ×2
grid, 1e-6 … 8.4; an lr on its edge is flagged), then 3 seeds on both tasks at that lr; isotropic
directions, 300 steps, batch 16, dev every 25 steps, test on the best-dev rows, as in protocol v2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from readout_zo import _spread, add_common_args, held_out_states, pick_lr, run  # noqa: E402
from zoft.estimators import Kernel, KernelConfig, SPSAConfig, TwoPoint  # noqa: E402

LRS = [1e-6 * 2**i for i in range(24)]  # 1e-6 ... 8.4


def estimators(eps: float) -> dict:
    return {"SPSA": TwoPoint(SPSAConfig(eps=eps)),
            **{f"kernel, order {k}": Kernel(KernelConfig(eps=eps, kernel_order=k)) for k in (2, 4)}}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--objectives", default="accuracy,loss")
    ap.add_argument("--eps", default="1e-4,1e-3,1e-2,1e-1,1")
    args = ap.parse_args(argv)
    _, _, tasks = held_out_states(args)
    first, seeds = next(iter(tasks.values())), [int(s) for s in args.seeds.split(",")]
    eye = torch.eye(first["rows0"].shape[1], dtype=torch.float64)
    rows = []
    print("| objective | ε | estimator | lr (edge?) | " + " | ".join(f"{n}: final dev / test" for n in tasks) + " |")
    print("|---|---|---|---|" + "---|" * len(tasks))
    for objective in args.objectives.split(","):
        for eps in (float(e) for e in args.eps.split(",")):
            for name, estimator in estimators(eps).items():
                kw = {"estimator": estimator, "objective": objective, "steps": args.steps}
                lr, edge = pick_lr(first, eye, lrs=LRS, **kw)
                row = {"objective": objective, "eps": eps, "estimator": name, "lr": lr, "edge": edge}
                for task, data in tasks.items():
                    runs = [run(data, eye, lr, s, **kw) for s in seeds]
                    row[task] = {"final_dev": [r["curve"][-1] for r in runs], "test": [r["test"] for r in runs]}
                rows.append(row)
                cells = " | ".join(f"{_spread(row[t]['final_dev'])} / {_spread(row[t]['test'])}" for t in tasks)
                print(f"| {objective} | {eps:g} | {name} | {lr:.3g}{' (edge)' if edge else ''} | {cells} |", flush=True)
    best = {}
    for row in rows:  # each estimator at its best ε, chosen as its lr is
        key = (row["objective"], row["estimator"])
        score = (row[next(iter(tasks))]["final_dev"][0], statistics.mean(row[next(iter(tasks))]["final_dev"]))
        if key not in best or score > best[key][0]:
            best[key] = (score, row)
    print("\nEach estimator at its best ε (the first task's final dev at the first seed, ties by the mean):\n")
    for (objective, name), (_, row) in best.items():
        print(f"- {objective}, {name}: ε {row['eps']:g}, lr {row['lr']:.3g}; "
              + "; ".join(f"{t} test {_spread(row[t]['test'])}" for t in tasks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
