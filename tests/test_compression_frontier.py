"""benchmarks/compression_frontier.py bookkeeping (no training): the fair field's configs, the head-lr
setting that keeps rows apart, and the per-seed table with its chance marks."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("compression_frontier",
                                               Path(__file__).parents[1] / "benchmarks" / "compression_frontier.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)


def test_dense_baselines_run_their_registry_reference():
    from finegates.methods import get_method_class
    from finegates.train import build_parser

    for m in ("gift-sw", "sparta", "propulsion", "bitfit"):
        args = build_parser().parse_args(cf.CONFIGS[m])  # flags finegates.train accepts
        assert args.method == m and args.lr == get_method_class(m).reference["lr"]
    assert cf.CONFIGS["sparta"][-2:] == ["--option", "density=0.01"]


def test_a_shorter_student_trains_from_the_protocols_teacher():
    """An -e<n> row trains n epochs, and its teacher the protocol's: the teacher the `lora` row trains and publishes."""
    from finegates.config import TrainConfig
    from finegates.distill import teacher_config, teacher_key, teacher_of_run
    from finegates.train import build_parser

    a = argparse.Namespace(max_train=2000, max_eval=None, epochs=3, batch_size=32, max_length=128, threads=1,
                           head_lr=None, model=None, data_dir=None)

    def cfg(name):
        args = vars(build_parser().parse_args(cf.train_command(a, "qnli", name, 7, "/c", "/o")[3:]))
        return TrainConfig(**{k: args[k] for k in ("task", "method", "rank", "lr", "seed", "epochs", "batch_size",
                                                   "teacher", "teacher_epochs", "distill_alpha")})

    short, lora = cfg("fgl-40-kdinit-e1"), cfg("lora")
    assert (short.epochs, short.teacher_epochs, lora.epochs, lora.teacher_epochs) == (1.0, 3.0, 3.0, None)

    def key(t):  # what names a teacher in the cache (its data rows aside: the same task, subset and seed here)
        return teacher_key(t, "model", [])

    assert key(teacher_of_run(lora)) == key(teacher_config(short)) == key(teacher_config(cfg("fgl-40-kdinit")))
    assert key(teacher_config(short)) != key(teacher_config(dataclasses.replace(short, teacher_epochs=None)))


def test_a_head_lr_keeps_its_rows_apart(tmp_path):
    a = argparse.Namespace(max_train=100, max_eval=None, epochs=3, batch_size=32, max_length=128, head_lr=None)
    plain = cf.settings(a)
    fair = cf.settings(argparse.Namespace(**{**vars(a), "head_lr": 1e-3}))
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps({"task": "sst2", "config": c, "seed": 1, **s})
                           for c, s in (("lora", plain), ("bitfit", fair))) + "\n")
    assert [r["config"] for r in cf.load(p, plain)] == ["lora"]
    assert [r["config"] for r in cf.load(p, fair)] == ["bitfit"]


def test_each_teacher_kind_is_charged_to_the_rows_that_used_it():
    def row(config, train_s, teacher_s, reused):
        return {"task": "sst2", "config": config, "seed": 1, "score": 0.8, "sparsity": 0.4, "train_time_s": train_s,
                "teacher_score": 0.8, "teacher_train_time_s": teacher_s, "teacher_reused": reused}

    rows = [row("fgl-40-kd", 100.0, 60.0, False), row("fg-40-kd", 50.0, 60.0, True),  # one LoRA teacher, 2 rows
            row("fgl-40-kdfull", 100.0, 90.0, False)]  # one full teacher, 1 row
    lines = cf.table(rows, ["fgl-40-kd", "fg-40-kd", "fgl-40-kdfull"], ["sst2"]).splitlines()
    assert lines[2].endswith("| 130 |") and lines[3].endswith("| 80 |") and lines[4].endswith("| 190 |")
    assert any(x.startswith("Teachers (LoRA r8") and "shared by 2 runs" in x for x in lines)
    assert any(x.startswith("Teachers (full finetuning") and "shared by 1 runs" in x for x in lines)


def test_per_seed_rows_are_single_models_and_chance_is_marked():
    def row(config, seed, score, trivial, n=400, sparsity=0.0, task="sst2"):
        return {"task": task, "config": config, "seed": seed, "score": score, "trivial_score": trivial,
                "n_eval": n, "sparsity": sparsity}

    rows = [row("lora", 1, 0.80, 0.51), row("lora", 2, 0.52, 0.51),  # 0.52: within 2/sqrt(400) = 0.1 of trivial
            row("fg-40-kd", 1, 0.78, 0.51, sparsity=0.4), row("fg-40-kd", 2, 0.77, 0.51, sparsity=0.41)]
    lines = cf.per_seed_table(rows, ["lora", "fg-40-kd"], ["sst2"]).splitlines()
    assert lines[2:] == ["| lora | 1 | 0.800 | 0.800 |", "| lora | 2 | 0.520 (chance) | 0.520 |",
                         "| fg-40-kd | 1 | 0.780 / 40% | 0.780 |", "| fg-40-kd | 2 | 0.770 / 41% | 0.770 |",
                         "| trivial predictor | 1 | 0.510 | |", "| trivial predictor | 2 | 0.510 | |"]


