"""zoft meta-allocate: gradient and Fisher statistics per weight, the allocation built from them,
and the file it writes."""

import json

import pytest
import torch
import torch.nn.functional as F

from meta_train.allocation import allocation, statistics
from zoft.cli import main
from zoft.data import Batches, candidate_token_ids, collate, encode
from zoft.models import load_model
from zoft.scoring import task_logits
from zoft.tasks import get_task, sample_splits


def _per_example_grads(model, batch, cand, labels):
    out = []
    for j in range(len(labels)):
        model.zero_grad(set_to_none=True)
        one = {k: v[j : j + 1] for k, v in batch.items()}
        F.cross_entropy(task_logits(model, one, cand), labels[j : j + 1]).backward()
        out.append(torch.cat([p.grad.view(-1).clone() for p in model.parameters()]))
    return torch.stack(out)


def test_statistics_equal_their_definitions_from_per_example_gradients(tiny_model_dir):
    """S from distinct batches' products, B the mean square, T the signed sum over sampled labels:
    rebuilt here one example at a time, with the same batches and the same random draws."""
    model, tok = load_model(str(tiny_model_dir))
    k, size, seed = 3, 4, 7
    blocks, (S, B, T) = statistics(model, tok, "tweets", batches=k, batch_size=size, num_train=16, seed=seed)
    task = get_task("tweets")
    cand = candidate_token_ids(task, tok)
    stream = Batches(encode(task, sample_splits(task, None, 16, 200, 1, 0).train, tok, 256), size, seed, tok.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    grads, fisher = [], 0
    for _ in range(k):
        batch = collate(stream.next_items(), tok.pad_token_id)
        grads.append(_per_example_grads(model, batch, cand, batch["labels"]).mean(0))
        with torch.no_grad():
            drawn = torch.multinomial(task_logits(model, batch, cand).softmax(-1), 1, generator=gen).view(-1)
            signs = torch.randint(0, 2, drawn.shape, generator=gen).float() * 2 - 1
        fisher = fisher + (signs[:, None] * _per_example_grads(model, batch, cand, drawn)).sum(0) ** 2
    g = torch.stack(grads)
    total = g.sum(0)
    expected = {"S": (total**2 - (g**2).sum(0)) / (k * (k - 1)), "B": (g**2).mean(0), "T": fisher / (k * size)}
    for name, ours in zip("SBT", (S, B, T)):
        torch.testing.assert_close(torch.cat(ours), expected[name], rtol=1e-4, atol=1e-9, msg=name)


def test_allocation_follows_signal_per_curvature_across_tasks_and_clips():
    one = torch.tensor([1.0, 4.0, 16.0, 1e4, -3.0])
    sigma = allocation([one], alpha=1.0, spread=10.0)
    var = sigma**2
    assert var[0] < var[1] < var[2]  # more signal per unit of curvature, more perturbation
    median = var.median()
    torch.testing.assert_close(var[3], median * 10)  # clipped above ...
    torch.testing.assert_close(var[4], median / 10)  # ... and a block with no measured signal below
    two = allocation([one, one * torch.tensor([4.0, 1.0, 1.0, 1.0, 1.0])], alpha=1.0, spread=1e9)
    torch.testing.assert_close(two[0] ** 2 / two[1] ** 2, torch.tensor(2.0 / 4.0))  # geometric mean over tasks


def test_a_held_block_gets_zero_and_leaves_the_median_to_the_others():
    ratios = torch.tensor([1.0, 4.0, 16.0, 0.0, 0.0])
    sigma = allocation([ratios], alpha=1.0, spread=2.0, held=torch.tensor([False, False, False, True, True]))
    torch.testing.assert_close(sigma[3:], torch.zeros(2))
    torch.testing.assert_close(sigma[:3] ** 2, torch.tensor([2.0, 4.0, 8.0]))  # median 4 of the three, clip x2


def test_meta_allocate_with_lora_holds_the_A_blocks_and_the_lora_fine_tune_reads_it(tmp_path, tiny_model_dir):
    """peft starts B at zero, so A's gradient is zero on every batch: the allocation holds A (σ 0)
    and spreads the perturbation over the B blocks; a --peft lora fine-tune accepts the file."""
    from safetensors import safe_open

    out = tmp_path / "lora.safetensors"
    assert main(["meta-allocate", "--model", str(tiny_model_dir), "--tasks", "tweets", "--batches", "2",
                 "--batch-size", "4", "--num-train", "16", "--peft", "lora", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        sigma, names, note = f.get_tensor("sigma"), json.loads(f.metadata()["blocks"]), json.loads(f.metadata()["note"])
    kinds = [".lora_A." in n for n in names]
    assert len(names) == 8 and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert (sigma[torch.tensor(kinds)] == 0).all() and (sigma[~torch.tensor(kinds)] > 0).all()
    assert note["peft"]["peft"] == "lora" and note["peft"]["lora_r"] == 8
    run = ["finetune", "--model", str(tiny_model_dir), "--steps", "2", "--num-train", "8", "--num-dev", "4",
           "--num-test", "4", "--batch-size", "4", "--perturbation", "block_scales", "--scales-file", str(out)]
    assert main([*run, "--peft", "lora", "--output-dir", str(tmp_path / "runs")]) == 0


def test_meta_allocate_writes_a_file_fine_tuning_reads_and_another_model_refuses(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "alloc.safetensors"
    common = ["--model", str(tiny_model_dir), "--tasks", "tweets", "--batches", "2", "--batch-size", "4",
              "--num-train", "16"]
    assert main(["meta-allocate", *common, "--out", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["alloc.safetensors"]  # no partial file left
    run = ["finetune", "--model", str(tiny_model_dir), "--steps", "2", "--num-train", "8", "--num-dev", "4",
           "--num-test", "4", "--batch-size", "4", "--perturbation", "block_scales", "--scales-file", str(out)]
    assert main([*run, "--output-dir", str(tmp_path / "runs")]) == 0
    from tests.conftest import tiny_llama, tiny_tokenizer

    other = tmp_path / "other"
    tiny_llama(tied=False).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    capsys.readouterr()
    assert main([*run[:2], str(other), *run[3:], "--output-dir", str(tmp_path / "runs2")]) == 2
    assert "made for other blocks" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [("--batches", "1", "at least 2"), ("--alpha", "0", "alpha > 0")])
def test_meta_allocate_bad_settings_stop_in_one_line(tmp_path, capsys, flag, value, message):
    out = tmp_path / "a.safetensors"
    assert main(["meta-allocate", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("zoft: error:") == 1 and not out.exists()


def test_a_masked_allocation_is_computed_on_the_weights_the_mask_keeps(tmp_path, tiny_model_dir):
    from safetensors import safe_open

    common = ["meta-allocate", "--model", str(tiny_model_dir), "--tasks", "tweets", "--batches", "2",
              "--batch-size", "4", "--num-train", "16", "--spread", "1e9"]
    sigmas = {}
    for name, extra in (("full", []), ("masked", ["--fraction", "0.2", "--keep", "largest"])):
        assert main([*common, *extra, "--out", str(tmp_path / f"{name}.safetensors")]) == 0
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as f:
            sigmas[name], note = f.get_tensor("sigma"), json.loads(f.metadata()["note"])
    assert note["mask"] == {"fraction": 0.2, "keep": "largest"}
    ratio = sigmas["masked"] / sigmas["full"]
    assert ratio.max() > 1.05 * ratio.min()  # a different split between blocks, not a rescaling


def test_scales_file_auto_reads_the_allocation_shipped_for_these_blocks_and_records_it(tmp_path, tiny_model_dir,
                                                                                        capsys, monkeypatch):
    import zoft.block_scales
    from tests.conftest import tiny_llama
    from zoft.block_scales import save_block_scales
    from zoft.blocks import collect_blocks

    run = ["finetune", "--model", str(tiny_model_dir), "--steps", "2", "--num-train", "8", "--num-dev", "4",
           "--num-test", "4", "--batch-size", "4", "--perturbation", "block_scales", "--scales-file", "auto",
           "--output-dir", str(tmp_path / "runs")]
    assert main([*run, "--run-name", "none"]) == 2
    err = capsys.readouterr().err
    assert "no allocation ships for this model" in err and err.count("zoft: error:") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    # same block names, other shapes (a larger vocabulary): not this model's, for auto nor by path
    foreign = tmp_path / "a" / "allocation.safetensors"
    foreign.parent.mkdir()
    other = collect_blocks(tiny_llama(vocab=80))
    save_block_scales(foreign, other, torch.linspace(0.5, 2, len(other)))
    ours = tmp_path / "b" / "allocation-full.safetensors"
    ours.parent.mkdir()
    blocks = collect_blocks(load_model(str(tiny_model_dir))[0])
    assert [b.name for b in blocks] == [b.name for b in other]
    save_block_scales(ours, blocks, torch.linspace(0.5, 2, len(blocks)))
    monkeypatch.setattr(zoft.block_scales, "shipped_tuners", lambda pattern: [foreign, ours])
    assert main([*run, "--run-name", "auto"]) == 0
    assert f"scales: {ours}" in capsys.readouterr().err
    assert main([*run[:-6], *run[-2:], "--tuner", "auto", "--run-name", "tuner"]) == 0  # a hint, not a silent isotropic run
    assert f"isotropic (--perturbation block_scales --scales-file auto reads the allocation {ours}" in capsys.readouterr().err
    config = json.loads((tmp_path / "runs" / "auto" / "config.json").read_text())
    assert config["method"]["perturbation"]["scales_file"] == str(ours)  # a resume reads the same file
    by_path = [*run[:-3], str(foreign), *run[-2:]]
    assert main([*by_path, "--run-name", "foreign"]) == 2
    assert "made for other blocks" in capsys.readouterr().err


def test_a_truncated_headerless_or_misshapen_scales_file_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    import zoft
    from tests.conftest import tiny_llama
    from zoft.block_scales import read_block_scales, save_block_scales
    from zoft.blocks import collect_blocks

    blocks = collect_blocks(tiny_llama())
    good = tmp_path / "good.safetensors"
    save_block_scales(good, blocks, torch.linspace(0.5, 2, len(blocks)))
    assert len(read_block_scales(str(good), blocks, 4)) == len(blocks)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-20])
    headerless = tmp_path / "headerless.safetensors"
    save_file({"sigma": torch.ones(len(blocks), dtype=torch.float64)}, str(headerless))
    short = tmp_path / "short.safetensors"
    save_block_scales(short, blocks, torch.ones(len(blocks) - 1))
    for path, message in [(truncated, "cannot read block scales"), (headerless, "no block list"),
                          (short, f"not one value per block \\({len(blocks)}\\)"), (tmp_path / "none", "cannot read")]:
        with pytest.raises(zoft.ZoftError, match=message):
            read_block_scales(str(path), blocks, 4)
