"""KerZOO against its mathematics: kernel moments, bias orders, r modes, unbiasedness."""

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss

import zoft
from zoft.estimators import KERNELS, Kernel, KernelConfig, Probe
from tests.conftest import Quadratic

R_NODES, R_WEIGHTS = leggauss(40)
R_WEIGHTS = R_WEIGHTS / 2  # the uniform density on [-1, 1]
Z_NODES, Z_WEIGHTS = hermegauss(60)
Z_WEIGHTS = Z_WEIGHTS / np.sqrt(2 * np.pi)  # the standard normal density


def moment(order, j, d=1.0):
    """E[r^j K_d(r)] for r ~ U[-d, d] with the rescaled kernel K_d(r) = K(r/d)/d (exact)."""
    r = d * R_NODES
    return float(np.sum(R_WEIGHTS * r**j * KERNELS[order](r / d) / d))


@pytest.mark.parametrize("d", [1.0, 0.5, 0.05])
def test_kernel_moments(d):
    for order in (2, 4, 6):
        assert moment(order, 1, d) == pytest.approx(1, abs=1e-12)
    assert moment(2, 3) == pytest.approx(3 / 5, abs=1e-12)  # order 2 only rescales the bias
    for order in (4, 6):
        assert moment(order, 3, d) == pytest.approx(0, abs=1e-12)
    assert moment(6, 5, d) == pytest.approx(0, abs=1e-12)
    assert moment(4, 5) == pytest.approx(-5 / 21, abs=1e-12)


def f(x1, x2):
    return np.exp(0.6 * x1 - 0.4 * x2) + np.sin(x1 + 2 * x2)


def grad_f(x1, x2):
    e, c = np.exp(0.6 * x1 - 0.4 * x2), np.cos(x1 + 2 * x2)
    return np.array([0.6 * e + c, -0.4 * e + 2 * c])


def expected_estimate(func, x, eps, order=None, r_mode="direction"):
    """E over z ~ N(0, I₂) and r of (f(x + ε r∘z) − f(x − ε r∘z)) / 2ε · K(r) ∘ z, by quadrature.
    order None is SPSA (r = 1, K = 1); r_mode block draws r independently per coordinate."""
    z1, z2 = np.meshgrid(Z_NODES, Z_NODES, indexing="ij")
    wz = np.outer(Z_WEIGHTS, Z_WEIGHTS)
    if order is None:
        radii = [((1.0, 1.0), 1.0)]
    elif r_mode == "direction":
        radii = [((r, r), w) for r, w in zip(R_NODES, R_WEIGHTS)]
    else:
        radii = [((r1, r2), w1 * w2) for r1, w1 in zip(R_NODES, R_WEIGHTS) for r2, w2 in zip(R_NODES, R_WEIGHTS)]
    total = np.zeros(2)
    for (r1, r2), w in radii:
        g = (func(x[0] + eps * r1 * z1, x[1] + eps * r2 * z2) - func(x[0] - eps * r1 * z1, x[1] - eps * r2 * z2)) / (2 * eps)
        k1, k2 = (1.0, 1.0) if order is None else (KERNELS[order](r1), KERNELS[order](r2))
        total += w * np.array([np.sum(wz * g * k1 * z1), np.sum(wz * g * k2 * z2)])
    return total


@pytest.mark.parametrize("order, lo, hi", [(None, 3.6, 4.4), (2, 3.6, 4.4), (4, 13.5, 18.5), (6, 52, 76)])
def test_bias_shrinks_with_the_kernel_order(order, lo, hi):
    """Halving ε shrinks the bias ~4× (ε²) for SPSA and K = 3r, ~16× for order 4, ~64× for 6."""
    x = (0.3, -0.2)
    bias = [np.linalg.norm(expected_estimate(f, x, eps, order) - grad_f(*x)) for eps in (0.2, 0.1)]
    assert lo < bias[0] / bias[1] < hi


def test_block_r_leaves_the_cross_block_bias():
    """Spec §4.1: f = x1 x2² + x1³ at 0, x1 and x2 in different blocks, order 4, ε = 0.5:
    the x1 bias is 4ε² for SPSA, 0 with one r per direction, ε²/3 with one r per block."""
    cubic = lambda a, b: a * b**2 + a**3  # noqa: E731
    eps = 0.5
    assert expected_estimate(cubic, (0, 0), eps)[0] == pytest.approx(4 * eps**2, abs=1e-9)
    assert expected_estimate(cubic, (0, 0), eps, 4, "direction")[0] == pytest.approx(0, abs=1e-9)
    assert expected_estimate(cubic, (0, 0), eps, 4, "block")[0] == pytest.approx(eps**2 / 3, abs=1e-9)


def test_radii_modes_and_shrinking_interval():
    per_direction = Kernel(KernelConfig(r_mode="direction"))
    per_block = Kernel(KernelConfig(r_mode="block"))
    r = per_direction.radii(seed=3, num_blocks=5, step=0)
    assert len(set(r)) == 1 and -1 <= r[0] <= 1
    assert r == per_direction.radii(seed=3, num_blocks=5, step=0)
    assert len(set(per_block.radii(seed=3, num_blocks=5, step=0))) == 5
    shrinking = Kernel(KernelConfig(radius=0.5, shrink_steps=100, min_radius=0.1))
    assert [shrinking.radius(t) for t in (0, 20, 40, 1000)] == pytest.approx([0.5, 0.3, 0.1, 0.1])
    assert all(abs(x) <= 0.3 for seed in range(50) for x in shrinking.radii(seed, num_blocks=1, step=20))
    # the coefficient is g·K(r/d)/d with g = (L+ − L−)/2ε: here r = d/2, g = 2/(2·1e-3)
    coef, _, _ = shrinking.estimate(None, [1.0, -1.0], Probe([], [0.15]), step=20)
    assert coef[0] == pytest.approx(1000 * KERNELS[4](0.5) / 0.3)


