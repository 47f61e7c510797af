"""Bad input to the three commands (``tune.run``, ``tune.select``, ``finegates.train``) and the loaders,
with real fixtures: corrupted copies of GLUE Parquet files, a truncated safetensors file, a model of an
unsupported family, output paths that are files, an address where nothing listens. Every case is
refused before anything starts: the expected lines (one per problem, each naming the bad value), the
exit code, no traceback, nothing written, no Ray started. docs/RELIABILITY.md lists the cases with their
messages; keep both in step.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tests.tune.conftest import loopback_only, run_cli  # noqa: F401 - the fixture is used by name

# ---------------------------------------------------------------------------------------------------
# fixtures: corrupted copies of the real data and model (built once per module, read-only afterwards)


def _copy_task(glue_dir: Path, root: Path, task: str) -> Path:
    (root / task).mkdir(parents=True, exist_ok=True)
    for f in (glue_dir / task).glob("*.parquet"):
        shutil.copy(f, root / task / f.name)
        os.chmod(root / task / f.name, 0o644)
    return root / task


def _data_variants(glue_dir: Path, base: Path) -> dict[str, Path]:
    """name -> a GLUE directory whose one task has exactly one defect."""
    out = {}

    def variant(name: str, task: str) -> Path:
        out[name] = base / name
        return _copy_task(glue_dir, base / name, task)

    d = variant("truncated", "rte")
    raw = (d / "train.parquet").read_bytes()
    (d / "train.parquet").write_bytes(raw[: len(raw) // 2])
    d = variant("no_column", "rte")
    pd.read_parquet(d / "validation.parquet").drop(columns=["sentence2"]).to_parquet(d / "validation.parquet")
    d = variant("labels_shifted", "rte")
    df = pd.read_parquet(d / "train.parquet")
    df["label"] = df["label"] + 1  # 0..1 -> 1..2: label 2 is outside RTE's range
    df.to_parquet(d / "train.parquet")
    d = variant("negative_labels", "sst2")
    df = pd.read_parquet(d / "validation.parquet")
    df.loc[df.index[:5], "label"] = -1  # the GLUE test split's "no label"
    df.to_parquet(d / "validation.parquet")
    d = variant("empty_validation", "rte")
    pd.read_parquet(d / "validation.parquet").iloc[:0].to_parquet(d / "validation.parquet")
    d = variant("float_labels", "rte")
    df = pd.read_parquet(d / "train.parquet")
    df["label"] = df["label"].astype("float64") + 0.5
    df.to_parquet(d / "train.parquet")
    d = variant("stsb_nan", "stsb")
    df = pd.read_parquet(d / "validation.parquet")
    df.loc[df.index[:3], "label"] = np.nan
    df.to_parquet(d / "validation.parquet")
    d = variant("stsb_text", "stsb")
    df = pd.read_parquet(d / "train.parquet")
    df["label"] = df["label"].astype(str)
    df.to_parquet(d / "train.parquet")
    d = variant("not_parquet", "rte")
    (d / "validation.parquet").write_text("sentence1,sentence2,label\na,b,0\n")
    d = variant("no_train", "rte")
    (d / "train.parquet").unlink()
    return out


def _model_variants(minilm: Path, base: Path) -> dict[str, Path]:
    out = {}

    def variant(name: str) -> Path:
        d = base / name
        d.mkdir(parents=True)
        for f in minilm.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                (d / f.name).symlink_to(f)
        out[name] = d
        return d

    d = variant("truncated_weights")
    raw = (minilm / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) - 4096])
    d = variant("distilbert")
    (d / "config.json").unlink()
    (d / "config.json").write_text('{"model_type": "distilbert", "dim": 384, "n_layers": 6, "n_heads": 12}')
    (d / "model.safetensors").symlink_to(minilm / "model.safetensors")
    variant("no_weights")
    d = variant("bad_config")
    (d / "config.json").unlink()
    (d / "config.json").write_text('{"model_type": "bert", ')
    (d / "model.safetensors").symlink_to(minilm / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory, glue_dir, minilm_dir):
    base = tmp_path_factory.mktemp("bad-input")
    a_file = base / "a-file.txt"
    a_file.write_text("not a directory\n")
    (base / "db-dir.db").mkdir()
    with socket.socket() as s:  # a loopback port where nothing listens (bound, read, released)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = base / "store"
    store.mkdir()
    _selector_store(store)
    studies = _optuna_store(base / "optuna")
    return SimpleNamespace(studies=studies, glue=glue_dir, data=_data_variants(glue_dir, base / "data"),
                           model=_model_variants(Path(minilm_dir), base / "models"), file=a_file,
                           db_dir=base / "db-dir.db", port=port, store=store, store_uri=f"sqlite:///{store / 'mlflow.db'}")


def _selector_store(root: Path) -> None:
    """A real SQLite MLflow store with experiment 'failed' (one rte trial, FAILED) and 'nothing' (no run)."""
    from mlflow import MlflowClient

    from tune.tracking import TAG_ROLE, TAG_SWEEP, TAG_TASK, TAG_TRIAL

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.create_experiment("failed", artifact_location=(root / "artifacts").as_uri())
    run = c.create_run(exp, tags={TAG_ROLE: "trial", TAG_TASK: "rte", TAG_SWEEP: "failed", TAG_TRIAL: "t1",
                                  "error": "TaskError: boom"})
    c.set_terminated(run.info.run_id, status="FAILED")
    c.create_experiment("nothing", artifact_location=(root / "artifacts2").as_uri())


def _optuna_store(root: Path) -> str:
    """A real Optuna SQLite storage where the smoke sweep's rte study already has one finished trial."""
    import optuna
    from optuna.trial import create_trial

    root.mkdir()
    url = f"sqlite:///{root / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="finegates-smoke/rte/finegates",
                                directions=["maximize", "maximize"])
    study.add_trial(create_trial(values=[0.6, 0.0]))
    return url


