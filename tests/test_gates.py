"""bench/gates.py: issue 11's per-seed gates, on run folders as zoft finetune writes them."""

import pytest
from test_compare import fake_run
from conftest import bench_script

gates = bench_script("gates")


def test_gates_hold_only_when_every_seed_passes_both(tmp_path, capsys):
    fake_run(tmp_path, "a0", "spsa", 0, [0.5, 0.6, 0.7])
    fake_run(tmp_path, "a1", "spsa", 1, [0.5, 0.62, 0.74])
    fake_run(tmp_path, "b0", "kernel", 0, [0.5, 0.75, 0.8])
    fake_run(tmp_path, "b1", "kernel", 1, [0.5, 0.71, 0.76])
    # spsa's mean curve .50 .61 .72 reaches its final .72 at 40 fwd; test mean .71.
    # kernel seed 0 crosses .72 at 20 × .22/.25 = 17.6 fwd (0.44×), seed 1 at 20 + 20 × .01/.05 = 24 (0.60×);
    # test .79 and .75: +8.0 and +4.0 points
    assert gates.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 0.500 | 0.500–0.800 | 0.800 | – | 0.790 | 18 (0.44×) | +8.0 | yes |" in out
    assert "| 1 | 0.500 | 0.500–0.760 | 0.760 | – | 0.750 | 24 (0.60×) | +4.0 | no |" in out
    assert "tweets, kernel4: a gate fails" in out
    gates.main([str(tmp_path), "--passes", "0.7"])
    assert "tweets, kernel4: both gates hold on every seed" in capsys.readouterr().out
    gates.main([str(tmp_path), "--passes", "0.7", "--points", "5"])
    assert "tweets, kernel4: a gate fails" in capsys.readouterr().out


def test_a_method_and_its_baseline_can_come_from_two_grids(tmp_path, capsys):
    base, other = tmp_path / "seeds", tmp_path / "seeds_more"
    fake_run(base, "a0", "spsa", 0, [0.5, 0.6, 0.7])
    fake_run(base, "a1", "spsa", 1, [0.5, 0.62, 0.74])
    fake_run(other, "b0", "kernel", 0, [0.5, 0.75, 0.8])
    fake_run(other, "b1", "kernel", 1, [0.5, 0.71, 0.76])
    assert gates.main([str(base), str(other)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 0.500 | 0.500–0.800 | 0.800 | – | 0.790 | 18 (0.44×) | +8.0 | yes |" in out  # as from one folder
    with pytest.raises(SystemExit, match="no 'spsa' runs for tweets"):  # a grid without the baseline stops
        gates.main([str(other)])
