import json
from pathlib import Path

import pytest

from zoft.errors import ZoftError
from zoft.tasks import get_task, load_tweets, sample_splits

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_tweets_are_balanced_distinct_and_split_apart():
    train, validation = load_tweets()
    texts_train = {e.fields["sentence"] for e in train}
    texts_val = {e.fields["sentence"] for e in validation}
    assert len(texts_train) == len(train) and not texts_train & texts_val
    everything = train + validation
    assert abs(sum(e.label for e in everything) - len(everything) / 2) < 1


def test_mezo_sampling_protocol():
    s = sample_splits(get_task("tweets"), None, 100, 50, 30, seed=3)
    assert (len(s.train), len(s.dev), len(s.test)) == (100, 50, 30)
    assert not {e.fields["sentence"] for e in s.train} & {e.fields["sentence"] for e in s.dev}
    again = sample_splits(get_task("tweets"), None, 100, 50, 30, seed=3)
    assert again.dev == s.dev and again.test == s.test
    assert sample_splits(get_task("tweets"), None, 100, 50, 30, seed=4).dev != s.dev


def test_template_renders_prompt_and_label_words():
    task = get_task("sst2")
    from zoft.tasks import Example

    assert task.render(Example({"sentence": "a gorgeous film ."}, 1)) == "a gorgeous film . It was"
    assert task.label_words == (" terrible", " great")


@pytest.mark.skipif(not (SHARED / "SST-2").is_dir(), reason="needs ../shared/data")
def test_sst2_from_the_official_tsv_files():
    s = sample_splits(get_task("sst2"), str(SHARED), 1000, 500, 1000, seed=0)
    assert (len(s.train), len(s.dev), len(s.test)) == (1000, 500, 872)
    assert {e.label for e in s.test} == {0, 1}


def test_task_errors(tmp_path):
    with pytest.raises(ZoftError, match="unknown task 'imdb'; choose from boolq, cb, copa, drop, multirc, record, rte, squad, sst2, tweets, wic, wsc"):
        get_task("imdb")
    with pytest.raises(ZoftError, match="data dir not found"):
        sample_splits(get_task("sst2"), str(tmp_path / "nope"), 10, 5, 5, 0)
    with pytest.raises(ZoftError, match="SST-2 file not found"):
        sample_splits(get_task("sst2"), str(tmp_path), 10, 5, 5, 0)
    (tmp_path / "train.tsv").write_text("text\tgold\nfine\t1\n")
    (tmp_path / "dev.tsv").write_text("text\tgold\nfine\t1\n")
    with pytest.raises(ZoftError, match="is not a GLUE SST-2 file"):
        sample_splits(get_task("sst2"), str(tmp_path), 10, 5, 5, 0)


def _first_val(task_name):
    task = get_task(task_name)
    return task, task.load(str(SHARED))[1][0]


