"""The registry and its pieces: every piece builds from a JSON spec and steps; the mutations
that once passed every test now fail one here."""

import ast
import json
from pathlib import Path

import pytest
import torch

import zoft
from zoft import registry
from zoft.blocks import collect_blocks
from zoft.noise import NoiseTable
from zoft.perturbations import LearnedScale, LearnedScaleConfig
from zoft.tuner import BlockMLPs
from tests.conftest import Quadratic, tiny_llama

IDS = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
DEFAULTS = {"estimator": {"name": "spsa", "eps": 1e-2}, "perturbation": {"name": "isotropic"},
            "update": {"name": "sgd", "lr": 1e-2}}


def _direction(opt, seed, block):
    return torch.cat([z for _, _, z in opt.perturber.direction_chunks(seed, block)]).view_as(block.param)


@pytest.mark.parametrize("kind", ["estimator", "perturbation", "update", "noise"])
def test_every_registered_piece_builds_from_a_json_spec_and_takes_a_step(kind, tmp_path):
    model = tiny_llama()
    for name in registry.names(kind):
        spec = {"name": name, **_required(name, tmp_path, model)}
        spec = json.loads(json.dumps(registry.full_spec(kind, spec)))  # what a run records, read back
        parts = {**DEFAULTS, kind: spec} if kind != "noise" else DEFAULTS
        opt = zoft.build_optimizer(model, **{k: parts[k] for k in DEFAULTS},
                                   noise=spec if kind == "noise" else "table")
        before = [b.param.detach().clone() for b in opt.blocks]
        opt.step(lambda: model(IDS, labels=IDS).loss)
        assert any(not torch.equal(b.param, x) for b, x in zip(opt.blocks, before)), f"{kind} {name} moved nothing"


def _required(name, tmp_path, model) -> dict:
    """The settings a piece cannot do without: a file to read."""
    if name == "learned":
        return {"path": str(_tuner(tmp_path, model))}
    if name in ("block_scales", "scaled_mask"):
        from zoft.block_scales import save_block_scales

        blocks = collect_blocks(model)
        save_block_scales(tmp_path / "sigma.safetensors", blocks, torch.linspace(0.5, 2, len(blocks)))
        return {"scales_file": str(tmp_path / "sigma.safetensors")}
    return {}


def _tuner(tmp_path, model):
    from zoft.tuner import save_tuner

    path = tmp_path / "tuner.safetensors"
    blocks = collect_blocks(model)
    save_tuner(path, BlockMLPs(len(blocks), seed=1), blocks, {"base_model": "tiny", "dim_rule": "numel"})
    return path


def test_registry_rejects_duplicates_and_unknown_settings():
    with pytest.raises(KeyError, match="already registered"):
        registry.register("update", "sgd", None)(object)
    with pytest.raises(KeyError, match="lowercase"):
        registry.register("update", "SGD2", None)
    with pytest.raises(zoft.ZoftError, match=r"unknown settings \['lrr'\]"):
        registry.build("update", {"name": "sgd", "lrr": 1.0})
    with pytest.raises(zoft.ZoftError, match="unknown update 'adamw'"):
        registry.build("update", {"name": "adamw"})


def test_table_noise_differs_between_blocks_of_the_same_shape():
    """Mutation: offsets that ignore the block index give every block the same z."""
    model = tiny_llama()
    blocks = collect_blocks(model)
    same_shape = [b for b in blocks if b.param.shape == blocks[1].param.shape]
    assert len(same_shape) >= 2
    table = NoiseTable()
    a, b = (table.chunk(5, blk, 0, blk.numel, "cpu") for blk in same_shape[:2])
    assert not torch.equal(a, b)


def test_a_step_under_a_learned_sigma_moves_each_block_by_exactly_lr_c_sigma_z(tmp_path):
    """Mutation: σ dropped from the update (the estimate would use u = z, not σz)."""
    model = tiny_llama()
    blocks = collect_blocks(model)
    learned = LearnedScale(LearnedScaleConfig(dim_rule="numel"), net=BlockMLPs(len(blocks), seed=2))
    lr, eps = 1e-2, 1e-2
    est, _, update = zoft.optimizer.make_parts({"name": "spsa", "eps": eps}, {"name": "isotropic"},
                                               {"name": "sgd", "lr": lr})
    opt = zoft.ZOOptimizer(model, est, learned, update, seed=4)
    before = [b.param.detach().double().clone() for b in opt.blocks]
    opt.step(lambda: model(IDS, labels=IDS).loss)
    sigma = opt.last_scales
    assert max(sigma) > 1.5 * min(sigma)  # the scales differ, so dropping them would show
    c = (opt.last["loss_plus"] - opt.last["loss_minus"]) / (2 * eps)
    seed = zoft.rng.derive(4, 0, 0)
    for b, x in zip(opt.blocks, before):
        expected = x - lr * c * sigma[b.index] * _direction(opt, seed, b).double()
        torch.testing.assert_close(b.param.detach().double(), expected, rtol=0, atol=1e-6)


