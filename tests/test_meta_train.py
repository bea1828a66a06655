import json
import pytest
import torch
from torch.func import functional_call

import zoft
from zoft.blocks import collect_blocks
from zoft.perturbations import LearnedScale, LearnedScaleConfig
from zoft.tuner import BlockMLPs
from tests.conftest import tiny_llama

IDS = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(4))


def lm_loss(model, batch):
    return model(batch, labels=batch).loss


def tuner_optimizer(estimator=None, seed=0):
    model = tiny_llama()
    net = BlockMLPs(len(collect_blocks(model)), seed=seed)
    with torch.no_grad():  # σ_b = |b2_b|: the meta-gradient on b2 is then readable in closed form
        net.w2.zero_()
        net.b2.copy_(torch.linspace(-1.5, 2.0, net.b2.shape[0])[:, None])
    learned = LearnedScale(LearnedScaleConfig(dim_rule="numel"), net=net)
    estimator = estimator or {"name": "spsa", "eps": 1e-2}
    est, _, update = zoft.optimizer.make_parts(estimator, {"name": "isotropic"}, {"name": "sgd"})
    return zoft.ZOOptimizer(model, est, learned, update), net


@pytest.mark.parametrize("estimator", [{"name": "spsa", "eps": 1e-2}, {"name": "kernel", "eps": 1e-2, "r_mode": "block"}])
def test_meta_gradient_matches_its_closed_form_and_reaches_only_the_tuner(estimator):
    from meta_train.outer import direction, lookahead_loss

    opt, net = tuner_optimizer(estimator)
    lr_update, seed = 0.5, 123
    meta, lp, lm, raw, scale = lookahead_loss(opt, lm_loss, IDS, seed, opt.states["perturbation"], None, lr_update)
    meta.backward()
    assert all(p.grad is None for p in opt.model.parameters())
    assert net.b2.grad is not None and net.b2.grad.abs().sum() > 0

    # closed form, s_b = c σ_b and G_b = ∂meta/∂s_b = −η_u k_b ⟨∇_b L(θ′), z_b⟩:
    # ∂meta/∂σ_b = c G_b − (c d̃_b σ_b / Σ d̃σ²) Σ_j σ_j G_j, then × sign(b2_b) for σ_b = |b2_b|
    blocks = opt.blocks
    sigma = net.b2.detach().abs().squeeze(-1)
    dims = opt.perturbation.dims.float()
    c = (dims.sum() / (dims * sigma**2).sum()).sqrt()
    probe = opt.estimator.probe(seed, 0, len(blocks))
    k = torch.tensor(opt.estimator.estimate(None, [lp, lm], probe, 0)[0])
    z = {b.name: direction(opt, seed, b) for b in blocks}
    moved = {b.name: (b.param.detach() - lr_update * k[b.index] * c * sigma[b.index] * z[b.name]).requires_grad_()
             for b in blocks}
    loss = functional_call(opt.model, moved, (IDS,), {"labels": IDS}, strict=False).loss
    grads = torch.autograd.grad(loss, list(moved.values()))
    g_scale = torch.stack([-lr_update * k[b.index] * (g * z[b.name]).sum() for b, g in zip(blocks, grads)])
    expected = c * g_scale - c * dims * sigma / (dims * sigma**2).sum() * (sigma * g_scale).sum()
    expected = expected * torch.sign(net.b2.detach().squeeze(-1))
    # the normalisation makes σ's overall size free: the meta-gradient has no component along σ
    assert abs(float((expected * net.b2.detach().squeeze(-1)).sum())) < 1e-6 * float(expected.abs().sum())
    torch.testing.assert_close(net.b2.grad.squeeze(-1), expected, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(scale, c * sigma)
    torch.testing.assert_close(raw, sigma)


def test_the_look_ahead_loss_is_taken_on_the_meta_batch_at_the_step_estimated_on_the_batch():
    from meta_train.outer import direction, lookahead_loss

    other = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(5))
    opt, net = tuner_optimizer()
    lr_update, seed = 0.5, 123
    meta, lp, lm, _, scale = lookahead_loss(opt, lm_loss, IDS, seed, opt.states["perturbation"], None, lr_update,
                                            meta_batch=other)
    same = lookahead_loss(opt, lm_loss, IDS, seed, opt.states["perturbation"], None, lr_update)
    assert (lp, lm) == same[1:3]  # the step is estimated on the step's batch either way
    probe = opt.estimator.probe(seed, 0, len(opt.blocks))
    k = opt.estimator.estimate(None, [lp, lm], probe, 0)[0]
    moved = {b.name: b.param.detach() - lr_update * k[b.index] * scale[b.index] * direction(opt, seed, b)
             for b in opt.blocks}
    with torch.no_grad():
        expected = functional_call(opt.model, moved, (other,), {"labels": other}, strict=False).loss
        at_start = lm_loss(opt.model, other)
    torch.testing.assert_close(meta.detach(), expected)
    assert not torch.isclose(meta.detach(), same[0].detach()) and not torch.isclose(expected, at_start)