# ---------------------------------------------------------------------------------------------------
# the cases: (id, command, args(fx, tmp), expected lines (substrings, one per stderr line), exit code)

RTE = ["--tasks", "rte"]
SWEEP = ["--smoke-test", "--tasks", "rte", "--verbose", "0"]
TRAIN = ["--task", "rte", "--smoke-test", "--no-progress"]
RANGE = "accepted: integers 0..1 (entailment, not_entailment)"

CASES = [
    # --- tune.run: data
    ("run-truncated-parquet", "tune.run", lambda f, t: SWEEP + ["--data-dir", f.data["truncated"]],
     ["task 'rte': cannot read", "truncated/rte/train.parquet", "accepted: a complete Parquet file"], 2),
    ("run-dropped-column", "tune.run", lambda f, t: SWEEP + ["--data-dir", f.data["no_column"]],
     ["validation.parquet lacks column(s) sentence2; accepted: the HF glue schema sentence1, sentence2, label"], 2),
    ("run-labels-out-of-range", "tune.run", lambda f, t: SWEEP + ["--data-dir", f.data["labels_shifted"]],
     ["train.parquet has 1241 labels outside the task's range (e.g. 2); " + RANGE], 2),
    ("run-negative-labels", "tune.run", lambda f, t: ["--smoke-test", "--tasks", "sst2", "--data-dir",
                                                      f.data["negative_labels"]],
     ["sst2/validation.parquet has 5 labels outside the task's range (e.g. -1); accepted: integers 0..1"], 2),
    ("run-empty-validation", "tune.run", lambda f, t: SWEEP + ["--data-dir", f.data["empty_validation"]],
     ["rte/validation.parquet has no rows; accepted: a split with at least one example"], 2),
    ("run-float-labels", "tune.run", lambda f, t: SWEEP + ["--data-dir", f.data["float_labels"]],
     ["rte/train.parquet has labels of dtype float64; " + RANGE], 2),
    ("run-stsb-nan-target", "tune.run", lambda f, t: ["--smoke-test", "--tasks", "stsb", "--data-dir",
                                                      f.data["stsb_nan"]],
     ["stsb/validation.parquet has 3 missing or infinite labels; accepted: finite numbers"], 2),
    ("run-stsb-text-target", "tune.run", lambda f, t: ["--smoke-test", "--tasks", "stsb", "--data-dir",
                                                       f.data["stsb_text"]],
     ["stsb/train.parquet has non-numeric labels (dtype object); accepted: a numeric regression target"], 2),
    ("run-not-parquet", "tune.run", lambda f, t: SWEEP + ["--data-dir", f.data["not_parquet"]],
     ["rte/validation.parquet (ArrowInvalid"], 2),
    ("run-no-train-split", "tune.run", lambda f, t: SWEEP + ["--data-dir", f.data["no_train"]],
     ["task 'rte' has no split 'train'", "(found: validation); accepted: <data-dir>/rte/train.parquet"], 2),
    # --- tune.run: model
    ("run-truncated-safetensors", "tune.run", lambda f, t: SWEEP + ["--model", f.model["truncated_weights"]],
     ["truncated_weights/model.safetensors' are unreadable (SafetensorError", "accepted: a complete safetensors file"], 2),
    ("run-unsupported-family", "tune.run", lambda f, t: SWEEP + ["--model", f.model["distilbert"]],
     ["model type 'distilbert' is not supported; accepted: bert, camembert, llama, roberta"], 2),
    ("run-no-weights", "tune.run", lambda f, t: SWEEP + ["--model", f.model["no_weights"]],
     ["has no weights file; accepted: model.safetensors or pytorch_model.bin"], 2),
    ("run-bad-config", "tune.run", lambda f, t: SWEEP + ["--model", f.model["bad_config"]],
     ["cannot load its config", "accepted: a Hugging Face model directory or hub id"], 2),
    # --- tune.run: paths, store, address, resume, sizes
    ("run-out-is-a-file", "tune.run", lambda f, t: SWEEP + ["--out", f.file],
     ["--out '", "a-file.txt' is an existing file; accepted: a directory (existing or to be created)"], 2),
    ("run-out-under-a-file", "tune.run", lambda f, t: SWEEP + ["--out", f.file / "out"],
     ["--out '", "cannot be created: '", "a-file.txt' is a file"], 2),
    ("run-storage-is-a-file", "tune.run", lambda f, t: SWEEP + ["--storage", f.file],
     ["--storage '", "a-file.txt' is an existing file"], 2),
    ("run-sqlite-store-is-a-dir", "tune.run", lambda f, t: SWEEP + ["--mlflow-uri", f"sqlite:///{f.db_dir}"],
     ["db-dir.db' is a directory; accepted: sqlite:///<path of a database file>"], 2),
    ("run-address-nothing-listens", "tune.run", lambda f, t: SWEEP + ["--address", f"127.0.0.1:{f.port}"],
     ["--address '127.0.0.1:", "nothing answers at 127.0.0.1:", "within 3 s (Connection refused)"], 2),
    ("run-ray-client-nothing-listens", "tune.run", lambda f, t: SWEEP + ["--address", f"ray://127.0.0.1:{f.port}"],
     ["--address 'ray://127.0.0.1:", "nothing answers"], 2),
    ("run-address-bad-port", "tune.run", lambda f, t: SWEEP + ["--address", "127.0.0.1:http"],
     ["--address '127.0.0.1:http'"], 2),
    ("run-resume-nothing", "tune.run", lambda f, t: SWEEP + ["--resume", "--storage", str(t / "ray")],
     ["--resume: there is no sweep 'finegates-smoke' to resume in", "or --resume-or-start to start it"], 2),
    ("run-resume-both-flags", "tune.run", lambda f, t: SWEEP + ["--resume", "--resume-or-start"],
     ["--resume and --resume-or-start exclude each other"], 2),
    ("run-max-eval-not-a-number", "tune.run", lambda f, t: SWEEP + ["--max-eval", "lots"],
     ["--max-eval 'lots' is not an integer; accepted: a positive integer or 'all'"], 2),
    ("run-stop-k-zero", "tune.run", lambda f, t: SWEEP + ["--stop-k", "0"],
     ["--stop-k 0 is invalid; accepted: an integer >= 1"], 2),
    ("run-stop-margin-negative", "tune.run", lambda f, t: SWEEP + ["--stop-margin", "-0.1"],
     ["--stop-margin -0.1 is out of range; accepted: a number in [0, 1)"], 2),
    ("run-stop-rungs-not-epochs", "tune.run", lambda f, t: SWEEP + ["--stop-rungs", "first"],
     ["--stop-rungs 'first' is invalid; accepted: 'all' or a comma list of epochs >= 1"], 2),
    ("run-teacher-init-without-teacher", "tune.run", lambda f, t: SWEEP + ["--teacher", "none", "--teacher-init"],
     ["--teacher-init needs a teacher, got --teacher none; accepted: --teacher lora or full"], 2),
    ("run-max-length-beyond-the-model", "tune.run", lambda f, t: SWEEP + ["--max-length", "600"],
     ["--max-length 600 is longer than model '", "takes (512 tokens: its position embeddings); accepted: an integer "
      "in [5, 512]"], 2),
    # RTE's inputs are pairs: [CLS] a [SEP] b [SEP] needs 5 tokens to keep a word of each text
    ("run-max-length-below-the-special-tokens", "tune.run", lambda f, t: SWEEP + ["--max-length", "2"],
     ["--max-length 2 is too short: the tokenizer of model '", "adds 3 special tokens to a sentence pair, so under 5 "
      "tokens no word of one of its two texts is left", "accepted: an integer in [5, 512]"], 2),
    ("run-gpus-beyond-the-local-ray", "tune.run", lambda f, t: SWEEP + ["--gpus-per-trial", "64"],
     ["--gpus-per-trial 64 asks for more than this machine's Ray has (", "GPUs): no trial could start; accepted: ",
      "or --address of a cluster with GPU nodes"], 2),
    ("run-cpus-beyond-the-local-ray", "tune.run", lambda f, t: SWEEP + ["--cpus-per-trial", "1000"],
     ["--cpus-per-trial 1000 asks for more than this machine's Ray has (", "CPUs): no trial could start; accepted: "
      "a number in (0, "], 2),
    ("run-two-problems", "tune.run", lambda f, t: SWEEP + ["--data-dir", f.data["labels_shifted"], "--out", f.file],
     ["labels outside the task's range", "--out '"], 2),
    # --- tune.select
    ("select-no-finished-trial", "tune.select", lambda f, t: ["--experiment", "failed", "--mlflow-uri", f.store_uri,
                                                              "--out", str(t / "sel")],
     ["sweep 'failed' has no finished trial (1 trial runs, none FINISHED with a score): nothing to select"], 1),
    ("select-empty-experiment", "tune.select", lambda f, t: ["--experiment", "nothing", "--mlflow-uri",
                                                             f.store_uri, "--out", str(t / "sel")],
     ["sweep 'nothing' has no finished trial (0 trial runs"], 1),
    ("select-task-not-in-sweep", "tune.select", lambda f, t: ["--experiment", "failed", "--tasks", "sst2",
                                                              "--mlflow-uri", f.store_uri, "--out", str(t / "sel")],
     ["--tasks 'sst2' is not in sweep 'failed'; its tasks: rte"], 1),
    ("select-task-without-finished-trial", "tune.select", lambda f, t: ["--experiment", "failed", "--tasks", "rte",
                                                                        "--mlflow-uri", f.store_uri, "--out",
                                                                        str(t / "sel")],
     ["task 'rte' has no finished trial in sweep 'failed': nothing to select"], 1),
    ("select-unknown-task", "tune.select", lambda f, t: ["--experiment", "failed", "--tasks", "rtee",
                                                         "--mlflow-uri", f.store_uri, "--out", str(t / "sel")],
     ["unknown task 'rtee'; accepted: cola"], 2),
    ("select-out-is-a-file", "tune.select", lambda f, t: ["--experiment", "failed", "--mlflow-uri", f.store_uri,
                                                          "--out", f.file],
     ["--out '", "a-file.txt' is an existing file"], 2),
    ("select-unknown-experiment", "tune.select", lambda f, t: ["--experiment", "nope", "--mlflow-uri", f.store_uri,
                                                               "--out", str(t / "sel")],
     ["--experiment 'nope' does not exist in sqlite:///"], 2),
    # --- finegates.train
    ("train-truncated-parquet", "finegates.train", lambda f, t: TRAIN + ["--data-dir", f.data["truncated"]],
     ["task 'rte': cannot read", "truncated/rte/train.parquet"], 2),
    ("train-labels-out-of-range", "finegates.train", lambda f, t: TRAIN + ["--data-dir", f.data["labels_shifted"]],
     ["labels outside the task's range (e.g. 2); " + RANGE], 2),
    ("train-empty-validation", "finegates.train", lambda f, t: TRAIN + ["--data-dir", f.data["empty_validation"]],
     ["rte/validation.parquet has no rows"], 2),
    ("train-dropped-column", "finegates.train", lambda f, t: TRAIN + ["--data-dir", f.data["no_column"]],
     ["lacks column(s) sentence2"], 2),
    ("train-truncated-safetensors", "finegates.train", lambda f, t: TRAIN + ["--model", f.model["truncated_weights"]],
     ["model.safetensors' are unreadable (SafetensorError"], 2),
    ("train-unsupported-family", "finegates.train", lambda f, t: TRAIN + ["--model", f.model["distilbert"]],
     ["model type 'distilbert' is not supported; accepted: bert, camembert, llama, roberta"], 2),
    ("train-output-dir-is-a-file", "finegates.train", lambda f, t: TRAIN + ["--output-dir", f.file],
     ["--output-dir '", "a-file.txt' is an existing file; accepted: a directory"], 2),
    ("train-output-dir-under-a-file", "finegates.train", lambda f, t: TRAIN + ["--output-dir", f.file / "x"],
     ["--output-dir '", "cannot be created"], 2),
    ("train-max-train-zero", "finegates.train", lambda f, t: TRAIN + ["--max-train", "0"],
     ["--max-train 0 must be > 0; accepted: a positive integer or 'all'"], 2),
    ("train-max-eval-not-a-number", "finegates.train", lambda f, t: TRAIN + ["--max-eval", "1e3"],
     ["--max-eval '1e3' is not an integer; accepted: a positive integer or 'all'"], 2),
    ("train-max-length-beyond-the-model", "finegates.train", lambda f, t: TRAIN + ["--max-length", "513"],
     ["--max-length 513 is longer than model '", "takes (512 tokens: its position embeddings); accepted: an integer "
      "in [5, 512]"], 2),
    ("train-max-length-empties-one-text-of-a-pair", "finegates.train", lambda f, t: TRAIN + ["--max-length", "4"],
     ["--max-length 4 is too short", "accepted: an integer in [5, 512]"], 2),
    ("train-max-length-below-the-special-tokens-of-a-sentence", "finegates.train",
     lambda f, t: ["--task", "sst2", "--smoke-test", "--no-progress", "--max-length", "1"],
     ["--max-length 1 is too short: the tokenizer of model '", "adds 2 special tokens to a sentence, so under 3 "
      "tokens no word of the sentence is left", "accepted: an integer in [3, 512]"], 2),
    ("train-latency-length-beyond-the-model", "finegates.train", lambda f, t: TRAIN + ["--latency-length", "1000"],
     ["--latency-length 1000 is longer than model '", "accepted: an integer in [1, 512]"], 2),
    ("train-teacher-cache-is-a-file", "finegates.train", lambda f, t: TRAIN + ["--teacher-cache", f.file],
     ["--teacher-cache '", "a-file.txt' is an existing file; accepted: a directory"], 2),
    ("train-teacher-init-without-teacher", "finegates.train", lambda f, t: TRAIN + ["--teacher", "none",
                                                                                    "--teacher-init"],
     ["--teacher-init needs a teacher, got --teacher none; accepted: --teacher lora or full"], 2),
    ("train-layer-distill-without-teacher", "finegates.train", lambda f, t: TRAIN + ["--teacher", "none",
                                                                                     "--layer-distill", "1"],
     ["layer_distill=1.0 is invalid; accepted: 0 without a teacher (--teacher none), or a teacher"], 2),
    ("train-teacher-epochs-zero", "finegates.train", lambda f, t: TRAIN + ["--teacher-epochs", "0"],
     ["teacher_epochs=0.0 is invalid; accepted: a number > 0, or none for the student's epochs"], 2),
    ("train-dual-reset-unknown", "finegates.train", lambda f, t: TRAIN + ["--dual-reset", "sometimes"],
     ["dual_reset='sometimes' is invalid; accepted: none, crossing"], 2),
    ("train-two-problems", "finegates.train", lambda f, t: TRAIN + ["--data-dir", f.data["truncated"], "--model",
                                                                    f.model["distilbert"]],
     ["task 'rte': cannot read", "model type 'distilbert'"], 2),
    # --- tune.run: the Optuna storage (--optuna-storage; default optuna.db beside the MLflow SQLite store)
    ("run-optuna-storage-not-a-url", "tune.run", lambda f, t: SWEEP + ["--optuna-storage", "optuna.db"],
     ["--optuna-storage 'optuna.db' is not a database URL; accepted: sqlite:///<path of a database file> or "
      "the SQLAlchemy URL of a database server"], 2),
    ("run-optuna-storage-in-memory", "tune.run", lambda f, t: SWEEP + ["--optuna-storage", "sqlite://"],
     ["--optuna-storage 'sqlite://' is an in-memory database: the studies would not outlive the sweep"], 2),
    ("run-optuna-storage-unknown-database", "tune.run",
     lambda f, t: SWEEP + ["--optuna-storage", "nosuchdb://h/optuna"],
     ["--optuna-storage 'nosuchdb://h/optuna': unknown database 'nosuchdb'"], 2),
    ("run-optuna-storage-under-a-file", "tune.run", lambda f, t: SWEEP + ["--optuna-storage",
                                                                          f"sqlite:///{f.file}/optuna.db"],
     ["--optuna-storage '", "cannot be created: '", "a-file.txt' is a file"], 2),
    ("run-optuna-storage-is-the-mlflow-db", "tune.run", lambda f, t: SWEEP + ["--optuna-storage", f.store_uri],
     ["holds tables of another application (", "not an Optuna storage; accepted: a database of its own"], 2),
    ("run-optuna-studies-exist", "tune.run", lambda f, t: SWEEP + ["--optuna-storage", f.studies],
     ["Optuna study 'finegates-smoke/rte/finegates' already has 1 trials in 'sqlite:///", "accepted: --resume to "
      "continue that sweep, or another --experiment or --optuna-storage"], 2),
]
#: cases that need the loopback-only namespace (they connect to 127.0.0.1)
NEEDS_LOOPBACK = {"run-address-nothing-listens", "run-ray-client-nothing-listens"}


