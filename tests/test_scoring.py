import pytest
import torch
import torch.nn.functional as F

import zoft
from zoft.data import Encoded, collate
from zoft.scoring import classification_loss, evaluate
from tests.conftest import tiny_llama

CANDIDATES = torch.tensor([3, 7, 11])
PROMPTS = [[5, 9, 2, 14], [8, 1], [20, 21, 22, 23, 24, 25, 26], [40]]
LABELS = [0, 2, 1, 1]


def full_logits_loss(model, prompts, labels):
    """MeZO's definition, one unpadded prompt at a time: s_k = log p(candidate k | prompt) over
    the whole vocabulary, loss = cross-entropy of softmax(s) against the gold candidate."""
    losses = []
    for ids, label in zip(prompts, labels):
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
        losses.append(F.cross_entropy(logp[CANDIDATES][None], torch.tensor([label])))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("tied", [True, False])
def test_candidate_scoring_equals_full_logits_loss(tied):
    model = tiny_llama(tied=tied)
    batch = collate([Encoded(p, y) for p, y in zip(PROMPTS, LABELS)], pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(classification_loss(model, batch, CANDIDATES),
                                   full_logits_loss(model, PROMPTS, LABELS), rtol=1e-5, atol=1e-6)


def test_candidate_scoring_equals_full_logits_loss_under_perturbation():
    """The head's rows are perturbed exactly as the full output embedding would be."""
    model = tiny_llama(tied=True)
    opt = zoft.mezo(model, eps=0.05)
    batch = collate([Encoded(p, y) for p, y in zip(PROMPTS, LABELS)], pad_id=0)
    scales = [0.05] * len(opt.blocks)
    with torch.no_grad(), opt.perturber.active(4, scales):
        fast = classification_loss(model, batch, CANDIDATES)
        full = full_logits_loss(model, PROMPTS, LABELS)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_evaluate_counts_accuracy():
    model = tiny_llama()
    items = [Encoded(p, y) for p, y in zip(PROMPTS, LABELS)]
    with torch.no_grad():
        batch = collate(items, pad_id=0)
        from zoft.scoring import candidate_logits

        pred = candidate_logits(model, batch, CANDIDATES).argmax(-1)
    expected = (pred == batch["labels"]).float().mean().item()
    result = evaluate(model, items, CANDIDATES, pad_id=0, batch_size=3)
    assert result["acc"] == pytest.approx(expected)
    assert result["loss"] == pytest.approx(full_logits_loss(model, PROMPTS, LABELS).item(), rel=1e-5)


def test_evaluate_runs_without_autograd_and_shows_progress_only_on_a_terminal(monkeypatch):
    """Evaluation builds no autograd graph (a misplaced decorator once let it record one: peak
    memory 0.92 → 2.1 GB on the default model), and its bar appears on a terminal, not in logs."""
    import io

    import zoft.scoring as scoring

    modes = []
    real = scoring.task_logits

    def recording(*args):
        modes.append(torch.is_inference_mode_enabled())
        return real(*args)

    monkeypatch.setattr(scoring, "task_logits", recording)
    items = [Encoded(p, y) for p, y in zip(PROMPTS, LABELS)]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr("sys.stderr", stream)
        evaluate(tiny_llama(), items, CANDIDATES, pad_id=0, batch_size=3)
        assert ("eval" in stream.getvalue()) == shown
    assert modes and all(modes)


def test_batches_group_by_length_keeps_every_example_once_per_epoch():
    from zoft.data import Batches

    items = [Encoded([1] * (1 + (i * 7) % 23), i) for i in range(64)]
    grouped = Batches(items, 8, seed=0, pad_id=0, group_by_length=4)
    plain = Batches(items, 8, seed=0, pad_id=0, group_by_length=1)

    def epoch(b):
        batches = [next(b) for _ in range(8)]
        labels = sorted(x for batch in batches for x in batch["labels"].tolist())
        padding = sum((batch["input_ids"].shape[1] - batch["lengths"]).sum().item() for batch in batches)
        return labels, padding

    (labels_g, pad_g), (labels_p, pad_p) = epoch(grouped), epoch(plain)
    assert labels_g == labels_p == list(range(64))
    assert pad_g < pad_p / 2


def test_metric_objectives_on_hand_made_cases():
    from zoft.scoring import accuracy, macro_f1

    pred, gold = torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 2, 0])
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    # class 0: tp 1 fp 0 fn 1 -> 2/3; class 1: tp 1 fp 1 fn 0 -> 2/3; class 2: tp 2 fp 1 fn 1 -> 2/3
    assert macro_f1(pred, gold) == pytest.approx(2 / 3)
    assert macro_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert macro_f1(torch.tensor([1, 1]), torch.tensor([1, 1])) == 1.0


def test_accuracy_objective_is_the_negative_batch_accuracy():
    model = tiny_llama()
    batch = collate([Encoded(p, y) for p, y in zip(PROMPTS, LABELS)], pad_id=0)
    with torch.no_grad():
        from zoft.scoring import candidate_logits

        acc = (candidate_logits(model, batch, CANDIDATES).argmax(-1) == batch["labels"]).float().mean().item()
        assert classification_loss(model, batch, CANDIDATES, "accuracy").item() == pytest.approx(-acc)