def test_the_unrolled_meta_gradient_is_the_exact_gradient_of_the_loss_after_k_steps_with_coefficients_held():
    """θ_K = θ_0 − Σ_t η_t k_t s_t z_t is linear in the scales once the coefficients k_t are held: the
    surrogate's gradient in the tuner's weights must equal autograd through that θ_K."""
    from meta_train.outer import direction, recorded_step, unrolled_loss

    other = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(5))
    opt, net = tuner_optimizer()
    learned, blocks = opt.perturbation, opt.blocks
    start = {b.name: b.param.detach().clone() for b in blocks}
    steps = [recorded_step(opt, lambda: lm_loss(opt.model, IDS), t, lr) for t, lr in [(7, 0.05), (8, 0.02), (9, 0.04)]]
    surrogate, meta_loss = unrolled_loss(opt, lm_loss, other, steps)
    surrogate.backward()

    net_b2 = net.b2.detach().clone().requires_grad_()
    scale = (learned.dims.sum() / (learned.dims * net_b2.squeeze(-1).double() ** 2).sum()).sqrt() * net_b2.squeeze(-1).abs()
    moved = {b.name: start[b.name] - sum(st.lr * st.coef[b.index] * scale[b.index].float() * direction(opt, st.seed, b)
                                         for st in steps) for b in blocks}
    for b in blocks:  # the engine's steps put the weights where the formula does
        torch.testing.assert_close(b.param.detach(), moved[b.name].detach(), rtol=1e-4, atol=1e-6)
    loss = functional_call(opt.model, moved, (other,), {"labels": other}, strict=False).loss
    assert meta_loss == pytest.approx(loss.item(), rel=1e-4)
    expected, = torch.autograd.grad(loss, net_b2)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(net.b2.grad, expected, rtol=2e-3, atol=1e-8)
    assert all(p.grad is None for p in opt.model.parameters())


def _run_segment(opt, start, b2, batches, meta_batch, first, lrs):
    """L(θ_K) on the meta batch after the segment's ZO steps from ``start`` with the tuner's b2 set to ``b2``."""
    with torch.no_grad():
        for b, p0 in zip(opt.blocks, start):
            b.param.copy_(p0)
        opt.perturbation.net.b2.copy_(b2)
        opt.states["perturbation"], opt.prev_losses = opt.perturbation.init(opt.blocks), None
        for t, (batch, lr) in enumerate(zip(batches, lrs)):
            opt.step_count = first + t
            opt.step(lambda: lm_loss(opt.model, batch), lr=lr)
        return lm_loss(opt.model, meta_batch).item()