def test_scaled_mask_moves_only_kept_weights_by_lr_c_sigma_z(tmp_path):
    """Per-block σ from the file and the mask from the weights, both in the step."""
    from zoft.block_scales import save_block_scales

    model = tiny_llama()
    blocks = collect_blocks(model)
    save_block_scales(tmp_path / "s.safetensors", blocks, torch.linspace(0.5, 2, len(blocks)))
    lr, eps = 1e-2, 1e-2
    opt = zoft.build_optimizer(model, {"name": "spsa", "eps": eps}, {"name": "scaled_mask", "fraction": 0.5,
                               "keep": "largest", "scales_file": str(tmp_path / "s.safetensors")},
                               {"name": "sgd", "lr": lr}, seed=4)
    before = [b.param.detach().double().clone() for b in opt.blocks]
    opt.step(lambda: model(IDS, labels=IDS).loss)
    sigma = opt.last_scales
    assert max(sigma) > 3 * min(sigma)  # the file's scales, not ones
    c = (opt.last["loss_plus"] - opt.last["loss_minus"]) / (2 * eps)
    tau = opt.states["perturbation"].thresholds
    for b, x in zip(opt.blocks, before):
        seed = zoft.rng.derive(4, 0, 0)
        z = torch.cat([opt.perturber.noise.chunk(seed, b, k, n, "cpu") for k, _, n in b.chunks()]).view_as(x)
        kept = (x.abs() > tau[b.index]).double()
        torch.testing.assert_close(b.param.detach().double(), x - lr * c * sigma[b.index] * z.double() * kept,
                                   rtol=0, atol=1e-6)


def test_tuner_features_put_the_last_loss_plus_before_the_loss_minus():
    """Mutation: L⁺ and L⁻ swapped in the tuner's features."""
    blocks = collect_blocks(tiny_llama())
    net = BlockMLPs(len(blocks), seed=0)
    with torch.no_grad():  # σ_b = |w1[b, 0, 2]·L⁺ + b2|: reads L⁺ alone
        net.w1.zero_(), net.b1.zero_(), net.w2.zero_(), net.b2.fill_(0.1)
        net.w1[:, 0, 2] = 1.0
        net.w2[:, 0, 0] = 1.0
    learned = LearnedScale(LearnedScaleConfig(dim_rule="numel"), net=net)
    state = learned.init(blocks)
    sigma = learned.sigma(state, (2.0, 0.5))
    torch.testing.assert_close(sigma, torch.full_like(sigma, abs(torch.tanh(torch.tensor(2.0)).item() + 0.1)))


def test_clipping_never_scales_up_a_short_block():
    """Mutation: clipping by C/‖ĝ_b‖ without the min(1, ·) scales short estimates up to C."""
    class TwoBlocks(torch.nn.Module):  # SPSA's ĝ_b = g z_b: its norm grows as sqrt(d_b)
        def __init__(self):
            super().__init__()
            self.short, self.long = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4096))

        def forward(self):
            return 0.5 * (self.short**2).sum() + 0.5 * (self.long**2).sum()

    def moves(clip):
        quad = TwoBlocks()
        opt = zoft.build_optimizer(quad, {"name": "spsa", "eps": 1e-3}, {"name": "isotropic"},
                                   {"name": "sgd", "lr": 1e-3, "clip_norm": clip}, seed=0)
        opt.step(quad)
        return [(b.param.detach() - 1).norm().item() / 1e-3 for b in opt.blocks]  # ‖ĝ_b‖ after clipping

    short, long = moves(0.0)
    clip = (short * long) ** 0.5  # between the two
    assert short < clip < long
    clipped_short, clipped_long = moves(clip)
    assert clipped_short == short and clipped_long == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize("keep", ["smallest", "largest"])