def _main(command: str):
    if command == "tune.run":
        from tune.run import main
    elif command == "tune.select":
        from tune.select import main
    else:
        from finegates.train import main
    return main


def _args(command: str, fx, tmp: Path, build) -> list[str]:
    args = [str(a) for a in build(fx, tmp)]
    defaults = {"tune.run": ["--data-dir", str(fx.glue), "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--storage", str(tmp / "ray"), "--out", str(tmp / "out")],
                "finegates.train": ["--data-dir", str(fx.glue), "--output-dir", str(tmp / "out")],
                "tune.select": []}[command]
    for i in range(0, len(defaults), 2):  # a default only where the case gives no value of its own
        if defaults[i] not in args:
            args += defaults[i:i + 2]
    return args


#: cases that, were the check gone, would not fail but wait forever (a trial that can never start): they run as
#: processes under a time limit only (test_bad_input_as_a_process)
WOULD_WAIT = {"run-gpus-beyond-the-local-ray", "run-cpus-beyond-the-local-ray"}
IN_PROCESS = [c for c in CASES if c[0] not in WOULD_WAIT]


@pytest.mark.parametrize("name,command,build,expected,code", IN_PROCESS, ids=[c[0] for c in IN_PROCESS])
def test_bad_input_is_refused_before_anything_starts(name, command, build, expected, code, fx, tmp_path,
                                                     monkeypatch, capsys, request):
    import ray

    if name in NEEDS_LOOPBACK:
        request.getfixturevalue("loopback_only")
    work = tmp_path / "work"  # the working directory and every default output: must stay empty
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    got = _main(command)(_args(command, fx, tmp_path, build))
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    n_lines = 2 if name.endswith("two-problems") else 1
    assert got == code, err
    assert len(err) == n_lines and all(line.startswith("error: ") for line in err), err
    if n_lines == 1:
        for part in expected:
            assert part in err[0], (part, err)
    else:
        for part, line in zip(expected, err):
            assert part in line, (part, err)
    assert "Traceback" not in captured.err
    assert list(work.iterdir()) == []  # nothing written in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, storage, out or selection dir
    assert not ray.is_initialized()


