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
    with pytest.raises(ZoftError, match="unknown task 'imdb'; choose from sst2, tweets"):
        get_task("imdb")
    with pytest.raises(ZoftError, match="data dir not found"):
        sample_splits(get_task("sst2"), str(tmp_path / "nope"), 10, 5, 5, 0)
    with pytest.raises(ZoftError, match="SST-2 file not found"):
        sample_splits(get_task("sst2"), str(tmp_path), 10, 5, 5, 0)
    (tmp_path / "train.tsv").write_text("text\tgold\nfine\t1\n")
    (tmp_path / "dev.tsv").write_text("text\tgold\nfine\t1\n")
    with pytest.raises(ZoftError, match="is not a GLUE SST-2 file"):
        sample_splits(get_task("sst2"), str(tmp_path), 10, 5, 5, 0)
