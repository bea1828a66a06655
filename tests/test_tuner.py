import hashlib
import json
import warnings

import pytest
import torch
from torch import nn

import zoft
import zoft.estimators  # the test names its classes through the package
from zoft.blocks import collect_blocks
from zoft.errors import ZoftError
from zoft.perturbations import LearnedScale, LearnedScaleConfig
from zoft.tuner import BlockMLPs, fingerprint, load_tuner, read_tuner, save_tuner
from tests.conftest import tiny_llama


def test_batched_network_equals_per_block_reference_mlps():
    net = BlockMLPs(7, seed=3)
    x = torch.randn(7, 5)
    expected = []
    for b in range(7):
        mlp = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
        with torch.no_grad():
            mlp[0].weight.copy_(net.w1[b]), mlp[0].bias.copy_(net.b1[b])
            mlp[2].weight.copy_(net.w2[b]), mlp[2].bias.copy_(net.b2[b])
        expected.append(mlp(x[b]).abs())
    torch.testing.assert_close(net(x), torch.cat(expected), rtol=1e-6, atol=1e-7)
    assert sum(p.numel() for p in net.parameters()) == 7 * 449  # 449 parameters per block


def test_save_load_exact_and_fingerprint_checks(tmp_path):
    model = tiny_llama()
    blocks = collect_blocks(model)
    net = BlockMLPs(len(blocks), seed=1)
    path = tmp_path / "t" / "tuner.safetensors"
    save_tuner(path, net, blocks, {"base_model": "tiny-llama", "meta_train": {"steps": 3}})
    loaded, meta = load_tuner(path.parent, blocks)
    assert all(torch.equal(getattr(net, k), getattr(loaded, k)) for k in ("w1", "b1", "w2", "b2"))
    assert meta["fingerprint"] == fingerprint(blocks) and json.loads(meta["meta_train"]) == {"steps": 3}
    assert json.loads(meta["features"]) == ["mean", "var", "loss_plus_prev", "loss_minus_prev", "sigma_prev"]
    # a derivative checkpoint (same names and shapes, other values) loads
    load_tuner(path, collect_blocks(tiny_llama(seed=9)))
    # another architecture names its first differing block
    other = collect_blocks(tiny_llama(vocab=80))
    with pytest.raises(ZoftError, match=r"made for tiny-llama: block 0 is model.embed_tokens.weight \[64, 16\] there, "
                                        r"model.embed_tokens.weight \[80, 16\] in this model"):
        load_tuner(path, other)
    with pytest.raises(ZoftError, match="it has 20 blocks, this model 19"):
        load_tuner(path, collect_blocks(tiny_llama(tied=True))[:-1])


def test_truncated_corrupt_and_missing_files(tmp_path):
    blocks = collect_blocks(tiny_llama())
    path = tmp_path / "tuner.safetensors"
    save_tuner(path, BlockMLPs(len(blocks)), blocks, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ZoftError, match="not a readable tuner"):
        read_tuner(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ZoftError, match="not a readable tuner"):
        read_tuner(path)
    with pytest.raises(ZoftError, match="tuner file not found"):
        read_tuner(tmp_path / "nope.safetensors")
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_learned_scale_normalises_energy_and_tracks_stats_through_the_update():
    model = tiny_llama()
    blocks = collect_blocks(model)
    learned = LearnedScale(LearnedScaleConfig(dim_rule="numel"), net=BlockMLPs(len(blocks), seed=2))
    opt = zoft.ZOOptimizer(model, zoft.estimators.TwoPoint(zoft.estimators.SPSAConfig(eps=1e-2)), learned,
                           zoft.updates.SGD(zoft.updates.SGDConfig(lr=1e-2)))
    sigma, _ = learned.scales(blocks, opt.states["perturbation"], prev_losses=None)
    dims = torch.tensor([b.numel for b in blocks], dtype=torch.float64)
    assert (dims * torch.tensor(sigma, dtype=torch.float64) ** 2).sum().item() == pytest.approx(dims.sum().item(), rel=1e-9)
    assert len(set(sigma)) > 1
    ids = torch.randint(1, 64, (2, 6))
    opt.step(lambda: model(ids, labels=ids).loss)
    stats = torch.stack([torch.stack([b.param.mean(), b.param.var()]) for b in blocks]).detach()
    torch.testing.assert_close(opt.states["perturbation"].stats, stats, rtol=1e-5, atol=1e-7)
    assert opt.prev_losses is not None and not torch.equal(opt.states["perturbation"].sigma_prev, torch.ones(len(blocks)))


