"""--head-init probe: the label rows fitted on frozen features, and every path that rebuilds a run
(best-dev selection, resume, zoft replay) starting from them."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from zoft.cli import main
from zoft.data import Encoded
from zoft.head import L2_GRID, answer_features, choose_l2, fit_probe
from zoft.scoring import evaluate

CAND = torch.tensor([2, 3])  # ' terrible', ' great' in the tiny tokenizer


def _items(n: int, seed: int, informative: bool) -> list[Encoded]:
    """Prompts of random words; the label is set by the last word (informative) or at random."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        ids = [rng.randrange(4, 18) for _ in range(rng.randint(3, 6))]
        label = int(ids[-1] % 2 == 0) if informative else rng.randrange(2)
        items.append(Encoded(ids, label))
    return items


def test_probe_moves_only_the_label_rows_and_fits_what_the_features_hold():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items = _items(80, 0, informative=True)
    acc_before = evaluate(model, items, CAND, pad_id=0)["acc"]
    head, metrics = fit_probe(model, items, CAND, pad_id=0, batch_size=16, device="cpu")
    head.apply(model)
    acc_after = evaluate(model, items, CAND, pad_id=0)["acc"]
    assert acc_before < 0.7 < 0.9 < acc_after  # the last word decides the answer state's class
    assert metrics["head/train_acc"] == pytest.approx(acc_after, abs=0.05)  # the fit is the model's own head
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}  # tied: one tensor, two names
    weight = model.get_output_embeddings().weight
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[CAND] = False
    assert torch.equal(weight[others], before["lm_head.weight"][others])


def test_cross_validation_pulls_hard_when_the_features_say_nothing():
    model = tiny_llama()
    rows0 = model.get_output_embeddings().weight[CAND].detach().double()
    chosen = {}
    for informative in (True, False):
        states, labels = answer_features(model, _items(80, 1, informative), 0, 16, "cpu")
        chosen[informative], held_out = choose_l2(model, states, labels, rows0, None, seed=0)
        assert set(held_out) == set(L2_GRID)
    assert chosen[False] == max(L2_GRID) and chosen[True] < max(L2_GRID)


RUN = ["--num-train", "40", "--num-dev", "16", "--num-test", "16", "--batch-size", "4", "--eval-batch-size", "8",
       "--lr", "2e-3", "--eps", "1e-2", "--head-init", "probe"]


@pytest.mark.parametrize("extra", [[], ["--dtype", "bf16", "--master-weights"]], ids=["fp32", "bf16+master"])
def test_a_probe_run_starts_from_its_rows_and_replays_to_the_saved_model(tmp_path, tiny_model_dir, extra):
    args = ["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "r",
            "--steps", "8", "--eval-every", "4", "--save-model", *RUN, *extra]
    assert main(args) == 0
    run = tmp_path / "r"
    # this run's best dev is before its last step, so best-dev selection rebuilds it too
    assert json.loads((run / "summary.json").read_text())["selected_step"] < 8
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["head/l2"] in L2_GRID
    assert [x["forward_passes"] for x in lines if "dev/acc" in x][0] == 10  # 40 examples, batch 4
    assert [x["forward_passes"] for x in lines if "train/loss" in x][-1] == 10 + 16
    rows = load_file(run / "trajectory.safetensors")["head/rows"]
    base = load_file(tiny_model_dir / "model.safetensors")
    key = next(k for k in base if k.endswith("embed_tokens.weight"))
    assert not torch.equal(rows.float(), base[key][CAND].to(rows.dtype).float())
    assert main(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    for f in (run / "model").iterdir():
        assert f.read_bytes() == (tmp_path / "replayed" / f.name).read_bytes(), f.name
    assert "from a head start" in (run / "model" / "README.md").read_text()


@pytest.mark.parametrize("adapters", [["--peft", "lora", "--lora-r", "2"], ["--peft", "prefix", "--prefix-tokens", "2"]],
                         ids=["lora", "prefix"])
def test_a_peft_run_from_a_head_start_saves_adapters_that_peft_loads_with_the_fitted_rows(tmp_path, tiny_model_dir,
                                                                                          adapters):
    """The rows live in the frozen embedding, not in the adapters: the saved folder must carry them,
    or PeftModel.from_pretrained would rebuild the base model's rows under trained adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = ["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "r",
            "--steps", "4", "--eval-every", "2", "--save-model", *adapters, *RUN]
    assert main(args) == 0
    run = tmp_path / "r"
    rows = load_file(run / "trajectory.safetensors")["head/rows"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "model")
    assert torch.equal(loaded.get_output_embeddings().weight[CAND], rows)
    assert torch.equal(loaded.get_input_embeddings().weight[CAND], rows)  # tied, as in the run
    assert main(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    for f in (run / "model").iterdir():
        assert f.read_bytes() == (tmp_path / "replayed" / f.name).read_bytes(), f.name


def test_a_head_share_fits_the_probe_on_one_part_and_trains_zo_on_the_rest(tmp_path, tiny_model_dir):
    """--head-share 0.25: the probe sees 10 of the 40 examples (3 batches of 4), ZO's batches the
    other 30 alone; the split is the config's, so a resumed run trains on the same part."""
    from zoft.finetune import FinetuneConfig, head_split

    train = list(range(40))
    head, zo = head_split(train, FinetuneConfig(head_init="probe", head_share=0.25))
    assert head == train[:10] and zo == train[10:]
    assert head_split(train, FinetuneConfig(head_init="probe")) == (train, train)
    assert head_split(train, FinetuneConfig()) == ([], train)
    args = ["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "r",
            "--steps", "2", "--eval-every", "2", *RUN, "--head-share", "0.25"]
    assert main(args) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["split_sizes"]["head"] == 10 and config["split_sizes"]["train"] == 30
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["forward_passes"] for x in lines if "train/loss" in x] == [3 + 2, 3 + 4]


@pytest.mark.parametrize("args, message", [
    (["--head-init", "lp"], "head-init must be none or probe"),
    (["--head-share", "0.5"], "it needs --head-init probe"),
    (["--head-init", "probe", "--head-share", "0"], "head-share must be in (0, 1]"),
    (["--head-init", "probe", "--head-share", "1.5"], "head-share must be in (0, 1]"),
    (["--head-init", "probe", "--num-train", "20", "--num-dev", "4", "--head-share", "0.99"], "leaves none of the 20"),
    (["--head-init", "probe", "--task", "copa", "--data-dir", "../shared/data"], "needs a classification task"),
])
def test_probe_errors(tmp_path, tiny_model_dir, capsys, args, message):
    code = main(["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "runs"), "--steps", "2",
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("zoft: error: ") and message in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_fp32_master_copy_keeps_the_fitted_rows(tmp_path, tiny_model_dir):
    """bf16 with --master-weights: the steps write the master copy back, so it must be taken after
    the head start; at a vanishing lr the model stays where the probe put it."""
    args = ["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "r",
            "--steps", "4", "--eval-every", "4", *RUN, "--lr", "1e-9", "--dtype", "bf16", "--master-weights"]
    assert main(args) == 0
    dev = [json.loads(x)["dev/loss"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
           if "dev/loss" in x]
    assert dev[1] == pytest.approx(dev[0], abs=1e-3)
