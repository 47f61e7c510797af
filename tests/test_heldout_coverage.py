"""benchmarks/heldout_coverage.py: file naming, the sweep's split and selector on fixed predictions."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("heldout_coverage",
                                               Path(__file__).parents[1] / "benchmarks" / "heldout_coverage.py")
hc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hc)


def _write(folder: Path, config: str, predictions: np.ndarray, labels: np.ndarray, task="sst2", seed=7) -> None:
    np.savez(folder / f"{task}-{config}-{seed}.npz", predictions=predictions, labels=labels)


def test_groups_by_task_and_seed_and_picks_the_sparsest_run_within_budget(tmp_path, capsys):
    y = np.array([0, 1] * 100)
    perfect = y.copy()
    half_wrong = y.copy()
    half_wrong[:100] = 1 - half_wrong[:100]
    _write(tmp_path, "lora", perfect, y)
    _write(tmp_path, "fg-40-kd", perfect, y)  # as good and sparser: the pick at every budget
    _write(tmp_path, "fg-60-kd", half_wrong, y)  # 50% accuracy: never within budget
    groups = hc.load_groups(tmp_path)
    assert list(groups) == [("sst2", 7)] and set(groups[("sst2", 7)]) == {"lora", "fg-40-kd", "fg-60-kd"}
    inside, picks, learned = hc.coverage(groups[("sst2", 7)], "sst2", 0, 0.5, [0.01, 0.05], 200)
    assert learned and [(b, c) for b, c, _, _ in picks] == [(0.01, "fg-40-kd"), (0.05, "fg-40-kd")]
    assert all(ok and ok_pred for _, _, ok, ok_pred in picks)  # a perfect model scores 1.0 on both parts
    assert hc.main([str(tmp_path), "--splits", "2", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "picks: report score inside its selection interval in 100.0% (6/6); inside its prediction interval in " \
           "100.0% (6/6)" in out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert hc.main([str(tmp_path)]) == 2  # no predictions there
    assert capsys.readouterr().err.count("\n") == 1
    _write(tmp_path, "lora", np.array([0, 1] * 50), np.array([0, 1] * 50))
    assert hc.main([str(tmp_path), "--report-frac", "1.5"]) == 2
    assert "--report-frac 1.5 is invalid; accepted: a number in (0, 1)" in capsys.readouterr().err
    assert hc.main([str(tmp_path), "--budgets", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --budgets '2' is invalid; accepted: comma-separated numbers in [0, 1]"
