"""bench/subspace_ceiling.py: the one-step gain of ZO directions drawn within a subspace."""

import torch

from conftest import bench_script

subspace = bench_script("subspace_ceiling")


def _batches(n=12, d=400, seed=0):
    """Batch gradients around a mean μ along the first axis, with noise larger than μ; Fisher samples alike."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.zeros(d, dtype=torch.float64)
    mean[0] = 1.0
    G = mean + 2.0 * torch.randn(n, d, generator=gen, dtype=torch.float64) / d**0.5
    return G, torch.randn(n, d, generator=gen, dtype=torch.float64), mean


def test_the_signal_is_unbiased_where_the_mean_batch_gradient_is_not():
    """‖E g‖² from different batches' products: over many draws it averages ‖μ‖² = 1, while
    ‖mean g̃‖² exceeds it by the noise's trace over n (4 / 12)."""
    draws = [_batches(seed=s) for s in range(300)]
    unbiased = torch.stack([subspace.signal(G) for G, _, _ in draws]).mean()
    naive = torch.stack([G.mean(0).square().sum() for G, _, _ in draws]).mean()
    assert abs(float(unbiased) - 1) < 0.05 and float(naive) > 1.25


def test_a_subspace_along_the_mean_gradient_gains_and_one_across_it_does_not():
    G, F, mean = _batches()
    along, across = mean[None], torch.eye(len(mean), dtype=torch.float64)[1:2]
    reference = subspace.isotropic_gain(G, F)
    assert subspace.subspace_gain(along, G, F) / reference > 20
    assert subspace.subspace_gain(across, G, F) / reference < 0.1
    # the leading singular direction of the batches finds μ's axis
    assert abs(float(subspace.top_rows(G, 1)[0, 0])) > 0.7  # a random unit row: about 0.05


def test_the_noise_term_is_exact_in_few_dimensions():
    """E[(rᵀc)² rᵀMr] over r ~ N(0, I_k), which the gain divides by, against a Monte Carlo average;
    at k = 2 the high-dimension form ‖c‖² tr M alone falls well short of it."""
    G, F, _ = _batches()
    U = torch.linalg.qr(torch.randn(len(G[0]), 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).Q.T
    U[0] = G.mean(0) / G.mean(0).norm()  # one row along the signal, so that S > 0
    U = torch.linalg.qr(U.T).Q.T
    c, e = G @ U.T, F @ U.T
    M = e.T @ e / (len(e) * 16)
    r = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sampled = torch.stack([((r @ ci) ** 2 * torch.einsum("ni,ij,nj->n", r, M, r)).mean() for ci in c]).mean()
    implied = subspace.signal(c) ** 2 / (2 * subspace.subspace_gain(U, G, F))
    assert abs(float(implied / sampled) - 1) < 0.03
    assert float(((c * c).sum(1) * M.trace()).mean() / sampled) < 0.8


def test_the_script_scores_each_k_at_a_lora_run_s_start(tmp_path, tiny_model_dir, capsys):
    """End to end on a tiny LoRA run: one row per k, finite gains, the figures also in --json."""
    import json

    from zoft.cli import main as zoft_main

    assert zoft_main(["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "r",
                      "--peft", "lora", "--steps", "2", "--num-train", "1000", "--num-dev", "8", "--num-test", "8",
                      "--batch-size", "4", "--eval-every", "2", "--lr", "5e-2", "--eps", "1e-2"]) == 0
    capsys.readouterr()
    subspace.main(["--at", f"{tmp_path / 'r'}:0", "--task", "tweets", "--meta", "tweets", "--batches", "8",
                   "--ks", "1,2", "--json", str(tmp_path / "out.json")])
    printed = capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ") and line[2].isdigit()] == ["1", "2"]
    rows = json.loads((tmp_path / "out.json").read_text())["R"]
    assert set(rows) == {"1", "2"} and all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in rows.values())
