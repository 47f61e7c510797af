"""benchmarks/results_table.py: which rows make the table (pure bookkeeping, no training)."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path


_spec = importlib.util.spec_from_file_location("results_table", Path(__file__).parents[1] / "benchmarks" / "results_table.py")
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)

SETTING = {"max_train": 1000, "max_eval": 500, "epochs": 1.0, "max_length": 128}


def row(method, score, seed, lam=None, sparsity=0.0, speedup=1.0, **setting):
    return {"task": "sst2", "method": method, "score": score, "sparsity": sparsity, "speedup": speedup,
            "params_trainable": 10, "params_total": 100, "latency_ms": 1.0 / speedup, "seed": seed, "lam": lam,
            **(SETTING | setting)}


def test_load_keeps_only_rows_of_the_same_setting(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [row("lora", 0.8, 1), row("lora", 0.7, 1, epochs=3.0)]) + "\n")
    assert [r["epochs"] for r in rt.load(p, SETTING)] == [1.0]
    assert rt.load(tmp_path / "missing.jsonl", SETTING) == []


def test_a_head_lr_setting_keeps_its_rows_apart(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [row("lora", 0.8, 1), row("bitfit", 0.7, 1, head_lr=1e-3)]) + "\n")
    assert [r["method"] for r in rt.load(p, SETTING)] == ["lora"]  # rows of the per-method policy
    assert [r["method"] for r in rt.load(p, SETTING | {"head_lr": 1e-3})] == ["bitfit"]
    a = argparse.Namespace(max_train=1000, max_eval=500, epochs=1.0, max_length=128, head_lr=1e-3)
    assert rt.settings(a) == SETTING | {"head_lr": 1e-3}


def test_finegates_rows_are_chosen_by_the_selector_per_seed():
    rows = []
    for seed in (1, 2):
        rows += [row("finegates", 0.80, seed, lam=0.0),
                 row("finegates", 0.79, seed, lam=10.0, sparsity=0.5, speedup=2.0),  # within 2%, not within 1%
                 row("finegates", 0.70, seed, lam=30.0, sparsity=0.9, speedup=5.0),  # outside both budgets
                 row("lora", 0.81, seed)]
    lines = rt.table(rows, [0.01, 0.02], [0.0, 10.0, 30.0]).splitlines()
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    assert cells["finegates, dense point (lambda 0)"][0] == "0.800 ± 0.000"
    assert cells["finegates, selector at budget 0.01"][0] == "0.800 ± 0.000"
    assert cells["finegates, selector at budget 0.02"][0] == "0.790 ± 0.000"
    assert cells["finegates, selector at budget 0.02"][-2:] == ["50.0%", "2.00x |"]
    assert cells["lora"][0] == "0.810 ± 0.000"


def test_lambdas_outside_the_list_are_not_offered_to_the_selector():
    rows = [row("finegates", 0.80, 1, lam=0.0), row("finegates", 0.80, 1, lam=3.0, sparsity=0.4, speedup=1.5)]
    with_3 = rt.table(rows, [0.02], [0.0, 3.0])
    without_3 = rt.table(rows, [0.02], [0.0])
    assert "40.0%" in with_3 and "40.0%" not in without_3


def test_settings_come_from_the_command_line():
    a = argparse.Namespace(max_train=1000, max_eval=500, epochs=1.0, max_length=128)
    assert rt.settings(a) == SETTING


def test_compression_table_shows_each_lambda_and_each_pick():
    rows = [row("finegates", 0.80, 1, lam=0.0), row("finegates", 0.79, 1, lam=10.0, sparsity=0.5, speedup=2.0)]
    lines = rt.compression_table(rows, [0.01, 0.02], [0.0, 10.0]).splitlines()
    assert lines[2] == "| finegates, lambda 0 | 0.800 / 0% / 1.00x |"
    assert lines[3] == "| finegates, lambda 10 | 0.790 / 50% / 2.00x |"
    assert lines[4] == "| finegates, selector at budget 0.01 | 0.800 / 0% / 1.00x |"
    assert lines[5] == "| finegates, selector at budget 0.02 | 0.790 / 50% / 2.00x |"


def test_training_cost_is_relative_to_lora():
    rows = [row("lora", 0.8, s) | {"train_time_s": 10.0} for s in (1, 2)]
    rows += [row("full", 0.8, 1) | {"train_time_s": 12.0}, row("full", 0.8, 2) | {"train_time_s": 18.0}]
    lines = rt.training_cost(rows).splitlines()
    assert lines[2:] == ["| full | 15 | 1.50x |", "| lora | 10 | 1.00x |"]


def test_majority_class_scores_on_the_real_validation_splits(glue_dir):
    # SST-2 validation: 444 of 872 positive; MRPC: always "paraphrase" gives F1 0.812, accuracy 0.684
    assert rt.trivial_scores(["sst2", "mrpc", "stsb", "cola"]) == "| majority class | 0.509 | 0.748 | - | 0.000 |"
