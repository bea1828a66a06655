"""The easiest case for shaping ZO's directions: the label rows alone, on frozen features.

    python bench/readout_zo.py [--tasks tweets,sst2] [--meta rte,wic] [--k 16] --data-dir ../shared/data [--json OUT]

Beyond the label prior, what 300 ZO steps would have to learn is at least what the head start's
probe fits: the K label words' output rows on the frozen model's answer states (tweets: dev 0.875,
test 0.872, against SPSA's 0.812 / 0.756 after 300 steps of the whole model). With nothing else
moving, the loss is exactly K-way cross-entropy of ``states @ rows.T``, so ZO-SGD on the rows can
be run on cached states in seconds, with any distribution of directions:

- ``isotropic``: SPSA on the rows, z ~ N(0, I);
- ``own-k``: z in the top-k eigenvectors of the task's own answer states' second moment, whitened
  (an oracle: it reads the held-out task's training states);
- ``meta-k``: the same basis made from the meta-training tasks' states (made once per base model);
- ``first-order``: SGD on the whole batch gradient, of which a ZO step gets one projection (a
  reference, not a strict bound: a shaped ZO step is a preconditioned gradient step in expectation).

Each method's lr is picked on the first task at seed 0 from a ×2 grid (final dev, ties by the
area under the dev curve; an lr on the grid's edge is flagged), then run on every task and seed at
that lr: 300 steps, batch 16, eps 1e-3, dev every 25 steps, test on the best-dev rows, as in
protocol v2. The second table holds each basis's ceiling: the probe fitted in it (L-BFGS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from zoft.data import candidate_token_ids, encode  # noqa: E402
from zoft.estimators import SPSAConfig, TwoPoint  # noqa: E402
from zoft.finetune import FinetuneConfig, checked  # noqa: E402
from zoft.head import answer_features  # noqa: E402
from zoft.models import load_model  # noqa: E402
from zoft.rng import derive  # noqa: E402

LRS = [1e-5 * 2**i for i in range(17)]  # 1e-5 ... 0.655


def task_states(model, tokenizer, name: str, data_dir, model_id: str) -> dict:
    """Answer states and labels of protocol v2's sample of a task (train 1000, dev 200, test 500)."""
    cfg, task, splits = checked(FinetuneConfig(task=name, model=model_id, num_dev=200, num_test=500, data_dir=data_dir))
    cand = candidate_token_ids(task, tokenizer)
    out = {"rows0": model.get_output_embeddings().weight[cand].detach().double().cpu()}
    for part in ("train", "dev", "test"):
        items = encode(task, getattr(splits, part), tokenizer, cfg.max_length)
        out[part] = answer_features(model, items, tokenizer.pad_token_id, cfg.eval_batch_size, "cpu")
    return out


def whitened_basis(states: torch.Tensor, k: int) -> torch.Tensor:
    """[hidden, k]: the top-k eigenvectors of E[x xᵀ] (uncentred: the mean, which carries the label
    prior, stays in), each divided by √eigenvalue so that the states are isotropic in it, then
    scaled to k units of energy in all (as k isotropic directions have)."""
    eigenvalues, vectors = torch.linalg.eigh(states.T @ states / len(states))
    basis = vectors[:, -k:] * eigenvalues[-k:].clamp(min=1e-12).rsqrt()
    return basis * (k / basis.pow(2).sum()).sqrt()


def _loss(rows, states, labels):
    return F.cross_entropy(states @ rows.T, labels)


def _objective(name: str):
    """The training objective on a batch: cross-entropy, or −accuracy (the engine's --objective
    accuracy, a step function of the rows)."""
    return _loss if name == "loss" else lambda rows, x, y: -((x @ rows.T).argmax(-1) == y).double().mean()


def _accuracy(rows, states, labels) -> float:
    return ((states @ rows.T).argmax(-1) == labels).double().mean().item()


def run(data: dict, basis: torch.Tensor | None, lr: float, seed: int, steps=300, batch=16, eps=1e-3, every=25,
        estimator=None, objective="loss") -> dict:
    """ZO-SGD on the label rows, directions u = z @ basisᵀ (basis None: first-order SGD), the
    coefficient along u from zoft's ``estimator`` (default SPSA at ``eps``) on ``objective``. Returns
    the dev curve and the test accuracy of the best-dev rows."""
    estimator = estimator or TwoPoint(SPSAConfig(eps=eps))
    train_objective = _objective(objective)
    (x, y), (dev_x, dev_y), (test_x, test_y) = data["train"], data["dev"], data["test"]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    rows, curve, best = data["rows0"].clone(), [], (-1.0, None)
    for t in range(steps + 1):
        if t % every == 0:
            curve.append(_accuracy(rows, dev_x, dev_y))
            if curve[-1] > best[0]:
                best = (curve[-1], rows.clone())
        if t == steps:
            break
        start = (t * batch) % len(y)
        bx, by = x[order[start : start + batch]], y[order[start : start + batch]]
        if basis is None:
            r = rows.clone().requires_grad_()
            _loss(r, bx, by).backward()
            rows -= lr * r.grad
            continue
        u = torch.randn(rows.shape[0], basis.shape[1], generator=g, dtype=rows.dtype) @ basis.T
        probe = estimator.probe(derive(seed, t), t, 1)  # the rows are one block
        losses = [train_objective(rows + point[0] * u, bx, by).item() for point in probe.points]
        rows -= lr * estimator.estimate(None, losses, probe, t)[0][0] * u
    if not torch.isfinite(rows).all():
        curve[-1] = float("nan")
    return {"curve": curve, "test": _accuracy(best[1], test_x, test_y)}