def test_es_is_the_antithetic_difference_of_two_runs_of_one_segment_from_one_start():
    from meta_train.outer import es_gradient

    gen = torch.Generator().manual_seed(6)
    batches, meta_batch = [torch.randint(1, 64, (3, 7), generator=gen) for _ in range(3)], IDS
    opt, net = tuner_optimizer()
    with torch.no_grad():  # σ then reads the tuner's inputs, which both runs must start from alike
        net.w2.copy_(0.05 * torch.randn(net.w2.shape, generator=gen))
    net.free[2] = 0  # a held block gets no noise
    start = [b.param.detach().clone() for b in opt.blocks]
    b2 = net.b2.detach().clone()
    opt.states["perturbation"], opt.prev_losses = opt.perturbation.init(opt.blocks), None
    grad, plus, minus = es_gradient(opt, lm_loss, meta_batch, batches, 5, [0.05, 0.04, 0.03], 0.2, noise_seed=11)
    assert torch.equal(net.b2, b2)  # the tuner is left where it was
    xi = grad * b2 / ((plus - minus) / 0.4)  # ĝ = (L⁺ − L⁻)/(2·size)·ξ/b2
    assert xi[2].item() == 0 and xi.abs().sum() > 0
    end = [b.param.detach().clone() for b in opt.blocks]
    lrs = [0.05, 0.04, 0.03]
    assert plus == pytest.approx(_run_segment(opt, start, b2 * torch.exp(0.2 * xi), batches, meta_batch, 5, lrs), rel=1e-5)
    assert minus == pytest.approx(_run_segment(opt, start, b2 * torch.exp(-0.2 * xi), batches, meta_batch, 5, lrs), rel=1e-5)
    assert plus != minus
    for got, want in zip(end, (b.param.detach() for b in opt.blocks)):  # the model ends at θ_K⁻
        torch.testing.assert_close(got, want)


def test_es_averages_to_the_gradient_of_the_loss_after_k_steps_in_each_blocks_scale():
    """Over many draws of ξ (the same segment: batches and directions), ES's mean is the derivative
    of L(θ_K) in each block's b2, here taken by central differences one block at a time."""
    from meta_train.outer import es_gradient

    gen = torch.Generator().manual_seed(8)
    batches, meta_batch, lrs = [torch.randint(1, 64, (3, 7), generator=gen) for _ in range(2)], IDS, [0.05, 0.05]
    opt, net = tuner_optimizer()
    start = [b.param.detach().clone() for b in opt.blocks]
    b2 = net.b2.detach().clone()
    exact = torch.zeros_like(b2)
    for i in range(b2.shape[0]):
        bump = torch.zeros_like(b2)
        bump[i] = 1e-2
        exact[i] = (_run_segment(opt, start, b2 + bump, batches, meta_batch, 0, lrs)
                    - _run_segment(opt, start, b2 - bump, batches, meta_batch, 0, lrs)) / 2e-2
    total = torch.zeros_like(b2)
    draws = 400
    for k in range(draws):
        with torch.no_grad():
            for b, p0 in zip(opt.blocks, start):
                b.param.copy_(p0)
        opt.states["perturbation"], opt.prev_losses = opt.perturbation.init(opt.blocks), None
        total += es_gradient(opt, lm_loss, meta_batch, batches, 0, lrs, 1e-2, noise_seed=k)[0]
    assert exact.abs().max() > 0
    # in log b2, where ES searches (in b2 itself a block with b2 near 0 divides its noise by b2)
    cosine = torch.nn.functional.cosine_similarity((total * b2).flatten(), (exact * b2).flatten(), dim=0)
    assert cosine > 0.9, cosine


def test_es_meta_training_moves_only_each_blocks_output_bias_and_says_so_on_its_card(tmp_path, tiny_model_dir):
    from meta_train.train import MetaTrainConfig, meta_train
    from zoft.tuner import read_tuner

    records = []
    path = meta_train(MetaTrainConfig(output=str(tmp_path / "es"), model=str(tiny_model_dir), tasks="tweets",
                                      restart_every=4, batch_size=4, num_train=16, lr_llm=1e-2, lr_tuner=1e-2,
                                      trajectory="zo", meta_batch="other", objective="es", horizon=2, steps=4),
                      log=records.append)
    tensors, _ = read_tuner(path)
    initial = BlockMLPs(tensors["w1"].shape[0], seed=0, start="isotropic")
    assert [r["step"] for r in records] == [2, 4]  # one record a segment
    assert all(r["meta_loss"] == pytest.approx((r["meta_loss_plus"] + r["meta_loss_minus"]) / 2) for r in records)
    assert not torch.equal(tensors["b2"], initial.b2.detach())
    assert all(torch.equal(tensors[k], getattr(initial, k).detach()) for k in ("w1", "b1", "w2"))
    card = (tmp_path / "es" / "README.md").read_text()
    assert "--objective es" in card and "--es-size 0.1" in card and "with ES, the mean of its two runs" in card
    assert "--lr-update" not in card


