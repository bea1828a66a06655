import math

import pytest
import torch

import zoft
from zoft.rng import derive
from tests.conftest import Quadratic, tiny_llama

IDS = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(1))


def lm_loss(model):
    return model(IDS, labels=IDS).loss


def _run(noise, seed=5, steps=4):
    model = tiny_llama()
    opt = zoft.mezo(model, lr=1e-2, eps=1e-2, noise=noise, seed=seed)
    losses = [opt.step(lambda: lm_loss(model)) for _ in range(steps)]
    return model, losses


@pytest.mark.parametrize("noise", ["table", "gaussian"])
def test_same_seed_same_trajectory(noise):
    (m1, l1), (m2, l2) = _run(noise), _run(noise)
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert _run(noise, seed=6)[1] != l1


@pytest.mark.parametrize("noise", ["table", "gaussian"])
def test_n_direction_step_is_mean_of_one_direction_estimates(noise):
    n, lr, eps = 3, 1e-2, 1e-2
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = zoft.mezo(model, lr=lr, eps=eps, noise=noise, num_directions=n, seed=9)
    opt.step(lambda: lm_loss(model))
    moved = [p.detach() - b for p, b in zip(model.parameters(), before)]

    # Reference: each direction alone, measured at the same θ, estimates averaged by hand.
    ref = tiny_llama()
    probe = zoft.mezo(ref, lr=lr, eps=eps, noise=noise)
    expected = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(n):
        seed = derive(9, 0, i)
        with torch.no_grad():
            with probe.perturber.active(seed, [eps] * len(probe.blocks)):
                lp = lm_loss(ref).item()
            with probe.perturber.active(seed, [-eps] * len(probe.blocks)):
                lm = lm_loss(ref).item()
        g = (lp - lm) / (2 * eps)
        for b, e in zip(probe.blocks, expected):
            z = torch.cat([c for _, _, c in probe.perturber.direction_chunks(seed, b)])
            e.add_(z.view_as(e), alpha=-lr * g / n)
    for m, e in zip(moved, expected):
        torch.testing.assert_close(m, e, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("noise", ["table", "gaussian"])
def test_zo_sgd_decreases_a_quadratic(noise):
    quad = Quadratic(torch.linspace(0.5, 2.0, 50))
    opt = zoft.mezo(quad, lr=0.01, eps=1e-3, noise=noise)
    start = quad().item()
    for _ in range(300):
        opt.step(quad)
    assert quad().item() < 0.3 * start


def test_one_step_lowers_the_loss_on_average():
    """The sign test: a wrong sign in the update would raise the loss on average."""
    drops = []
    for seed in range(40):
        quad = Quadratic(torch.ones(200))
        opt = zoft.mezo(quad, lr=0.002, eps=1e-3, seed=seed)
        before = quad().item()
        opt.step(quad)
        drops.append(before - quad().item())
    assert sum(drops) / len(drops) > 0


@pytest.mark.parametrize("perturbation", ["isotropic", "magnitude_mask"])
def test_replay_rebuilds_weights_bit_identically(perturbation):
    """Also in pieces: a mask's thresholds are the run's own, not recomputed from moved weights."""
    model = tiny_llama()
    initial = [p.detach().clone() for p in model.parameters()]
    opt = zoft.build_optimizer(model, {"name": "spsa", "eps": 1e-2}, {"name": perturbation},
                               {"name": "sgd", "lr": 1e-2, "weight_decay": 0.1}, record=True)
    for _ in range(5):
        opt.step(lambda: lm_loss(model))
    final = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), initial):
            p.copy_(p0)
    opt.replay(opt.history[:3])
    partial = [p.detach().clone() for p in model.parameters()]
    opt.replay(opt.history[3:])
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), final))
    assert not all(torch.equal(p, f) for p, f in zip(partial, final))


@pytest.mark.filterwarnings("ignore:.*never read by the loss")
def test_weight_decay_skips_norms():
    model = tiny_llama()
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    opt = zoft.build_optimizer(model, {"name": "spsa"}, {"name": "isotropic"},
                               {"name": "sgd", "lr": 0.5, "weight_decay": 1.0})
    opt.step(lambda: torch.tensor(1.0))  # equal losses: g = 0, only decay can move weights
    for n, p in model.named_parameters():
        if n in norms:
            assert torch.equal(p, norms[n])
        else:
            assert torch.allclose(p, tiny_llama().state_dict()[n] * 0.5)


@pytest.mark.filterwarnings("ignore:.*never read by the loss")
def test_non_finite_loss_raises_and_leaves_weights_unchanged():
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = zoft.mezo(model)
    with pytest.raises(zoft.ZoftError, match="non-finite loss at step 0"):
        opt.step(lambda: torch.tensor(math.nan))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_linear_schedule_and_config_errors():
    model = tiny_llama()
    opt = zoft.build_optimizer(model, {"name": "spsa"}, {"name": "isotropic"},
                               {"name": "sgd", "lr": 1.0, "schedule": "linear", "total_steps": 4})
    assert [opt.update.lr(t) for t in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    for bad, msg in [({"name": "spsa", "eps": 0}, "eps must be a finite number > 0"), ({"name": "nope"}, "unknown estimator")]:
        with pytest.raises(zoft.ZoftError, match=msg):
            zoft.build_optimizer(model, bad, {"name": "isotropic"}, {"name": "sgd"})
    with pytest.raises(zoft.ZoftError, match="lr must be a finite number > 0"):
        zoft.mezo(model, lr=-1)
    with pytest.raises(zoft.ZoftError, match="num_directions must be >= 1"):
        zoft.mezo(model, num_directions=0)


def test_warns_about_tensors_the_loss_never_reads():
    model = tiny_llama(tied=False)
    opt = zoft.mezo(model)
    with pytest.warns(UserWarning, match="never read by the loss"):
        opt.step(lambda: model.get_decoder()(IDS).last_hidden_state.sum())  # lm_head unused


def test_master_weights_keep_the_updates_that_bf16_weights_lose():
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3))

    def run(master):
        model = tiny_llama(dtype=torch.bfloat16)
        start = [p.detach().float().clone() for p in model.parameters()]
        opt = zoft.mezo(model, lr=1e-6, eps=1e-2, master_weights=master, record=True)
        for _ in range(20):
            opt.step(lambda: model(ids, labels=ids).loss)
        return model, opt, start

    def distance(tensors, start):
        return sum(float((t.detach().float() - s).norm()) ** 2 for t, s in zip(tensors, start)) ** 0.5

    plain, _, plain_start = run(False)
    model, opt, start = run(True)
    assert all(m.dtype == torch.float32 for m in opt.master)
    # the updates (about 1e-6 a step) sit below most weights' bf16 resolution: most are lost
    # unless they add up in the fp32 master first
    assert distance(plain.parameters(), plain_start) < 0.5 * distance(opt.master, start)
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(model.parameters(), opt.master))
    tuned = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    opt.replay(opt.history)  # replays through a fresh master: the same weights, bit for bit
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), tuned))
