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
    with pytest.raises(ZoftError, match="unknown task 'imdb'; choose from boolq, cb, multirc, rte, sst2, tweets, wic, wsc"):
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
    assert "reviews.jsonl:1: bad row (ValueError" in capsys.readouterr().err
    data.write_text("\n".join(json.dumps({"review": w + f" {i}", "stars": ["terrible", "great"][i % 2]})
                              for i, w in enumerate(words * 10)) + "\n" + '{"review": "x"}\n')
    assert main(args) == 2
    assert "reviews.jsonl:41: bad row (KeyError: 'stars')" in capsys.readouterr().err
    data.write_text("\n".join(json.dumps({"review": w + f" {i}", "stars": i % 2}) for i, w in enumerate(words * 10)))
    assert main([*args, "--run-name", "custom"]) == 0
    config = json.loads((tmp_path / "runs" / "custom" / "config.json").read_text())
    assert config["template"] == "{review} It was" and config["labels"] == "terrible,great"
    assert main(["finetune", "--model", str(tiny_model_dir), "--task", f"jsonl:{data}", "--labels", "a"]) == 2
    assert "--labels needs at least two" in capsys.readouterr().err
