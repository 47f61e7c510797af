"""benchmarks/trial_cost.py bookkeeping (no training): the turning order, the per-round ratios and the teacher's
share, and its bad input."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("trial_cost", Path(__file__).parents[1] / "benchmarks" / "trial_cost.py")
tc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tc)


def test_every_config_runs_first_in_some_round():
    configs = ["lora", "a", "b"]
    assert [tc.rotated(configs, r) for r in range(4)] == [["lora", "a", "b"], ["a", "b", "lora"],
                                                           ["b", "lora", "a"], ["lora", "a", "b"]]


def test_ratios_are_taken_per_round_and_the_teacher_is_shared():
    def row(rnd, config, train_s, teacher_s=None):
        return {"round": rnd, "config": config, "train_time_s": train_s, "wall_s": train_s + 10, "score": 0.8,
                "sparsity": 0.4 if config != "lora" else 0.0, "teacher_train_time_s": teacher_s, "device": "cpu",
                "precision": "no"}

    rows = [row(0, "lora", 1000.0),  # the teacher's run: not timed
            row(1, "lora", 100.0), row(1, "fg", 110.0, 60.0),
            row(2, "lora", 50.0), row(2, "fg", 60.0, 60.0),  # a slow round for both: the ratio is per round
            row(3, "lora", 100.0), row(3, "fg", 90.0, 60.0)]
    lines = tc.table(rows, ["lora", "fg"], trials_per_task=6).splitlines()
    assert lines[2].startswith("| lora | 100.0 (50.0-100.0) | 1.00x (1.00-1.00) | 110.0 | - |")
    # ratios 1.10, 1.20, 0.90; with the teacher's 60 s over 6 trials: (110+10)/100, (60+10)/50, (90+10)/100
    assert lines[3].startswith("| fg | 90.0 (60.0-110.0) | 1.10x (0.90-1.20) | 100.0 | 1.20x |")
    assert "Teacher: 60.0 s of training and export." in "\n".join(lines)


@pytest.mark.parametrize("argv, expected", [
    (["--configs", "fg-40-kd"], "--configs 'fg-40-kd' is invalid; accepted: a comma list with lora in it"),
    (["--configs", "lora,nope"], "--configs 'lora,nope' is invalid"),
    (["--rounds", "0"], "--rounds 0 is invalid; accepted: an integer >= 1"),
    (["--trials-per-task", "-1"], "--trials-per-task -1 is invalid; accepted: an integer >= 1"),
    (["--max-eval", "0"], "--max-eval 0 is invalid; accepted: an integer >= 1"),
    (["--epochs", "0"], "--epochs 0 is invalid; accepted: a number > 0"),
])
def test_bad_input_is_refused_in_one_line_before_any_run(argv, expected, capsys, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert tc.main([*argv, "--jsonl", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {expected}")
    assert not out.exists()