def test_a_zo_trajectory_moves_the_llm_by_the_engines_own_steps(tmp_path, tiny_model_dir, monkeypatch):
    """--trajectory zo: the LLM takes one ZOOptimizer step per meta-step (the paper's first-order
    trajectory takes none), and --meta-batch other reads a second batch per step."""
    from meta_train.train import MetaTrainConfig, meta_train

    calls = []
    real = zoft.ZOOptimizer.step
    monkeypatch.setattr(zoft.ZOOptimizer, "step", lambda self, closure, lr=None: calls.append(lr) or real(self, closure, lr))
    base = dict(model=str(tiny_model_dir), tasks="tweets", restart_every=2, batch_size=4, num_train=16, lr_update=1e-2,
                lr_llm=1e-2, steps=4)
    records = []
    meta_train(MetaTrainConfig(output=str(tmp_path / "fo"), **base), log=records.append)
    assert calls == []
    meta_train(MetaTrainConfig(output=str(tmp_path / "zo"), trajectory="zo", meta_batch="other", **base),
               log=records.append)
    assert calls == pytest.approx([1e-2, 5e-3, 1e-2, 5e-3])  # the restart period's linear decay
    fo, zo = records[:4], records[4:]
    assert all(r["loss"] == r["trajectory_loss"] for r in fo)  # the same batch, at θ
    assert all(r["loss"] != r["trajectory_loss"] for r in zo)  # another batch, and L(θ + εs z)
    card = (tmp_path / "zo" / "README.md").read_text()
    assert "--trajectory zo --meta-batch other" in card and "task's next batch" in card
    # the card's command lists what the run read: a ZO trajectory has no SGD momentum or clip, a look-ahead no horizon
    first_order = (tmp_path / "fo" / "README.md").read_text()
    assert "--momentum 0.8 --clip 1.0" in first_order and "--momentum" not in card and "--clip" not in card
    assert "--horizon" not in card + first_order and "--kernel-order" not in card and "--peft" not in card


def test_segments_per_update_steps_the_tuner_once_on_the_mean_of_that_many_segments(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    from meta_train.train import MetaTrainConfig, meta_train

    updates = []
    real = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        updates.append([p.grad.clone() for p in self.param_groups[0]["params"]])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    # lr-tuner ~0: the tuner does not move, so both runs see the same segments
    base = dict(model=str(tiny_model_dir), tasks="tweets", restart_every=4, batch_size=4, num_train=16, lr_llm=1e-2,
                trajectory="zo", meta_batch="other", objective="unroll", horizon=2, steps=4, lr_tuner=1e-12)
    meta_train(MetaTrainConfig(output=str(tmp_path / "each"), **base))
    assert len(updates) == 2
    each, updates[:] = list(updates), []
    meta_train(MetaTrainConfig(output=str(tmp_path / "pair"), segments_per_update=2, **base))
    assert len(updates) == 1
    for got, a, b in zip(updates[0], *each):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-4, atol=1e-9)
    with pytest.raises(zoft.ZoftError, match="segments-per-update must be >= 1 and divide the 2 segments"):
        MetaTrainConfig(output="x", **{**base, "segments_per_update": 3})


def test_the_card_command_names_only_the_adapter_flags_its_peft_reads():
    from meta_train.train import MetaTrainConfig
    from zoft.config import command_flags

    lora = MetaTrainConfig(output="x", peft="lora", objective="unroll", trajectory="zo", meta_batch="other", horizon=5,
                           restart_every=100, steps=600)
    assert lora.adapter_flags() == "--peft lora --lora-r 8 --lora-alpha 16.0 --lora-dropout 0.0"
    flags = command_flags(lora, skip=lora.unread_fields())
    assert "--lora-r 8" in flags and "--prefix-tokens" not in flags and "--horizon 5" in flags
    assert "--lr-update" not in flags and "--lr-llm 1e-05" in flags
    assert MetaTrainConfig(output="x", peft="prefix").adapter_flags() == "--peft prefix --prefix-tokens 5"


