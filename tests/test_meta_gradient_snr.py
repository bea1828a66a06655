"""bench/meta_gradient_snr.py: the statistics of segment meta-gradients, on gradients of known mean and noise."""

import pytest
import torch

from conftest import bench_script

snr = bench_script("meta_gradient_snr")


MEAN = torch.tensor([3.0, 0.0, 0.0, 0.0])  # ‖μ‖² = 9
NOISE = torch.tensor([1.0, 2.0, 2.0, 2.0])  # tr Σ = 13


def draws(gen, m):
    return MEAN + NOISE * torch.randn(m, 4, generator=gen, dtype=torch.float64)


def test_snr_is_the_squared_mean_over_the_noise():
    s = snr.summary(draws(torch.Generator().manual_seed(0), 20000))
    assert s["snr"] == pytest.approx(9 / 13, rel=0.05) and s["segments_for_1"] == pytest.approx(13 / 9, rel=0.05)
    assert s["significant"] == 1 and s["cosine"] > 0.9


def test_the_squared_mean_of_few_segments_has_their_noise_taken_out():
    gen = torch.Generator().manual_seed(1)
    # ‖ḡ‖² of 4 segments is 9 + 13/4 on average; the estimate is 9
    estimates = [snr.summary(draws(gen, 4))["signal"] for _ in range(4000)]
    assert sum(estimates) / len(estimates) == pytest.approx(9, rel=0.05)


def test_a_block_counts_as_significant_by_its_standard_error_not_its_spread():
    gen = torch.Generator().manual_seed(2)
    grads = torch.tensor([0.5, 0.0]) + torch.randn(400, 2, generator=gen, dtype=torch.float64)
    assert snr.summary(grads)["significant"] == 1  # 0.5 is 10 standard errors from 0, half a standard deviation


def test_es_on_the_same_segments_leaves_the_unrolls_trajectory_as_it_was():
    """With ES beside it, each segment is run twice more from its start: the unroll's gradients and gains
    must be those of the run without ES."""
    from tests.test_meta_train import lm_loss, tuner_optimizer

    gen = torch.Generator().manual_seed(3)
    data = [torch.randint(1, 64, (3, 7), generator=gen) for _ in range(40)]
    runs = {}
    for es_size in (0.0, 0.05):
        opt, net = tuner_optimizer()
        with torch.no_grad():  # σ reads the tuner's inputs: each run of a segment must start from them alike
            net.w2.copy_(0.05 * torch.randn(net.w2.shape, generator=torch.Generator().manual_seed(4)))
        opt.states["perturbation"], opt.prev_losses = opt.perturbation.init(opt.blocks), None
        runs[es_size] = snr.segment_gradients(opt, net, lm_loss, iter(data), 3, 4, 0.2, es_size=es_size)
    (grads, gains, none), (grads_es, gains_es, es) = runs[0.0], runs[0.05]
    assert none is None and es.shape == grads.shape
    torch.testing.assert_close(grads_es, grads)
    assert gains_es == pytest.approx(gains)
    assert not torch.allclose(es, grads)