def test_held_blocks_get_no_perturbation_survive_save_and_load_and_never_move(tmp_path):
    model = tiny_llama()
    blocks = collect_blocks(model)
    held = torch.tensor([i % 3 == 0 for i in range(len(blocks))])
    path = tmp_path / "tuner.safetensors"
    save_tuner(path, BlockMLPs(len(blocks), seed=2, start="isotropic", held=held), blocks, {})
    assert json.loads(read_tuner(path)[1]["held"]) == [b.name for b, h in zip(blocks, held) if h]
    net, _ = load_tuner(path, blocks)
    assert torch.equal(net.held, held)
    learned = LearnedScale(LearnedScaleConfig(dim_rule="numel"), net=net)
    opt = zoft.ZOOptimizer(model, zoft.estimators.TwoPoint(zoft.estimators.SPSAConfig(eps=1e-2)), learned,
                           zoft.updates.SGD(zoft.updates.SGDConfig(lr=1e-1)))
    sigma = torch.tensor(learned.scales(blocks, opt.states["perturbation"], prev_losses=None)[0], dtype=torch.float64)
    dims = torch.tensor([b.numel for b in blocks], dtype=torch.float64)
    assert (sigma[held] == 0).all() and (sigma[~held] > 1).all()  # the free blocks carry the whole budget
    assert (dims * sigma**2).sum().item() == pytest.approx(dims.sum().item(), rel=1e-9)
    before = [b.param.detach().clone() for b in blocks]
    ids = torch.randint(1, 64, (2, 6))
    opt.step(lambda: model(ids, labels=ids).loss)
    moved = torch.tensor([not torch.equal(b.param, p) for b, p in zip(blocks, before)])
    assert torch.equal(moved, ~held)
    header = dict(read_tuner(path)[1], held=json.dumps(["model.no_such_block.weight"]))
    tensors = {k: getattr(net, k).detach().contiguous() for k in ("w1", "b1", "w2", "b2")}
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=header)
    with pytest.raises(ZoftError, match="holds blocks this model does not have"):
        load_tuner(path, blocks)


def test_reference_dim_rule_counts_embedding_rows():
    blocks = collect_blocks(tiny_llama())
    learned = LearnedScale(LearnedScaleConfig(batch_size=4, tokens_per_example=15), net=BlockMLPs(len(blocks)))
    learned.init(blocks)
    assert learned.dims[0].item() == 16 * 15 * 4 and blocks[0].is_embedding
    assert learned.dims[1].item() == blocks[1].numel


def test_finetune_with_a_tuner_file_and_its_errors(tmp_path, tiny_model_dir, capsys):
    from zoft.cli import main
    from zoft.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    blocks = collect_blocks(model)
    good = tmp_path / "good" / "tuner.safetensors"
    save_tuner(good, BlockMLPs(len(blocks)), blocks, {"base_model": "tiny", "estimator": {"name": "spsa", "eps": 1e-3}})
    args = ["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "runs"), "--steps", "2",
            "--num-train", "16", "--num-dev", "8", "--num-test", "8", "--batch-size", "4"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*meta-trained at eps")  # not for another estimator, nor its own eps
        assert main([*args, "--tuner", str(good.parent), "--estimator", "kernel", "--eps", "1e-2", "--run-name", "t"]) == 0
        assert main([*args, "--tuner", str(good.parent), "--estimator", "spsa", "--run-name", "t1"]) == 0
    with pytest.warns(UserWarning, match=r"good was meta-trained at eps 0.001 with spsa; this run uses eps 0.01"):
        assert main([*args, "--tuner", str(good.parent), "--eps", "1e-2", "--run-name", "t2"]) == 0
    config = json.loads((tmp_path / "runs" / "t" / "config.json").read_text())
    assert config["method"]["perturbation"]["name"] == "learned" and config["tuner_path"] == str(good.parent)
    assert config["tuner_sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()  # compare groups runs by it
    foreign = tmp_path / "foreign.safetensors"
    other = collect_blocks(tiny_llama(vocab=80))
    save_tuner(foreign, BlockMLPs(len(other)), other, {"base_model": "bigger-vocab"})
    for tuner, message in [(foreign, "was made for bigger-vocab: block 0"), (tmp_path / "none", "tuner file not found")]:
        assert main([*args, "--tuner", str(tuner)]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["t", "t1", "t2"]
    assert main([*args, "--tuner", "auto", "--run-name", "a"]) == 0
    assert "tuner: none shipped for these blocks; isotropic\n" in capsys.readouterr().err


def test_tuner_heatmap_draws_layer_by_module_type(tmp_path, tiny_model_dir, capsys):
    from zoft.cli import main
    from zoft.models import load_model
    from zoft.tuner_heatmap import effective_scales

    model, _ = load_model(str(tiny_model_dir))
    blocks = collect_blocks(model)
    save_tuner(tmp_path / "t" / "tuner.safetensors", BlockMLPs(len(blocks), seed=3), blocks, {"base_model": "tiny"})
    _, scales = effective_scales(tmp_path / "t", model)
    assert len(scales) == len(blocks) and len(set(scales)) > 1
    assert main(["tuner-heatmap", str(tmp_path / "t"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*.tmp.png"))
    assert main(["tuner-heatmap", str(tmp_path / "nope"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert "tuner file not found" in capsys.readouterr().err


def test_heatmap_columns_are_modules_or_lora_factors():
    from zoft.tuner_heatmap import _kind

    assert _kind("self_attn.q_proj") == "q_proj"
    assert _kind("self_attn.q_proj.lora_A.default") == "q_proj.lora_A"
    assert _kind("self_attn.v_proj.lora_B.default") == "v_proj.lora_B"