def test_meta_training_changes_the_tuner_writes_a_loadable_artifact_and_resumes(tmp_path, tiny_model_dir):
    from meta_train.train import MetaTrainConfig, meta_train
    from zoft.models import load_model
    from zoft.tuner import load_tuner, read_tuner

    base = dict(output=str(tmp_path / "tuner"), model=str(tiny_model_dir), tasks="tweets", restart_every=2,
                batch_size=4, num_train=16, lr_update=1e-2)
    records = []
    path = meta_train(MetaTrainConfig(**base, steps=2), log=records.append)
    first, meta = read_tuner(path)
    assert [r["step"] for r in records] == [1, 2] and meta["meta_train_step"] == "2"
    initial = BlockMLPs(first["w1"].shape[0], seed=0, start="isotropic")
    assert not torch.equal(first["w2"], initial.w2.detach())  # the tuner moved
    model, _ = load_model(str(tiny_model_dir))
    load_tuner(path, collect_blocks(model))  # loadable for the model it was made for
    meta_train(MetaTrainConfig(**base, steps=4), log=records.append)  # resumes at step 2
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    lines = (tmp_path / ".tuner.meta-train" / "meta_train.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert sorted(p.name for p in (tmp_path / "tuner").iterdir()) == ["README.md", "meta_train_curve.png",
                                                                        "scales.png", "tuner.safetensors"]
    card = (tmp_path / "tuner" / "README.md").read_text()
    assert "zoft meta-train --output" in card and "--steps 4" in card
    from huggingface_hub import ModelCard

    hub = ModelCard.load(tmp_path / "tuner" / "README.md")
    assert hub.data.library_name == "zoft" and hub.data.datasets == ["tweets"] and "perturbation-tuner" in hub.data.tags
    assert hub.data.base_model == str(tiny_model_dir)
    assert (tmp_path / "tuner" / "meta_train_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "tuner" / "scales.png").read_bytes()[:4] == b"\x89PNG" and "![effective scales](scales.png)" in card
    with pytest.raises(zoft.ZoftError, match="other settings"):
        meta_train(MetaTrainConfig(**{**base, "lr_tuner": 0.5}, steps=6))


@pytest.mark.parametrize("flag, value, message", [("start", "zeros", "start must be isotropic or random"),
                                                  ("tuner_optimizer", "lbfgs", "tuner-optimizer must be adam or sgd"),
                                                  ("lr_tuner", 0.0, "lr-tuner must be > 0"),
                                                  ("trajectory", "adam", "trajectory must be first-order or zo"),
                                                  ("meta_batch", "dev", "meta-batch must be same or other"),
                                                  ("objective", "pes", "objective must be lookahead, unroll or es"),
                                                  ("objective", "unroll", "pass --trajectory zo --meta-batch other"),
                                                  ("objective", "es", "pass --trajectory zo --meta-batch other"),
                                                  ("es_size", 0.0, "es-size must be > 0")])
def test_meta_train_config_errors(flag, value, message):
    from meta_train.train import MetaTrainConfig

    with pytest.raises(zoft.ZoftError, match=message):
        MetaTrainConfig(output="x", **{flag: value})


def test_a_prior_allocation_is_the_tuners_start_and_its_zeros_stay_held(tmp_path, tiny_model_dir):
    from meta_train.train import MetaTrainConfig, meta_train
    from zoft.block_scales import read_block_scales, save_block_scales
    from zoft.models import load_model
    from zoft.tuner import load_tuner

    model, _ = load_model(str(tiny_model_dir))
    blocks = collect_blocks(model)
    prior_sigma = torch.linspace(0.5, 3.0, len(blocks)) * torch.tensor([i % 4 != 1 for i in range(len(blocks))])
    prior = tmp_path / "prior.safetensors"
    save_block_scales(prior, blocks, prior_sigma)
    records = []
    base = dict(model=str(tiny_model_dir), tasks="tweets", restart_every=2, batch_size=4, num_train=16,
                lr_update=1e-2, lr_llm=1e-2, trajectory="zo", meta_batch="other", prior=str(prior))
    path = meta_train(MetaTrainConfig(output=str(tmp_path / "t"), steps=2, lr_tuner=1e-9, **base), log=records.append)
    net, _ = load_tuner(path, blocks)
    assert torch.equal(net.held, prior_sigma == 0)
    learned = LearnedScale(LearnedScaleConfig(batch_size=4), net=net)
    state = learned.init(blocks)
    torch.testing.assert_close(torch.tensor(learned.scales(blocks, state)[0]),
                               torch.tensor(read_block_scales(str(prior), blocks, 4)), rtol=0.02, atol=0)
    assert all(r["sigma_min"] == 0 for r in records)
    path = meta_train(MetaTrainConfig(output=str(tmp_path / "moved"), steps=2, lr_tuner=0.1, **base))
    assert torch.equal(load_tuner(path, blocks)[0].held, prior_sigma == 0)  # meta-training never frees a held block
    card = (tmp_path / "moved" / "README.md").read_text()
    assert "the prior's allocation" in card and f"--prior {prior}" in card and "--start" not in card
    with pytest.raises(zoft.ZoftError, match="cannot be combined with --start random"):
        MetaTrainConfig(output="x", prior=str(prior), start="random")
    with pytest.raises(zoft.ZoftError, match="prior file not found"):
        MetaTrainConfig(output="x", prior=str(tmp_path / "none.safetensors"))


def test_isotropic_start_gives_sigma_near_one_for_any_input():
    net = BlockMLPs(5, seed=3, start="isotropic")
    x = torch.randn(5, 5) * torch.tensor([1.0, 1e-3, 3.0, 3.0, 2.0])
    torch.testing.assert_close(net(x), torch.ones(5), atol=0.05, rtol=0)
    random = BlockMLPs(5, seed=3)(x)
    assert (random - 1).abs().max() > 0.2  # nn.Linear's init: an arbitrary spread


def test_zoft_never_imports_meta_train():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(zoft.__file__).parent
    assert not [p for p in root.rglob("*.py") if "meta_train" in p.read_text().replace("meta_train/", "")
                and ("import meta_train" in p.read_text() or "from meta_train" in p.read_text())]
    code = ("import sys, zoft, zoft.cli, zoft.finetune, zoft.grid, zoft.compare, zoft.tuner;"
            "assert not [m for m in sys.modules if m.startswith('meta_train')]")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("how", [{}, {"trajectory": "zo", "meta_batch": "other", "lr_llm": 1e-2},
                                 {"trajectory": "zo", "meta_batch": "other", "lr_llm": 1e-2, "objective": "unroll",
                                  "horizon": 3, "restart_every": 6},
                                 {"trajectory": "zo", "meta_batch": "other", "lr_llm": 1e-2, "objective": "unroll",
                                  "horizon": 3, "restart_every": 6, "segments_per_update": 2},
                                 {"trajectory": "zo", "meta_batch": "other", "lr_llm": 1e-2, "objective": "es",
                                  "horizon": 3, "restart_every": 6}],
                         ids=["first-order", "zo", "unroll", "unroll-2-segments-per-update", "es"])
def test_meta_train_kill_9_then_resume_writes_the_same_tuner_bit_for_bit(tmp_path, tiny_model_dir, how):
    import sys

    from meta_train.train import MetaTrainConfig, meta_train
    from tests.test_resume import _kill_at_random_step
    from zoft.tuner import read_tuner

    args = {**dict(model=str(tiny_model_dir), tasks="tweets", restart_every=3, batch_size=4, num_train=16,
                   lr_update=1e-2, lr_tuner=1e-2, steps=24), **how}
    straight = meta_train(MetaTrainConfig(output=str(tmp_path / "a"), **args))
    cmd = [sys.executable, "-m", "zoft.cli", "meta-train", "--output", str(tmp_path / "b"),
           *[x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
    records = 24 // args.get("horizon", 1) if args.get("objective") in ("unroll", "es") else 24  # one per segment
    killed_at = _kill_at_random_step(cmd, tmp_path / ".b.meta-train", records, seed=7, marker='"meta_loss"',
                                     log="meta_train.jsonl")
    resumed = meta_train(MetaTrainConfig(output=str(tmp_path / "b"), **args))
    # safetensors writes its metadata map in hash order, so the bytes of two equal headers can
    # differ: equal means every tensor bit for bit and every header field
    (ta, ma), (tb, mb) = read_tuner(resumed), read_tuner(straight)
    assert ma == mb and all(torch.equal(ta[k], tb[k]) for k in ta), f"killed at step {killed_at}"
    logs = [[{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in
             (tmp_path / f".{n}.meta-train" / "meta_train.jsonl").read_text().splitlines()] for n in "ab"]
    assert logs[0] == logs[1] and len(logs[0]) == records


def test_a_resume_reads_the_tuner_from_its_checkpoint_not_from_an_artifact_written_after_it(tmp_path, tiny_model_dir):
    """The artifact is written just before the checkpoint: a kill between the two leaves the artifact a
    period ahead of the checkpoint it resumes from, and the resumed run must not start from it."""
    from meta_train.train import MetaTrainConfig, meta_train
    from zoft.tuner import read_tuner, save_tuner

    args = dict(model=str(tiny_model_dir), tasks="tweets", restart_every=3, batch_size=4, num_train=16, lr_update=1e-2)
    straight = meta_train(MetaTrainConfig(output=str(tmp_path / "a"), steps=6, **args))
    meta_train(MetaTrainConfig(output=str(tmp_path / "b"), steps=3, **args))
    tensors, meta = read_tuner(tmp_path / "b" / "tuner.safetensors")
    ahead = BlockMLPs(tensors["w1"].shape[0], seed=5)  # as if the next period's weights had landed
    from zoft.models import load_model

    save_tuner(tmp_path / "b" / "tuner.safetensors", ahead, collect_blocks(load_model(str(tiny_model_dir))[0]), meta)
    resumed = meta_train(MetaTrainConfig(output=str(tmp_path / "b"), steps=6, **args))
    (ta, _), (tb, _) = read_tuner(resumed), read_tuner(straight)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_meta_train_with_lora_makes_a_tuner_for_the_adapters_that_only_a_lora_fine_tune_loads(tmp_path, tiny_model_dir,
                                                                                              capsys):
    """--peft lora meta-trains the tuner on the adapter blocks the fine-tune will perturb: a --peft
    lora fine-tune loads it, a full-parameter one refuses it by name, and the card says how to use it."""
    from zoft.cli import main
    from zoft.tuner import read_tuner

    out = tmp_path / "lora-tuner"
    assert main(["meta-train", "--output", str(out), "--model", str(tiny_model_dir), "--tasks", "tweets", "--steps", "2",
                 "--restart-every", "2", "--batch-size", "4", "--num-train", "16", "--lr-update", "1e-2",
                 "--lr-llm", "1e-3", "--peft", "lora", "--lora-r", "4"]) == 0
    _, meta = read_tuner(out / "tuner.safetensors")
    names = [n for n, _ in json.loads(meta["blocks"])]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert json.loads(meta["meta_train"])["peft"] == "lora"
    card = (out / "README.md").read_text()
    assert "zoft finetune --peft lora --lora-r 4 --lora-alpha 16.0 --lora-dropout 0.0 --tuner" in card
    assert "zoft meta-train --peft lora --lora-r 4" in card  # the command that made it rebuilds the same adapters
    run = ["finetune", "--model", str(tiny_model_dir), "--steps", "2", "--num-train", "8", "--num-dev", "4",
           "--num-test", "4", "--batch-size", "4", "--tuner", str(out), "--output-dir", str(tmp_path / "runs")]
    assert main([*run, "--peft", "lora", "--lora-r", "4"]) == 0
    assert main(["tuner-heatmap", str(out), "--model", str(tiny_model_dir), "--out", str(tmp_path / "h.png")]) == 0
    capsys.readouterr()
    assert main([*run, "--run-name", "full"]) != 0
    assert "was made for" in capsys.readouterr().err


def test_meta_train_help_describes_its_own_objective_not_the_fine_tunes(capsys):
    from zoft.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["meta-train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lookahead (the paper's" in text and "or es (the same L" in text
    assert "what ZO minimises on a batch" not in text