def test_per_seed_cells_with_predictions_carry_their_interval_and_the_bootstrap_guard(tmp_path):
    import numpy as np

    y = np.array([0, 1] * 200)
    good = y.copy()
    good[:40] = 1 - good[:40]  # 90% right
    np.savez(tmp_path / "sst2-lora-1.npz", predictions=good, labels=y)
    np.savez(tmp_path / "sst2-fg-40-kd-1.npz", predictions=np.ones_like(y), labels=y)  # the majority class
    rows = [{"task": "sst2", "config": "lora", "seed": 1, "score": 0.9, "trivial_score": 0.5, "n_eval": 400},
            {"task": "sst2", "config": "fg-40-kd", "seed": 1, "score": 0.5, "trivial_score": 0.5, "n_eval": 400,
             "sparsity": 0.4}]
    lines = cf.per_seed_table(rows, ["lora", "fg-40-kd"], ["sst2"], tmp_path).splitlines()
    lo, hi = (float(x) for x in lines[2].split("[")[1].split("]")[0].split(", "))
    assert lo < 0.9 < hi and hi - lo == pytest.approx(2 * 1.96 * (0.9 * 0.1 / 400) ** 0.5, abs=0.01)
    assert lines[3].startswith("| fg-40-kd | 1 | 0.500 [") and lines[3].endswith("] / 40% (chance) | 0.500 |")


def test_finegates_rows_through_the_trusted_selector(tmp_path):
    import numpy as np

    from tasks import get_task
    from tasks.data import split_eval

    y = np.array([0, 1] * 100)
    chance = np.ones_like(y)  # always class 1: the trivial predictor
    _, held_out = split_eval(get_task("qnli"), y, 0.5, 7)  # the report half the selector will hold out
    overfit = y.copy()
    overfit[held_out] = 1 - y[held_out]  # right on the selection half, wrong on every held-out example
    rows = []
    for task, good in (("sst2", y), ("rte", chance), ("qnli", overfit)):
        for config, sparsity in (("fg-0-kd", 0.05), ("fg-40-kd", 0.41), ("lora", 0.0)):
            np.savez(tmp_path / f"{task}-{config}-7.npz", predictions=good, labels=y)
            rows.append({"task": task, "config": config, "seed": 7, "score": 1.0, "sparsity": sparsity})
    lines = cf.selector_table(rows, ["fg-0-kd", "fg-40-kd", "lora"], ["sst2", "rte", "qnli"], tmp_path,
                              [0.02]).splitlines()
    assert lines[2] == ("| budget 0.02 | 7 | 1.000 (selection 1.000 [1.000, 1.000]) / 41% `fg-40-kd` | not learned | "
                        "not confirmed: `fg-40-kd` 0.000 on the held-out part, trivial 0.500 | 1.000 (partial) |")


def test_differences_from_a_reference_are_paired_with_their_interval(tmp_path):
    """Each config minus the reference on the same examples, in points, with its paired bootstrap interval (20
    more errors in 400 examples: -5 points, SE 1.1), the mean over tasks and the worst task; a task without the
    reference's predictions is left out, and the mean says it is partial."""
    import numpy as np

    y = np.array([0, 1] * 200)
    ref, worse = y.copy(), y.copy()
    ref[:40] = 1 - ref[:40]          # 90% right
    worse[:40] = 1 - worse[:40]
    worse[100:120] = 1 - worse[100:120]  # the same errors and 20 more: 85%
    for task, a, b in (("sst2", worse, ref), ("qnli", ref, ref)):
        np.savez(tmp_path / f"{task}-lora-1.npz", predictions=b, labels=y)
        np.savez(tmp_path / f"{task}-fg-40-kd-1.npz", predictions=a, labels=y)
    np.savez(tmp_path / "rte-fg-40-kd-1.npz", predictions=ref, labels=y)  # no lora run of rte
    rows = [{"task": t, "config": c, "seed": 1, "score": 0.0} for t in ("sst2", "qnli", "rte")
            for c in ("lora", "fg-40-kd")]
    lines = cf.difference_table(rows, ["lora", "fg-40-kd"], ["sst2", "qnli", "rte"], tmp_path, "lora").splitlines()
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "fg-40-kd" and cells[2] == "+0.0 [+0.0, +0.0]" and cells[3] == "-"
    d, lo, hi = (float(x) for x in cells[1].replace("[", "").replace("]", "").replace(",", "").split())
    assert d == -5.0 and -9 < lo < -5 < hi < -1.5  # paired: SE sqrt(0.05 * 0.95 / 400) = 1.1 points
    assert cells[4].startswith("-2.5 [") and cells[4].endswith("(partial)") and cells[5] == "sst2 -5.0"