def test_magnitude_mask_perturbs_only_the_chosen_weights(keep):
    model = tiny_llama()
    opt = zoft.build_optimizer(model, DEFAULTS["estimator"], {"name": "magnitude_mask", "fraction": 0.25, "keep": keep},
                               DEFAULTS["update"])
    opt.perturber.shaper = opt.perturbation.shaper(opt.states["perturbation"])
    for b in opt.blocks:
        z = _direction(opt, 9, b)
        tau = opt.states["perturbation"].thresholds[b.index]
        chosen = b.param.detach().abs() <= tau if keep == "smallest" else b.param.detach().abs() > tau
        assert torch.equal(z != 0, chosen)
        if b.param.dim() == 2:  # norm weights start all equal (1.0): the mask keeps all or none of them
            assert abs(chosen.float().mean().item() - 0.25) < 1 / b.numel + 1e-6
    opt.step(lambda: model(IDS, labels=IDS).loss)  # and the mask follows the weights as they move


def test_momentum_re_emits_past_seeds_with_geometric_weights():
    quad = Quadratic(torch.linspace(1, 2, 6))
    opt = zoft.build_optimizer(quad, {"name": "spsa", "eps": 1e-3}, {"name": "isotropic"},
                               {"name": "momentum", "lr": 1e-2, "beta": 0.5, "window": 2}, record=True)
    for _ in range(3):
        opt.step(quad)
    first, second, third = opt.history
    assert len(first.seeds) == 1 and len(second.seeds) == len(third.seeds) == 2
    assert third.seeds[1] == second.seeds[0]  # the last step's direction comes back once
    torch.testing.assert_close(third.scales[1], 0.5 * second.scales[0])


