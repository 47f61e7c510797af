"""Bad input to ``python -m tune.run``: one clear line, exit 2, nothing started, nothing written."""
import pytest

from tune.run import main

CASES = [
    (["--budget", "-0.1"], "--budget -0.1 is out of range; accepted: numbers in [0, 1]"),
    (["--budget", "1.5"], "--budget 1.5 is out of range"),
    (["--budget", "abc"], "--budget 'abc' is not a number"),
    (["--budget", "0.01,abc"], "--budget 'abc' is not a number"),
    (["--tasks", "sst2,nope"], "unknown task 'nope'; accepted: cola, sst2"),
    (["--tasks", ","], "empty task list"),
    (["--trials-per-task", "0"], "--trials-per-task 0 must be >= 1"),
    (["--mlflow-uri", "http://127.0.0.1:9"], "MLflow tracking server 'http://127.0.0.1:9' is unreachable"),
    (["--storage", "runs/ray"], "--storage 'runs/ray' must be an absolute path or a URI"),
    (["--methods", "finegates,bogus"], "--methods 'bogus' is invalid; accepted: finegates, finegates-lora, gift-sw, sparta, propulsion, lora, bitfit, full"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial -1.0 must be >= 0"),
    (["--stop-rungs", "1,4", "--epochs", "3"], "--stop-rungs '1,4' has an epoch past the trials' last (3); accepted: "
                                               "'all' or epochs in 1..3"),
    (["--max-failures", "-1"], "--max-failures -1 is invalid; accepted: an integer >= 0 (retries of a trial whose "
                               "worker died)"),
    (["--max-train", "0"], "--max-train 0 must be > 0"),
    (["--search-space", "{bad"], "--search-space '{bad' is not a JSON object"),
    (["--search-space", '{"lr": [0, 1]}'], "search space lr=[0, 1] is invalid"),
    (["--search-space", '{"lamda": [1, 3]}'], "search space key 'lamda' is unknown; accepted: lr, rank, target_sparsity"),
    # a key of a method that is not in --methods is refused too
    (["--search-space", '{"k": [8, 64]}'], "search space key 'k' is unknown; accepted: lr, rank, target_sparsity"),
    # every value a trial may draw must make a valid trial: otherwise those trials would fail one by one in the sweep
    (["--search-space", '{"rank": {"choices": [0, -1]}}'],
     "--search-space rank: rank=-1 is invalid; accepted: an integer >= 0 (0 = gates only) (method finegates)"),
    (["--search-space", '{"rank": [1, 8]}'], "--search-space rank: rank=1.0 is invalid; accepted: an integer >= 0"),
    (["--search-space", '{"target_sparsity": {"choices": [0.5, 1.5]}}'],
     "--search-space target_sparsity: target_sparsity=1.5 is invalid; accepted: a number in [0, 1)"),
    (["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
    (["--seeds", "0"], "--seeds 0 is invalid; accepted: an integer >= 1"),
    (["--head-lr", "0"], "head_lr=0.0 is invalid; accepted: a finite number > 0, or none for the method's lr"),
    (["--max-recovery-frac", "1.5"], "max_recovery_frac=1.5 is invalid; accepted: none, or a number in [0, 1]"),
    (["--teacher-epochs", "0"], "teacher_epochs=0.0 is invalid; accepted: a number > 0"),
    (["--report-frac", "1.5"], "--report-frac 1.5 is out of range; accepted: a number in (0, 1)"),
    (["--report-frac", "0"], "--report-frac 0 is out of range"),
    (["--tasks", "rte", "--max-eval", "30"], "task 'rte': its evaluation set of 30 examples is too small to split at "
                                              "report fraction 0.5 (16 selection / 14 report)"),
]


@pytest.mark.parametrize("args,message", CASES)
def test_bad_input(args, message, tmp_path, monkeypatch, capsys, glue_dir):
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(args + ["--data-dir", str(glue_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written (no mlflow.db, no runs/)
    assert not ray.is_initialized()  # nothing started


def test_missing_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--data-dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_help_documents_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--trials-per-task", "--max-concurrent", "--cpus-per-trial", "--gpus-per-trial", "--model",
                "--methods", "--budget", "--mlflow-uri", "--experiment", "--storage", "--optuna-storage", "--address",
                "--resume", "--smoke-test", "--seed", "--data-dir", "--max-train", "--epochs"):
        assert opt in text, opt
    assert "default" in text


def test_selector_on_a_missing_store_writes_nothing(tmp_path, monkeypatch, capsys):
    from tune.select import main as select_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert select_main(["--experiment", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow store at sqlite:///" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,trials", [
    ([], 5),                                         # CPU default: early stopping pays for two more trials
    (["--scheduler", "none"], 3),                    # every trial runs all its epochs: the old default
    (["--trials-per-task", "4"], 4),                 # an explicit value wins
    (["--scheduler", "none", "--trials-per-task", "7"], 7),
    (["--scale", "gpu"], 12),
    (["--scale", "gpu", "--scheduler", "none"], 12),
])
def test_default_trials_per_task_follow_the_scheduler(extra, trials, tmp_path, glue_dir):
    from tune.run import build_parser, validate

    args = build_parser().parse_args(["--tasks", "sst2", "--data-dir", str(glue_dir), "--out", str(tmp_path / "out"),
                                      "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                      "--storage", str(tmp_path / "ray"), *extra])
    assert validate(args)["trials"] == trials


def test_recovery_and_teacher_options_reach_every_trial(tmp_path, glue_dir):
    """--teacher-epochs, --recovery-frac, --max-recovery-frac and --recovery-lr are the sweep's settings: each
    FineGates trial's TrainConfig carries them; left out, a trial has finegates' defaults."""
    from finegates.config import TrainConfig
    from tune.run import build_parser, validate
    from tune.trial import trial_config

    base = ["--tasks", "sst2", "--data-dir", str(glue_dir), "--out", str(tmp_path / "out"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(tmp_path / "ray")]
    searched = {"task": "sst2", "method": "finegates", "target_sparsity": 0.4, "lr": 1e-3}
    v = validate(build_parser().parse_args(base + ["--teacher-epochs", "2", "--recovery-frac", "0.25",
                                                   "--max-recovery-frac", "0.5", "--recovery-lr", "linear"]))
    cfg = trial_config(searched, v, str(tmp_path / "t"))
    assert (cfg.teacher_epochs, cfg.recovery_frac, cfg.max_recovery_frac, cfg.recovery_lr) == (2.0, 0.25, 0.5,
                                                                                               "linear")
    d = TrainConfig(task="sst2")
    cfg = trial_config(searched, validate(build_parser().parse_args(base)), str(tmp_path / "t"))
    assert (cfg.teacher_epochs, cfg.recovery_frac, cfg.max_recovery_frac, cfg.recovery_lr) == (
        d.teacher_epochs, d.recovery_frac, d.max_recovery_frac, d.recovery_lr)
    assert d.max_recovery_frac is not None  # so that none below turns a default off
    cfg = trial_config(searched, validate(build_parser().parse_args(base + ["--max-recovery-frac", "none"])),
                       str(tmp_path / "t"))
    assert cfg.max_recovery_frac is None