# the same refusals through the real processes: exit code, one stderr line, no traceback, nothing written
PROCESS_CASES = ["run-address-nothing-listens", "select-no-finished-trial", "train-truncated-safetensors",
                 *sorted(WOULD_WAIT)]


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_bad_input_as_a_process(name, fx, tmp_path, loopback_only):
    _, command, build, expected, code = next(c for c in CASES if c[0] == name)
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    got, out, err = run_cli(command, _args(command, fx, tmp_path, build), cwd=work, timeout=120)
    lines = err.strip().splitlines()
    assert got == code, err[-3000:]
    assert len(lines) == 1 and all(p in lines[0] for p in expected), lines
    assert "Traceback" not in err and out == ""
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == before


# ---------------------------------------------------------------------------------------------------
# the loaders: the same checks as functions, and what load_split says of the same files


@pytest.mark.parametrize("variant,task,message", [
    ("truncated", "rte", "cannot read"),
    ("no_column", "rte", "lacks column(s) sentence2"),
    ("labels_shifted", "rte", "labels outside the task's range"),
    ("empty_validation", "rte", "has no rows"),
    ("stsb_nan", "stsb", "missing or infinite labels"),
])
def test_check_task_data(fx, variant, task, message):
    from tasks import check_task_data, get_task

    problems = check_task_data(get_task(task), fx.data[variant])
    assert len(problems) == 1 and message in problems[0], problems
    assert check_task_data(get_task(task), fx.glue) == []


def test_the_real_data_and_model_pass(fx, minilm_dir, tmp_path):
    from finegates.preflight import check_model, check_output_dir
    from tasks import GLUE, check_task_data, get_task

    assert [p for t in GLUE for p in check_task_data(get_task(t), fx.glue)] == []
    assert check_model(None) == [] and check_model(minilm_dir) == []
    assert check_output_dir(tmp_path / "a" / "b", "--out") == [] and not (tmp_path / "a").exists()


def test_loader_refuses_a_truncated_file_in_one_line(fx):
    from tasks import TaskError, get_task, load_split

    with pytest.raises(TaskError, match=r"cannot read .*train.parquet: ArrowInvalid") as e:
        load_split(get_task("rte"), "train", fx.data["truncated"])
    assert "\n" not in str(e.value)


def test_count_parser_is_shared(capsys):
    from finegates.config import ConfigError, parse_count

    assert parse_count("all", "--max-train") is None and parse_count("ALL", "--max-train") is None
    assert parse_count("12", "--max-train") == 12
    for bad in ("0", "-3", "1.5", ""):
        with pytest.raises(ConfigError, match="accepted: a positive integer or 'all'"):
            parse_count(bad, "--max-train")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
