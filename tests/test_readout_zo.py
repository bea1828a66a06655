"""bench/readout_zo.py: ZO-SGD on the label rows over frozen answer states, under several bases."""

import json

import pytest
import torch

from conftest import bench_script

readout = bench_script("readout_zo")


def _task(seed=0, n=400, hidden=12):
    """Two classes told apart by one feature direction, off-centre (a label prior to learn too)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden, generator=g, dtype=torch.float64)

    def part(m):
        x = torch.randn(m, hidden, generator=g, dtype=torch.float64)
        return x, (x @ w > 0.5).long()

    return {"rows0": torch.zeros(2, hidden, dtype=torch.float64), "train": part(n), "dev": part(200), "test": part(200)}


def test_the_whitened_basis_makes_the_states_isotropic_in_it_with_k_units_of_energy():
    g = torch.Generator().manual_seed(1)
    states = torch.randn(500, 10, generator=g, dtype=torch.float64) * torch.logspace(0, 2, 10, dtype=torch.float64)
    basis = readout.whitened_basis(states, 4)
    moment = (states @ basis).T @ (states @ basis) / len(states)
    assert torch.allclose(moment, moment[0, 0] * torch.eye(4, dtype=torch.float64), atol=1e-9 * moment[0, 0])
    assert basis.pow(2).sum().item() == pytest.approx(4.0)
    # the top of the spectrum: the largest-variance feature lies in the basis, the smallest hardly
    assert basis[-1].norm() > 100 * basis[0].norm()


def test_zo_and_first_order_steps_learn_the_readout_and_lr_zero_does_not():
    data = _task()
    eye = torch.eye(12, dtype=torch.float64)
    still = readout.run(data, eye, 0.0, seed=0, steps=100, every=25)
    zo = readout.run(data, eye, 0.05, seed=0, steps=300, every=25)
    sgd = readout.run(data, None, 0.5, seed=0, steps=300, every=25)
    assert len(set(still["curve"])) == 1
    assert zo["curve"][-1] > still["curve"][0] + 0.15 and sgd["curve"][-1] > still["curve"][0] + 0.25
    assert readout.run(data, eye, 0.05, seed=0, steps=300, every=25) == zo  # a seed fixes the run
    assert readout.run(data, eye, 0.05, seed=1, steps=300, every=25) != zo


def test_the_lr_pick_prefers_a_stable_inside_value_and_flags_an_edge():
    data = _task()
    eye = torch.eye(12, dtype=torch.float64)
    diverging = readout.run(data, eye, float("inf"), seed=0, steps=50, every=25)
    assert diverging["curve"][-1] != diverging["curve"][-1]  # NaN rows end in a NaN: never the pick
    assert readout.pick_lr(data, eye, lrs=[1e-7, 0.05, 1e15], steps=200) == (0.05, False)
    # first in the list, where a NaN compared as a number would stay the maximum
    assert readout.pick_lr(data, eye, lrs=[float("inf"), 0.05, 1e15], steps=200) == (0.05, False)
    assert readout.pick_lr(data, eye, lrs=[1e-7, 1e-6, 0.05], steps=200) == (0.05, True)


def test_main_prints_a_row_per_task_and_method_and_writes_its_json(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "r.json"
    result = readout.main(["--model", str(tiny_model_dir), "--tasks", "tweets", "--meta", "tweets", "--k", "4",
                           "--seeds", "0,1", "--steps", "4", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["method"] for r in result["rows"]] == ["isotropic", "own-4 (oracle)", "meta-4", "first-order"]
    assert all(len(r["test"]) == 2 for r in result["rows"])
    assert len(result["ceilings"]) == 3
    assert len(capsys.readouterr().out.splitlines()) == 2 + 4 + 1 + 2 + 3


def test_the_probe_fits_within_its_basis_only():
    data = _task()
    start = readout._accuracy(data["rows0"], *data["dev"])
    full = readout.probe_in(data, torch.eye(12, dtype=torch.float64))
    nowhere = readout.probe_in(data, torch.zeros(12, 3, dtype=torch.float64))
    assert full[0] > start + 0.3 and nowhere == (start, readout._accuracy(data["rows0"], *data["test"]))


def test_the_accuracy_objective_is_flat_at_a_small_eps_and_learns_at_a_large_one():
    """A batch's accuracy is a step function of the rows: at a tiny ε no probe changes a prediction,
    so the coefficient is 0 and the rows never move; at a large ε it has a slope to follow."""
    from zoft.estimators import SPSAConfig, TwoPoint

    data = _task()
    data["rows0"] = torch.randn(2, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # no ties
    eye = torch.eye(12, dtype=torch.float64)
    flat = readout.run(data, eye, 1.0, seed=0, steps=100, estimator=TwoPoint(SPSAConfig(eps=1e-9)), objective="accuracy")
    assert len(set(flat["curve"])) == 1
    learns = readout.run(data, eye, 0.2, seed=0, steps=300, estimator=TwoPoint(SPSAConfig(eps=0.3)), objective="accuracy")
    assert learns["curve"][-1] > learns["curve"][0] + 0.15
    # the same tiny ε on the cross-entropy moves the rows
    assert len(set(readout.run(data, eye, 1.0, seed=0, steps=100, eps=1e-9)["curve"])) > 1


def test_a_kernel_estimator_probes_at_its_radii_and_still_learns():
    from zoft.estimators import Kernel, KernelConfig, SPSAConfig, TwoPoint

    data = _task()
    eye = torch.eye(12, dtype=torch.float64)
    spsa = readout.run(data, eye, 0.05, seed=0, steps=300, estimator=TwoPoint(SPSAConfig(eps=1e-3)))
    assert spsa == readout.run(data, eye, 0.05, seed=0, steps=300)  # SPSA at eps is the default
    kernel = readout.run(data, eye, 0.02, seed=0, steps=300, estimator=Kernel(KernelConfig(eps=1e-3, kernel_order=2)))
    assert kernel["curve"][-1] > kernel["curve"][0] + 0.15 and kernel != spsa


def test_the_kernel_bench_prints_a_row_per_objective_eps_and_estimator(tmp_path, tiny_model_dir, capsys):
    kernel_bench = bench_script("readout_kernel")
    out = tmp_path / "k.json"
    rows = kernel_bench.main(["--model", str(tiny_model_dir), "--tasks", "tweets", "--eps", "1e-3,1e-1",
                              "--seeds", "0,1", "--steps", "4", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert [(r["objective"], r["eps"], r["estimator"]) for r in rows] == [
        (o, e, n) for o in ("accuracy", "loss") for e in (1e-3, 1e-1) for n in ("SPSA", "kernel, order 2", "kernel, order 4")]
    assert all(len(r["tweets"]["test"]) == 2 for r in rows)
    printed = capsys.readouterr().out
    assert printed.count("\n- ") == 6  # each objective and estimator at its best ε