def test_bad_head_lr_or_budgets_are_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    for args, message in ((["--head-lr", "0"], "--head-lr 0.0 is invalid; accepted: a finite number > 0"),
                          (["--budgets", "0.02,abc"], "--budgets '0.02,abc' is invalid; accepted: comma-separated "
                                                      "numbers in [0, 1]"),
                          (["--vs", "loRA", "--predictions-dir", str(tmp_path)],
                           f"--vs 'loRA' is invalid; accepted: one of the configs ({', '.join(cf.CONFIGS)}), "
                           "with --predictions-dir")):
        assert cf.main(["--jsonl", str(out), "--table-only", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {message}"]
    assert not out.exists()


def test_the_teacher_rows_train_exactly_their_teachers():
    from finegates.config import TrainConfig
    from finegates.distill import teacher_config, teacher_of_run
    from finegates.train import build_parser

    fields = set(TrainConfig.__dataclass_fields__)
    for config, kind in cf.PUBLISHES.items():  # the flags one_run gives finegates.train, as its CLI reads them
        args = build_parser().parse_args(["--task", "stsb", "--seed", "7", "--latency-repeats", "3",
                                          *cf.CONFIGS[config]])
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
        assert teacher_of_run(cfg) == teacher_config(TrainConfig(task="stsb", seed=7, teacher=kind)), config


def test_the_teacher_row_runs_first_and_its_students_after_it():
    a = argparse.Namespace(head_lr=None)
    configs = ("fg-40-kdinit", "lora", "fgl-40-kdfull", "fgl-40-kd", "bitfit")
    jobs = [(t, c, 1) for c in configs for t in ("qnli", "sst2")]
    order, deps = cf.schedule(jobs, a)
    assert order[:4] == [("qnli", "lora", 1), ("sst2", "lora", 1), ("qnli", "fgl-40-kdfull", 1),
                         ("sst2", "fgl-40-kdfull", 1)]  # no full row: the first student trains that teacher
    assert deps == {(t, c, 1): (t, "lora", 1) for t in ("qnli", "sst2") for c in ("fg-40-kdinit", "fgl-40-kd")}
    # with one head lr for every row the lora row is not a teacher: the first student makes it
    order, deps = cf.schedule(jobs, argparse.Namespace(head_lr=1e-3))
    assert order[0] == ("qnli", "fg-40-kdinit", 1) and deps[("qnli", "fgl-40-kd", 1)] == ("qnli", "fg-40-kdinit", 1)
    # the runner starts a job only after the one it waits for has finished, and keeps the other worker busy
    events = []
    lock = __import__("threading").Lock()

    def fn(job):
        with lock:
            events.append(("start", job))
        __import__("time").sleep(0.05 if job == "slow" else 0.01)
        with lock:
            events.append(("end", job))

    cf.run_jobs(["slow", "fast", "after-slow", "after-fast"], {"after-slow": "slow", "after-fast": "fast"}, fn, 2)
    assert events.index(("end", "slow")) < events.index(("start", "after-slow"))
    assert events.index(("start", "after-fast")) < events.index(("end", "slow"))  # not held up by the slow one
    with pytest.raises(RuntimeError, match="boom"):  # a failing job is raised, after the others ran
        cf.run_jobs(["a", "b"], {}, lambda j: (_ for _ in ()).throw(RuntimeError("boom")) if j == "a" else None, 2)


def test_a_teacher_row_is_charged_to_the_students_that_reuse_it():
    rows = [{"task": "sst2", "config": "lora", "seed": 1, "score": 0.8, "sparsity": 0.0, "train_time_s": 60.0,
             "teacher_published": True},
            {"task": "sst2", "config": "fgl-40-kd", "seed": 1, "score": 0.79, "sparsity": 0.4, "train_time_s": 100.0,
             "teacher_score": 0.8, "teacher_train_time_s": 60.0, "teacher_reused": True}]
    lines = cf.table(rows, ["lora", "fgl-40-kd"], ["sst2"]).splitlines()
    assert lines[2].endswith("| 60 |") and lines[3].endswith("| 160 |")  # the student pays the teacher's share
    assert any(x.startswith("Teachers (LoRA r8") and "sst2 0.800 in 60 s (shared by 1 runs)" in x for x in lines)