def test_no_function_in_zoft_is_over_60_lines():
    long = []
    for path in Path(zoft.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long


def test_a_zero_block_scale_holds_that_block_and_gives_its_share_to_the_others(tmp_path):
    """bench/lora_scales.py --a 0 holds LoRA's A matrices so: a zero σ must neither perturb nor
    move its block, and the normalisation (Σ d̃ σ² fixed) raises every other block's σ."""
    from zoft.block_scales import save_block_scales

    model = tiny_llama()
    blocks = collect_blocks(model)
    held = {b.index for b in blocks if b.index % 2 == 0}
    save_block_scales(tmp_path / "s.safetensors", blocks, torch.tensor([0.0 if b.index in held else 1.0 for b in blocks]))
    lr, eps = 1e-2, 1e-2
    opt = zoft.build_optimizer(model, {"name": "spsa", "eps": eps},
                               {"name": "block_scales", "scales_file": str(tmp_path / "s.safetensors")},
                               {"name": "sgd", "lr": lr}, seed=4)
    before = [b.param.detach().double().clone() for b in opt.blocks]
    opt.step(lambda: model(IDS, labels=IDS).loss)
    sigma = opt.last_scales
    assert all(sigma[i] == 0 for i in held) and all(sigma[b.index] > 1 for b in opt.blocks if b.index not in held)
    c = (opt.last["loss_plus"] - opt.last["loss_minus"]) / (2 * eps)
    seed = zoft.rng.derive(4, 0, 0)
    for b, x in zip(opt.blocks, before):
        if b.index in held:
            assert torch.equal(b.param.detach().double(), x), b.name
        else:
            torch.testing.assert_close(b.param.detach().double(), x - lr * c * sigma[b.index] * _direction(opt, seed, b).double(),
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["block_scales", "scaled_mask"])
def test_a_scales_schedule_switches_rows_at_its_steps_and_replays(tmp_path, name):
    """Row k of a schedule is the step's σ from from_step[k] on; the run replays bit for bit."""
    from zoft.block_scales import read_scale_schedule, save_block_scales

    model = tiny_llama()
    blocks = collect_blocks(model)
    rows = torch.stack([torch.linspace(0.5, 2, len(blocks)), torch.linspace(2, 0.5, len(blocks))])
    save_block_scales(tmp_path / "s.safetensors", blocks, rows, from_step=[0, 2], energy=[1.0, 0.25])
    (_, first), (_, second) = read_scale_schedule(str(tmp_path / "s.safetensors"), blocks, 16)
    save_block_scales(tmp_path / "one.safetensors", blocks, rows[1])
    (_, alone), = read_scale_schedule(str(tmp_path / "one.safetensors"), blocks, 16)
    torch.testing.assert_close(torch.tensor(second), torch.tensor(alone) * 0.5)  # energy 1/4: σ halved
    spec = {"name": name, "scales_file": str(tmp_path / "s.safetensors"), **({"fraction": 0.5} if name == "scaled_mask" else {})}
    opt = zoft.build_optimizer(model, {"name": "spsa", "eps": 1e-2}, spec, {"name": "sgd", "lr": 1e-2}, seed=4, record=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    used = []
    for _ in range(4):
        opt.step(lambda: model(IDS, labels=IDS).loss)
        used.append(opt.last_scales)
    assert used == [first, first, second, second] and first != second
    end = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    again = zoft.build_optimizer(model, {"name": "spsa", "eps": 1e-2}, spec, {"name": "sgd", "lr": 1e-2}, seed=4)
    again.replay(opt.history)
    assert all(torch.equal(v, end[k]) for k, v in model.state_dict().items())


def test_a_malformed_scales_schedule_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    from zoft.block_scales import read_block_scales, read_scale_schedule, save_block_scales

    blocks = collect_blocks(tiny_llama())
    rows = torch.ones(2, len(blocks))
    cases = {"late_start": [1, 3], "not_rising": [0, 0], "too_few": [0]}
    for label, steps in cases.items():
        save_block_scales(tmp_path / f"{label}.safetensors", blocks, rows, from_step=steps)
    save_block_scales(tmp_path / "no_steps.safetensors", blocks, rows)
    for label in [*cases, "no_steps"]:
        with pytest.raises(zoft.ZoftError, match="a schedule needs from_step"):
            read_scale_schedule(str(tmp_path / f"{label}.safetensors"), blocks, 4)
    for label, energy in {"negative": [1.0, -1.0], "zero": [1.0, 0.0], "nan": [1.0, float("nan")], "short": [1.0]}.items():
        save_block_scales(tmp_path / f"{label}.safetensors", blocks, rows, from_step=[0, 5], energy=energy)
        with pytest.raises(zoft.ZoftError, match="energy must be one positive number per row"):
            read_scale_schedule(str(tmp_path / f"{label}.safetensors"), blocks, 4)
    save_block_scales(tmp_path / "good.safetensors", blocks, rows, from_step=[0, 5])
    assert [start for start, _ in read_scale_schedule(str(tmp_path / "good.safetensors"), blocks, 4)] == [0, 5]
    with pytest.raises(zoft.ZoftError, match="holds a schedule of 2 allocations"):
        read_block_scales(str(tmp_path / "good.safetensors"), blocks, 4)
    save_file({"sigma": torch.ones(2, 2, len(blocks), dtype=torch.float64)}, str(tmp_path / "cube.safetensors"),
              metadata={"blocks": json.dumps([b.name for b in blocks])})
    with pytest.raises(zoft.ZoftError, match="not one value per block"):
        read_scale_schedule(str(tmp_path / "cube.safetensors"), blocks, 4)


def test_scale_schedule_stacks_allocation_files_with_their_steps_and_energies(tmp_path, capsys):
    """bench/scale_schedule.py: rows in order, from_step and energy as given; files for other
    blocks, and a schedule given as a row, are refused."""
    import importlib.util

    from zoft.block_scales import read_scale_schedule, save_block_scales

    spec = importlib.util.spec_from_file_location("scale_schedule", Path(__file__).parents[1] / "bench" / "scale_schedule.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    blocks = collect_blocks(tiny_llama())
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_block_scales(first, blocks, torch.linspace(0.5, 2, len(blocks)))
    save_block_scales(second, blocks, torch.linspace(2, 0.5, len(blocks)))
    out = tmp_path / "s.safetensors"
    stack.main(["--out", str(out), str(first), f"{second}@7", "--energy", "1,0.25"])
    (s0, row0), (s1, row1) = read_scale_schedule(str(out), blocks, 16)
    (_, alone0), = read_scale_schedule(str(first), blocks, 16)
    (_, alone1), = read_scale_schedule(str(second), blocks, 16)
    assert (s0, s1) == (0, 7) and row0 == alone0
    torch.testing.assert_close(torch.tensor(row1), torch.tensor(alone1) * 0.5)
    other = collect_blocks(tiny_llama())[:-1]
    save_block_scales(tmp_path / "other.safetensors", other, torch.ones(len(other)))
    for files, message in [([str(first), f"{tmp_path / 'other.safetensors'}@3"], "different blocks"),
                           ([str(first), f"{out}@3"], "is a schedule already")]:
        with pytest.raises(SystemExit, match=message):
            stack.main(["--out", str(tmp_path / "x.safetensors"), *files])
