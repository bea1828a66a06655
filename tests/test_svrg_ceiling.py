"""bench/svrg_ceiling.py: the SVRG control variate's second moment, streamed over batches."""

import json

import torch

from conftest import bench_script

svrg = bench_script("svrg_ceiling")


def _moments(G, Hs):
    moments = svrg.ControlVariateMoments(len(Hs))
    for i, g in enumerate(G):
        moments.add(g, [H[i] for H in Hs])
    return moments.figures()


def test_streamed_figures_match_the_batches_kept_whole():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(9, 50, generator=gen, dtype=torch.float64) + 0.3
    H = G + 0.5 * torch.randn(9, 50, generator=gen, dtype=torch.float64)
    figures = _moments(G, [H])
    corrected = (G - H + H.mean(0)).square().sum(1).mean()
    assert abs(figures["anchors"][0]["B_cv"] / float(corrected) - 1) < 1e-12
    assert abs(figures["B"] / float(G.square().sum(1).mean()) - 1) < 1e-12
    pairs = [float(G[i] @ G[j]) for i in range(9) for j in range(9) if i != j]
    assert abs(figures["S"] / (sum(pairs) / len(pairs)) - 1) < 1e-12


def test_an_anchor_whose_batch_gradients_moved_together_leaves_only_the_full_gradient():
    """Each batch's gradient shifted by one common vector since the anchor: the correction cancels
    all batch noise (B_cv = ‖ḡ‖², gain B / ‖ḡ‖²). An anchor whose batch gradients are unrelated
    noise adds its own: B_cv > B, no gain."""
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(16, 200, generator=gen, dtype=torch.float64) + 0.1
    moved = G - torch.randn(200, generator=gen, dtype=torch.float64)
    unrelated = torch.randn(16, 200, generator=gen, dtype=torch.float64)
    together, apart = _moments(G, [moved, unrelated])["anchors"]
    full = float(G.mean(0).square().sum())
    assert abs(together["B_cv"] / full - 1) < 1e-9 and together["gain"] > 5
    assert apart["gain"] < 0.7


def test_an_anchor_at_the_run_s_own_weights_sees_the_same_batches(tmp_path, tiny_model_dir, capsys):
    """End to end on a tiny run: an anchor at STEP itself holds θ's own batch gradients, so its
    corrected moment is the sample's full gradient exactly (batches in lockstep); an earlier anchor's
    is not. The figures are printed and written to --json."""
    from zoft.cli import main as zoft_main

    assert zoft_main(["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "r",
                      "--steps", "3", "--num-train", "1000", "--num-dev", "8", "--num-test", "8",
                      "--batch-size", "4", "--eval-every", "3", "--lr", "5e-2", "--eps", "1e-2"]) == 0
    capsys.readouterr()
    svrg.main(["--at", f"{tmp_path / 'r'}:3", "--anchors", "0,3", "--task", "tweets", "--batches", "6",
               "--json", str(tmp_path / "out.json")])
    assert "| 3 | 0 |" in capsys.readouterr().out
    figures = json.loads((tmp_path / "out.json").read_text())
    earlier, same = figures["anchors"]
    assert (earlier["anchor_step"], same["anchor_step"]) == (0, 3)
    assert abs(same["B_cv"] / figures["sample_gradient"] - 1) < 1e-6
    assert abs(earlier["B_cv"] / figures["sample_gradient"] - 1) > 1e-3


def test_bad_arguments_stop_before_any_model_is_built(tmp_path, capsys):
    import pytest

    for argv in (["--at", "run", "--anchors", "0"], ["--at", "run:3", "--anchors", "0,4"],
                 ["--at", "run:3", "--anchors", "0", "--batches", "1"]):
        with pytest.raises(SystemExit):
            svrg.main(argv)
        assert "error:" in capsys.readouterr().err


def test_a_stored_anchor_gradient_never_pays_for_its_full_pass():
    """The bound is the best over the refresh-to-directions ratio k (a grid over k finds no more),
    and stays below plain ZO's gain wherever B / ‖ḡ‖² is at most the batches per full pass."""
    def per_forward(ratio, n, k):
        return ratio / (1 + k) * k / (2 * k + n)

    for n in (4, 62, 1000):
        ks = [x / 100 for x in range(1, 100_000)]
        best_on_grid = max(per_forward(3.0, n, k) for k in ks)
        assert best_on_grid * (1 - 1e-12) <= svrg.stored_anchor_bound(3.0, n) < best_on_grid * (1 + 1e-5)
        assert svrg.stored_anchor_bound(float(n), n) < 1