@pytest.mark.skipif(not (SHARED / "RTE").is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("name, prompt, words, label", [
    ("rte", 'Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to '
            'the Christopher Reeve Foundation.\nDoes this mean that "Christopher Reeve had an accident." is true? '
            'Yes or No?\n', ("Yes", "No"), 1),
    ("cb", "Suppose Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his own "
           'portion of titanic anatomy to shaft? Did he think he was helping? Can we infer that "Valence was '
           'helping"? Yes, No, or Maybe?\n', ("Yes", "No", "Maybe"), 1),
    ("wsc", "Bernard , who had not told the government official that he was less than 21 when he filed for a "
            "homestead claim, did not consider that he had done anything dishonest. Still, anyone who knew that he "
            "was 19 years old could take his claim away from him .\nIn the previous sentence, does the pronoun "
            '"him" refer to anyone? Yes or No?\n', ("No", "Yes"), 0),
    ("wic", 'Does the word "class" have the same meaning in these two sentences? Yes, No?\nAn emerging professional '
            "class.\nApologizing for losing your temper, even though you were badly provoked, showed real class.\n",
     ("No", "Yes"), 0),
])
def test_superglue_tasks_render_real_rows_exactly(name, prompt, words, label):
    task, example = _first_val(name)
    assert task.render(example) == prompt
    assert task.label_words == words and example.label == label


@pytest.mark.skipif(not (SHARED / "MultiRC").is_dir(), reason="needs ../shared/data")
def test_multirc_expands_answers_and_boolq_refuses_the_missing_train_split():
    task, example = _first_val("multirc")
    assert task.render(example).endswith(
        "\nQuestion: Would the mass of a baseball affect how much force you have to use to pick it up?\n"
        'I found this answer "No". Is that correct? Yes or No?\n')
    train, val = task.load(str(SHARED))
    assert (len(train), len(val)) == (27243, 4848)  # answer options, as in the standard loader
    with pytest.raises(ZoftError, match="BoolQ file not found: .*train.jsonl .*never trains on the validation split"):
        get_task("boolq").load(str(SHARED))
    from zoft.tasks import _boolq

    row = {"question": "does ethanol take more energy make that produces", "passage": "P.", "label": False}
    assert get_task("boolq").render(_boolq(row)[0]) == "P. Does ethanol take more energy make that produces?\n"


def test_malformed_row_names_its_line(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{"premise": 1}\n')
    (tmp_path / "RTE" / "val.jsonl").write_text("")
    with pytest.raises(ZoftError, match=r"RTE/train.jsonl:2: not a RTE row \(KeyError"):
        get_task("rte").load(str(tmp_path))


def test_custom_jsonl_task_end_to_end_from_the_cli(tmp_path, tiny_model_dir, capsys):
    from zoft.cli import main

    data = tmp_path / "reviews.jsonl"
    words = ["the film was good", "not a good movie", "very bad", "it is good and very good"]
    data.write_text("\n".join(json.dumps({"review": w + f" {i}", "stars": ["bad", "good"][i % 2]})
                              for i, w in enumerate(words * 10)) + "\n")
    args = ["finetune", "--model", str(tiny_model_dir), "--task", f"jsonl:{data}", "--template", "{review} It was",
            "--labels", "terrible,great", "--label-field", "stars", "--output-dir", str(tmp_path / "runs"),
            "--steps", "2", "--num-train", "16", "--num-dev", "4", "--num-test", "4", "--batch-size", "4"]
    assert main(args) == 2  # 'bad'/'good' are not among the label words
    assert "reviews.jsonl:1: bad row (label 'bad' is not among the label words ['terrible', 'great'])" in capsys.readouterr().err
    data.write_text("\n".join(json.dumps({"review": w + f" {i}", "stars": ["terrible", "great"][i % 2]})
                              for i, w in enumerate(words * 10)) + "\n" + '{"review": "x"}\n')
    assert main(args) == 2
    assert "reviews.jsonl:41: bad row (no field stars)" in capsys.readouterr().err
    data.write_text("\n".join(json.dumps({"review": w + f" {i}", "stars": i % 2}) for i, w in enumerate(words * 10)))
    assert main([*args, "--run-name", "custom"]) == 0
    config = json.loads((tmp_path / "runs" / "custom" / "config.json").read_text())
    assert config["template"] == "{review} It was" and config["labels"] == "terrible,great"
    assert config["split_sizes"]["dev"] == 4 and config["num_dev"] == 4
    assert main(args) == 0  # a default run name: no ':' from "jsonl:" in the folder name
    assert [p.name.startswith("jsonl-reviews.jsonl-spsa-s0-") for p in (tmp_path / "runs").iterdir()].count(True) == 1
    assert main(["finetune", "--model", str(tiny_model_dir), "--task", f"jsonl:{data}", "--labels", "a"]) == 2
    assert "--labels needs at least two" in capsys.readouterr().err


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.skipif(not (SHARED / "COPA").is_dir(), reason="needs ../shared/data")
def test_copa_renders_real_rows_as_mezo_does():
    task, example = _first_val("copa")  # "The man turned on the faucet." effect; label 1
    assert task.render(example) == "The man turned on the faucet so"
    assert task.options(example) == (" the toilet filled with water.", " water flowed from the spout.")
    assert example.label == 1 and task.train_loss == "lm" and task.num_dev == 100
    train, val = task.load(str(SHARED))
    assert (len(train), len(val)) == (400, 100)
    from zoft.tasks import _copa

    cause = _copa({"premise": "I hid.", "choice1": "I was scared.", "choice2": "Nobody came.", "question": "cause",
                   "label": 0})[0]
    assert task.render(cause) + task.options(cause)[0] == "I hid because I was scared."  # "I" keeps its case


def test_record_renders_highlights_queries_and_entity_options():
    task = get_task("record")
    train, _ = task.load(str(FIXTURES))
    assert len(train) == 3  # the query without an answer among the entities is dropped
    example = train[0]
    assert task.render(example) == ("Ada Lovelace wrote the first program for the Analytical Engine of Charles "
                                    "Babbage.\n- Lovelace published notes in London\n- Babbage never finished the"
                                    " machine\n-")
    entities = ["Ada Lovelace", "Analytical Engine", "Babbage", "Charles Babbage", "London"]
    assert task.options(example) == tuple(f" Her notes on the {e} are read today." for e in entities)
    assert example.label == 1
    from zoft.tasks import _record

    hub_row = {"passage": "P.\n@highlight\nH", "query": "Q @placeholder.", "entities": ["B", "A"], "answers": ["B"]}
    hub = _record(hub_row)[0]
    assert task.render(hub) == "P.\n- H\n-" and hub.options == (" Q A.", " Q B.") and hub.label == 1


def test_multiple_choice_and_multi_token_labels_run_end_to_end(tmp_path, tiny_model_dir, capsys):
    from zoft.cli import main

    base = ["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "runs"), "--steps", "2",
            "--num-dev", "4", "--num-test", "4", "--batch-size", "2"]
    assert main([*base, "--task", "record", "--data-dir", str(FIXTURES), "--num-train", "2", "--num-dev", "1",
                 "--run-name", "record"]) == 0
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps({"review": f"the movie was {w} {i}", "label": i % 2})
                              for i, w in enumerate(["good", "bad"] * 20)) + "\n")
    assert main([*base, "--task", f"jsonl:{data}", "--template", "{review} It was", "--labels",
                 "very bad,very good", "--num-train", "16", "--run-name", "multi"]) == 0
    summary = json.loads((tmp_path / "runs" / "multi" / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["test_acc_after"] <= 1


def test_squad_and_drop_render_prompts_and_answer_targets():
    squad = get_task("squad")
    train, _ = squad.load(str(FIXTURES))
    assert len(train) == 3  # the row without an answer is dropped
    assert squad.render(train[0]) == ("Title: Analytical_Engine\nContext: The Analytical Engine was designed by "
                                      "Charles Babbage in 1837. Ada Lovelace wrote notes on it in 1843.\n"
                                      "Question: Who designed the Analytical Engine?\nAnswer:")
    assert train[0].options == ("Charles Babbage", "Babbage") and squad.options(train[0]) == (" Charles Babbage\n",)
    drop = get_task("drop")
    example = drop.load(str(FIXTURES))[0][1]
    assert drop.render(example).startswith("Passage: The Analytical Engine") and drop.render(example).endswith(
        "\nQuestion: Who wrote notes?\nAnswer:")
    assert example.options == ("Ada Lovelace", "Lovelace") and squad.generates and drop.generates


def test_answer_metrics_on_hand_made_cases():
    from zoft.scoring import answer_scores, normalise_answer, token_f1

    assert normalise_answer("The  Analytical, Engine!") == "analytical engine"
    assert token_f1("Charles Babbage", "Babbage") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert token_f1("the cat", "a dog") == 0.0 and token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert answer_scores("Babbage.", ["Charles Babbage", "babbage"]) == (1.0, 1.0)
    assert answer_scores("in 1843 he", ["1843"]) == (0.5, 0.0)  # precision 1/3, recall 1


def test_generation_task_trains_on_the_answer_and_reports_f1_and_em(tmp_path, tiny_model_dir, capsys):
    from zoft.cli import main

    base = ["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "runs"), "--steps", "2",
            "--num-train", "2", "--num-dev", "1", "--num-test", "2", "--batch-size", "2", "--task", "squad",
            "--data-dir", str(FIXTURES)]
    assert main([*base, "--objective", "accuracy"]) == 2
    assert ("objective accuracy is for classification and multiple-choice tasks; squad trains on the answer's loss or"
            " on the token F1 of its greedy answers (f1)") in capsys.readouterr().err
    assert main([*base, "--objective", "f1", "--run-name", "f1"]) == 0
    losses = [json.loads(x) for x in (tmp_path / "runs" / "f1" / "metrics.jsonl").read_text().splitlines()]
    assert all(-1 <= x["train/loss"] <= 0 and -1 <= x["train/loss_minus"] <= 0 for x in losses if "train/loss" in x)
    assert main([*base, "--run-name", "squad"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "runs" / "squad" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= x["dev/acc"] <= 1 for x in lines if "dev/acc" in x)
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "drop", "--data-dir", str(FIXTURES),
                 "--num-test", "3"]) == 0
    out = capsys.readouterr().out
    assert "test F1: before" in out and "drop: zero-shot test F1 0.0000, exact match 0.0000, loss" in out
    assert json.loads((tmp_path / "runs" / "squad" / "summary.json").read_text())["metric"] == "f1"


def _answer_items(tokenizer):
    """Prompts in the tiny vocabulary, whose greedy answers repeat one word (movie, film, and, is),
    with gold answers that overlap them in part: token F1s strictly between 0 and 1, EM 0."""
    from zoft.data import Encoded

    prompts = ["it was the movie", "a very good film", "not bad and", "the film is"]
    golds = [("movie film",), ("zzz", "good film"), ("and not",), ("is very",)]
    return [Encoded(tokenizer(p)["input_ids"], 0, (tuple(tokenizer(" " + g[-1])["input_ids"]),), g)
            for p, g in zip(prompts, golds)]


def test_the_f1_objective_is_minus_the_token_f1_of_the_greedy_answers_summed_over_the_batch():
    """MeZO §6.4's non-differentiable objective: the same greedy answers and best-gold token F1
    that evaluation reports, negated so that ZO minimises it, as a sum and a count."""
    from conftest import tiny_llama, tiny_tokenizer
    from zoft.scoring import answer_f1_terms, evaluate_generation

    model, tokenizer = tiny_llama(), tiny_tokenizer()
    items = _answer_items(tokenizer)
    reported = evaluate_generation(model, items, tokenizer)
    assert 0 < reported["f1"] < 1 and reported["em"] == 0
    total, count = answer_f1_terms(model, items, tokenizer)
    assert count == 4 and total.item() == pytest.approx(-4 * reported["f1"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_generation_task_trained_on_f1_steps_on_minus_the_batch_mean_f1(accumulate):
    """The training closure under --objective f1 on SQuAD: the mean over the batch of each greedy
    answer's F1, split into micro-batches or not."""
    from types import SimpleNamespace

    from conftest import tiny_llama, tiny_tokenizer
    from zoft import distributed
    from zoft.finetune import _closure
    from zoft.scoring import evaluate_generation

    model, tokenizer = tiny_llama(), tiny_tokenizer()
    items = _answer_items(tokenizer)
    session = SimpleNamespace(cfg=SimpleNamespace(objective="f1", accumulate=accumulate, parallel="data"),
                              group=distributed.Group(), task=get_task("squad"), model=model, tokenizer=tokenizer,
                              device="cpu", cand=None)
    loss = _closure(session, items)()
    assert loss.item() == pytest.approx(-evaluate_generation(model, items, tokenizer)["f1"])
