"""bench/ceiling_predict.py --at RUN:STEP: statistics at the weights a run reached, rebuilt from its trajectory."""

import torch
from safetensors.torch import load_file

from zoft.cli import main as zoft_main
from conftest import bench_script

ceiling = bench_script("ceiling_predict")


def test_at_a_lora_run_s_step_a_blocks_are_held_only_while_b_is_zero(tmp_path, tiny_model_dir, capsys):
    """At step 0 (B = 0) every lora_A block has no curvature and gets σ 0; after steps that moved B it
    has curvature and a σ: the statistics are taken at the rebuilt weights, not the base model's.
    Where nothing is measured, the tables say – rather than NaN."""
    assert zoft_main(["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "r",
                      "--peft", "lora", "--steps", "3", "--num-train", "1000", "--num-dev", "8", "--num-test", "8",
                      "--batch-size", "4", "--eval-every", "3", "--lr", "5e-2", "--eps", "1e-2"]) == 0
    zero_a = {}
    for step in (0, 3):
        out = tmp_path / f"alloc{step}"
        ceiling.main(["--at", f"{tmp_path / 'r'}:{step}", "--task", "tweets", "--batches", "8",
                      "--oracle-dir", str(tmp_path / "none"), "--out", str(out)])
        assert "nan" not in capsys.readouterr().out.lower()  # no signal to share out: – rather than NaN
        sigma = load_file(out / "curv-all-a1.safetensors")["sigma"]
        names = [b.name for b in ceiling.collect_blocks(ceiling.rebuilt_model(tmp_path / "r", step)[0])]
        a_blocks = torch.tensor(["lora_A" in n for n in names])
        assert a_blocks.any() and (~a_blocks).any()
        zero_a[step] = bool((sigma[a_blocks] == 0).all())
        assert (sigma[~a_blocks] > 0).all()
    assert zero_a == {0: True, 3: False}


def test_a_shaping_that_perturbs_no_weight_with_a_gradient_gains_nothing():
    """R is 0 and there is no best lr (not 0/0) for D that misses every weight with a gradient; a D
    equal to isotropic directions scores R 1 at SPSA's lr."""
    ref = tuple(torch.tensor(x, dtype=torch.float64) for x in (2.0, 8.0, 3.0))
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert ceiling.shaping_score(zero, zero, zero, 0.1, ref) == (0.0, None)
    assert ceiling.shaping_score(*ref, 1.0, ref) == (1.0, 1.0)


def test_label_row_scores_come_from_the_label_words_rows(tiny_model_dir):
    """Statistics that hold their signal on the task's label rows alone: those rows alone gain
    over isotropic directions, and scaling them up closes in on that from below. The same
    statistics on other rows of the output embedding gain nothing from the label rows. A model
    whose output embedding is not trained (peft adapters) gets no such rows."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = ceiling.load_model(str(tiny_model_dir))
    blocks = ceiling.collect_blocks(model)
    cand = ceiling.candidate_token_ids(ceiling.get_task("tweets"), tokenizer)
    weight = model.get_output_embeddings().weight
    head = next(i for i, b in enumerate(blocks) if b.param is weight)

    def stats(signal_rows):
        S = [torch.full((b.numel,), 1e-3) for b in blocks]
        S[head].view(-1, blocks[head].row_len)[signal_rows] = 1.0
        return S, [torch.ones(b.numel) for b in blocks], [torch.ones(b.numel) for b in blocks]

    numel = sum(b.numel for b in blocks)

    def scores(signal_rows):
        S, B, T = stats(signal_rows)
        ref = tuple(torch.stack([x.double().sum() for x in X]).sum() for X in (S, B, T))
        return ceiling.label_row_scores(model, tokenizer, "tweets", blocks, S, B, T,
                                      lambda *sums: ceiling.shaping_score(*sums[:3], sums[3] / numel, ref))

    gains, shares = scores(cand)
    on_label_rows = [r for r, _ in gains.values()]
    assert shares["S"] > 0.5 and shares["B"] == shares["T"] == len(cand) * weight.shape[1] / numel
    assert on_label_rows[0] < on_label_rows[1] < on_label_rows[2] <= on_label_rows[3] and on_label_rows[3] > 10
    elsewhere = torch.tensor([i for i in range(weight.shape[0]) if i not in cand.tolist()][: len(cand)])
    assert all(r < 1 for r, _ in scores(elsewhere)[0].values())
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert ceiling.label_row_scores(lora, tokenizer, "tweets", ceiling.collect_blocks(lora), *stats(cand), None) == ({}, {})


def test_a_scales_file_made_for_a_mask_is_scored_on_that_mask(tmp_path, tiny_model_dir):
    """``zoft meta-allocate --fraction`` records its mask in the file's note, and the prediction
    reads it back; a file with a free-text note, or none, has no mask."""
    import json

    blocks = ceiling.collect_blocks(ceiling.load_model(str(tiny_model_dir))[0])
    sigma = torch.ones(len(blocks))
    notes = {"masked": json.dumps({"tasks": ["rte"], "mask": {"fraction": 0.1, "keep": "largest"}}),
             "whole": json.dumps({"tasks": ["rte"], "mask": None}), "text": "sigma^2 ~ (S_b/T_b)^2", "none": ""}
    for name, note in notes.items():
        ceiling.save_block_scales(tmp_path / f"{name}.safetensors", blocks, sigma, note=note)
    masks = {name: ceiling.file_mask(tmp_path / f"{name}.safetensors") for name in notes}
    assert masks == {"masked": {"fraction": 0.1, "keep": "largest"}, "whole": None, "text": None, "none": None}