@pytest.mark.parametrize("order, tol", [(2, 0.35), (4, 0.6), (6, 0.9)])
def test_kernel_estimate_is_unbiased_on_a_quadratic(order, tol):
    """Through the engine: one step with N directions moves θ by -lr·mean(ĝ); on a quadratic
    mean(ĝ) → ∇ for every order (tolerance ≈ 5 standard errors; 195/64 would be off by 3.4)."""
    n, lr = 20000, 1e-3
    quad = Quadratic([1.0, 2.0, 3.0, 4.0])
    opt = zoft.build_optimizer(quad, {"name": "kernel", "kernel_order": order, "eps": 0.1}, {"name": "isotropic"},
                               {"name": "sgd", "lr": lr}, num_directions=n, seed=order)
    opt.step(quad)
    estimate = (1.0 - quad.theta.detach()) / lr
    assert (estimate - torch.tensor([1.0, 2.0, 3.0, 4.0])).abs().max() < tol


def test_kernel_same_seed_same_estimate_and_config_errors():
    def run():
        quad = Quadratic(torch.linspace(1, 3, 8))
        opt = zoft.build_optimizer(quad, {"name": "kernel", "r_mode": "block"}, {"name": "isotropic"},
                                   {"name": "sgd", "lr": 1e-2}, num_directions=3, seed=1)
        for _ in range(3):
            opt.step(quad)
        return quad.theta.detach().clone()

    assert torch.equal(run(), run())
    for bad, msg in [({"kernel_order": 5}, "kernel order must be 2, 4 or 6"), ({"r_mode": "tensor"}, "r_mode must be"),
                     ({"shrink_steps": -1}, "shrink_steps must be >= 0"), ({"eps": 0}, "eps must be a finite number > 0")]:
        with pytest.raises(zoft.ZoftError, match=msg):
            KernelConfig(**bad)


def test_clipping_caps_each_block_estimate_without_a_gradient_buffer():
    """With clip C, each block moves by exactly lr·C when its estimate is longer than C; the
    norm comes from the directions' Gram matrix, equal to the norm of the materialised sum."""
    n, lr, clip = 3, 1e-3, 0.5
    quad = Quadratic(torch.full((40,), 1e4), start=0.01)  # long estimates, fine float32 resolution
    opt = zoft.build_optimizer(quad, {"name": "kernel", "eps": 1e-2}, {"name": "isotropic"},
                               {"name": "sgd", "lr": lr, "clip_norm": clip}, num_directions=n, seed=2)
    coefs = torch.tensor([[1.5], [-2.0], [0.25]], dtype=torch.float64)
    seeds = [11, 12, 13]
    z = [torch.cat([c for _, _, c in opt.perturber.direction_chunks(s, opt.blocks[0])]).double() for s in seeds]
    explicit = torch.linalg.vector_norm(sum(c * zi for c, zi in zip(coefs[:, 0], z))).item()
    assert opt.perturber.combination_norms(seeds, coefs)[0] == pytest.approx(explicit, rel=1e-6)  # fp32 Gram
    before = quad.theta.detach().clone()
    opt.step(quad)
    assert torch.linalg.vector_norm(quad.theta.detach() - before).item() == pytest.approx(lr * clip, rel=1e-4)
    with pytest.raises(zoft.ZoftError, match="clip_norm must be >= 0"):
        zoft.build_optimizer(quad, {"name": "spsa"}, {"name": "isotropic"}, {"name": "sgd", "clip_norm": -1})


def test_iterate_averaging_follows_its_recursion_and_replays_exactly():
    """c_{t+1} = c_t − ηĝ(x_t), y_{t+1} = x_t − (η/β_t)ĝ(x_t), x_t = y_t + (c_t − y_t)/β_t,
    β_t = 1 + t/6; checked against the recursion written out with the recorded steps."""
    quad = Quadratic(torch.linspace(0.5, 2.0, 30))
    start = quad.theta.detach().clone()
    opt = zoft.build_optimizer(quad, {"name": "kernel", "eps": 1e-2}, {"name": "isotropic"},
                               {"name": "sgd", "lr": 0.05, "average": True}, record=True, noise="gaussian")
    for _ in range(6):
        opt.step(quad)
    c, y = start.clone().double(), start.clone().double()
    for t, applied in enumerate(opt.history):
        z = torch.cat([ch for _, _, ch in opt.perturber.direction_chunks(applied.seeds[0], opt.blocks[0])]).double()
        step = applied.scales[0, 0] * z  # = −η ĝ
        beta = 1 + t / 6
        x = y + (c - y) / beta
        c, y = c + step, x + step / beta
        assert applied.mix == pytest.approx(1 / beta)
    torch.testing.assert_close(quad.theta.detach().double(), y, rtol=1e-5, atol=1e-6)
    final = quad.theta.detach().clone()
    with torch.no_grad():
        quad.theta.copy_(start)
    opt.replay(opt.history)
    assert torch.equal(quad.theta.detach(), final)
    with pytest.raises(zoft.ZoftError, match="average and weight_decay cannot be combined"):
        zoft.build_optimizer(quad, {"name": "spsa"}, {"name": "isotropic"},
                             {"name": "sgd", "average": True, "weight_decay": 0.1})