OPTIONS = [(3, 4), (7,), (11, 2, 9)]  # multi-token options shared by every example


def full_option_log_likelihood(model, prompt, option):
    """Mean log p(option tokens | prompt and the option's earlier tokens), whole vocabulary, unpadded."""
    ids = torch.tensor([prompt + list(option)])
    logp = F.log_softmax(model(ids).logits[0], dim=-1)
    return torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(option)]).mean()


@pytest.mark.parametrize("perturbed", [False, True])
def test_option_scoring_equals_mean_token_log_likelihood(perturbed):
    """MeZO §6.1 for multi-token candidates: softmax over each option's mean token log-likelihood,
    also under a perturbation (the head then runs as a swapped-in perturbed copy)."""
    from zoft.scoring import option_logits

    model = tiny_llama(tied=True)
    opt = zoft.mezo(model, eps=0.05)
    items = [Encoded(p, y, OPTIONS) for p, y in zip(PROMPTS, LABELS)]
    batch = collate(items, pad_id=0)
    assert batch["input_ids"].shape == (len(PROMPTS) * len(OPTIONS), 7 + 3)
    with torch.no_grad(), (opt.perturber.active(4, [0.05] * len(opt.blocks)) if perturbed else torch.enable_grad()):
        logits = option_logits(model, batch)
        expected = torch.stack([torch.stack([full_option_log_likelihood(model, p, o) for o in OPTIONS]) for p in PROMPTS])
        loss = classification_loss(model, batch, None)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(expected, torch.tensor(LABELS)), rtol=1e-5, atol=1e-5)


def test_single_token_options_give_the_candidate_scoring_loss():
    """Sequence scoring and the fast path agree where both apply."""
    model = tiny_llama()
    single = tuple((int(c),) for c in CANDIDATES)
    with torch.no_grad():
        slow = classification_loss(model, collate([Encoded(p, y, single) for p, y in zip(PROMPTS, LABELS)], 0), None)
        fast = classification_loss(model, collate([Encoded(p, y) for p, y in zip(PROMPTS, LABELS)], 0), CANDIDATES)
    torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-6)


def test_multiple_choice_trains_on_the_gold_options_token_loss_and_evaluates_by_likelihood():
    """MeZO §6.2: the LM loss of the gold option only, prompt tokens masked (HF's -100 labels);
    examples with different numbers of options; evaluation batches count sequences."""
    from zoft.scoring import option_logits

    model = tiny_llama()
    options = [((3, 4), (5,)), ((6,), (7, 8, 9), (10,)), ((12, 13), (14, 15)), ((16,), (17,))]
    items = [Encoded(p, y, o) for p, y, o in zip(PROMPTS, [1, 2, 0, 1], options)]
    batch = collate(items, pad_id=0)
    with torch.no_grad():
        loss = classification_loss(model, batch, None, train_loss="lm")
        ids = [p + list(o[y]) for p, y, o in zip(PROMPTS, [1, 2, 0, 1], options)]
        width = max(map(len, ids))
        labels = torch.tensor([[-100] * len(p) + list(o[y]) + [-100] * (width - len(p) - len(o[y]))
                               for p, y, o in zip(PROMPTS, [1, 2, 0, 1], options)])
        padded = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        torch.testing.assert_close(loss, model(padded, labels=labels).loss, rtol=1e-5, atol=1e-6)
        logits = option_logits(model, batch)
    assert logits.shape == (4, 3) and torch.isinf(logits[[0, 2, 3], 2]).all()
    expected = (logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert evaluate(model, items, None, pad_id=0, batch_size=3)["acc"] == pytest.approx(expected)


def test_the_choice_objective_trains_multiple_choice_on_the_cross_entropy_over_its_options():
    """--objective choice: whatever the task's own training loss (here the gold option's LM loss),
    the cross-entropy over each example's options that dev loss reports, whole batch or summed in
    micro-batches."""
    from zoft.scoring import loss_terms, option_logits

    model = tiny_llama()
    options = [((3, 4), (5,)), ((6,), (7, 8, 9), (10,)), ((12, 13), (14, 15)), ((16,), (17,))]
    items = [Encoded(p, y, o) for p, y, o in zip(PROMPTS, [1, 2, 0, 1], options)]
    batch = collate(items, pad_id=0)
    with torch.no_grad():
        expected = F.cross_entropy(option_logits(model, batch), batch["labels"])
        lm = classification_loss(model, batch, None, train_loss="lm")
        choice = classification_loss(model, batch, None, "choice", train_loss="lm")
        total, count = loss_terms(model, batch, None, "choice", train_loss="lm")
    assert not torch.isclose(lm, expected)
    torch.testing.assert_close(choice, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total / count, expected, rtol=1e-5, atol=1e-6)
    assert evaluate(model, items, None, pad_id=0)["loss"] == pytest.approx(expected.item(), rel=1e-5)