def pick_lr(data, basis, lrs=LRS, **kw) -> tuple[float, bool]:
    """(the lr with the best final dev at seed 0, ties by dev AUC; whether it is on the grid's edge)."""
    scores = []
    for lr in lrs:
        curve = run(data, basis, lr, seed=0, **kw)["curve"]
        final = curve[-1] if curve[-1] == curve[-1] else -1.0  # a NaN (diverged) run scores last
        scores.append((final, sum(curve) / len(curve)))
    best = max(range(len(lrs)), key=lambda i: scores[i])
    return lrs[best], best in (0, len(lrs) - 1)


def probe_in(data, basis: torch.Tensor, l2=1e-3) -> tuple[float, float]:
    """(dev, test) of the rows fitted exactly (L-BFGS) with their change confined to the basis."""
    x, y = data["train"]
    coef = torch.zeros(data["rows0"].shape[0], basis.shape[1], dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([coef], max_iter=500, line_search_fn="strong_wolfe")

    def objective():
        solver.zero_grad()
        value = _loss(data["rows0"] + coef @ basis.T, x, y) + l2 * coef.pow(2).sum()
        value.backward()
        return value

    solver.step(objective)
    rows = (data["rows0"] + coef @ basis.T).detach()
    return _accuracy(rows, *data["dev"]), _accuracy(rows, *data["test"])


def _spread(values) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def add_common_args(ap: argparse.ArgumentParser):
    """The flags every readout bench shares (this one and bench/readout_kernel.py)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="tweets,sst2", help="held-out tasks; the first picks each method's lr")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data-dir", default=None, help="where the SST-2 and SuperGLUE files are (../shared/data)")
    ap.add_argument("--json", help="write the results here too")


def held_out_states(args) -> tuple:
    """(model, tokenizer, {task: task_states}) for ``--tasks``."""
    model, tokenizer = load_model(args.model)
    model.eval()
    return model, tokenizer, {n: task_states(model, tokenizer, n, args.data_dir, args.model) for n in args.tasks.split(",")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--meta", default="rte,wic", help="meta-training tasks the meta-k basis is made from")
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args(argv)
    model, tokenizer, tasks = held_out_states(args)
    meta_states = torch.cat([task_states(model, tokenizer, n, args.data_dir, args.model)["train"][0]
                             for n in args.meta.split(",")])
    hidden = meta_states.shape[1]
    bases = {"isotropic": lambda d: torch.eye(hidden, dtype=torch.float64),
             f"own-{args.k} (oracle)": lambda d: whitened_basis(d["train"][0], args.k),
             f"meta-{args.k}": lambda d: whitened_basis(meta_states, args.k),
             "first-order": lambda d: None}
    first, seeds = next(iter(tasks.values())), [int(s) for s in args.seeds.split(",")]
    kw = {"steps": args.steps}
    results = {"rows": [], "ceilings": []}
    print(f"| task | method | lr (edge?) | dev at 25 / 100 / {args.steps} steps (mean) | final dev | test (best-dev rows) |")
    print("|---|---|---|---|---|---|")
    for method, make in bases.items():
        lr, edge = pick_lr(first, make(first), **kw)
        for name, data in tasks.items():
            basis = make(data)  # one eigendecomposition a task, not one a seed
            runs = [run(data, basis, lr, s, **kw) for s in seeds]
            at = [statistics.mean(r["curve"][min(i, len(r["curve"]) - 1)] for r in runs) for i in (1, 4, -1)]
            row = {"task": name, "method": method, "lr": lr, "edge": edge, "dev_at": at,
                   "final_dev": [r["curve"][-1] for r in runs], "test": [r["test"] for r in runs]}
            results["rows"].append(row)
            print(f"| {name} | {method} | {lr:.3g}{' (edge)' if edge else ''} | {' / '.join(f'{a:.3f}' for a in at)} |"
                  f" {_spread(row['final_dev'])} | {_spread(row['test'])} |", flush=True)
    print("\n| task | basis | probe fitted in it: dev / test |\n|---|---|---|")
    for name, data in tasks.items():
        for method, make in bases.items():
            basis = make(data)
            if basis is not None:
                dev, test = probe_in(data, basis)
                results["ceilings"].append({"task": name, "basis": method, "dev": dev, "test": test})
                print(f"| {name} | {method} | {dev:.3f} / {test:.3f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
