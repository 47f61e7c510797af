"""A failing (NaN) trial does not stop the sweep; an interrupted sweep resumes without duplicates; the tracking
server away for 60 s mid-sweep loses nothing."""
import json
import signal
import sqlite3
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.tune.conftest import kill_group, run_cli, spawn_cli

pytestmark = pytest.mark.slow  # trains the real model / starts Ray and MLflow (fast lane: -m 'not slow')


def _runs(uri, experiment):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], "tags.`finegates.role` = 'trial'")


def _finished_count(db) -> int:
    """Finished trial runs, read straight from SQLite (read-only: never races the sweep's schema setup)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE "
                               "t.key = 'finegates.role' AND t.value = 'trial' AND r.status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _study_trials(db, name: str) -> dict[str, tuple]:
    """Ray trial id -> (Optuna number, state, values) of one study of the sweep's Optuna storage."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return {t.user_attrs["ray_trial_id"]: (t.number, t.state, t.values) for t in study.trials}


def test_a_nan_trial_is_recorded_as_failed_and_the_sweep_goes_on(loopback_only, glue_dir, tmp_path):
    """Also: two methods in one sweep share the experiment, the task's parent run and its plot."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # searched trials get a learning rate of ~1e37: the loss becomes NaN at the second step
    code, out, err = run_cli("tune.run", [
        "--smoke-test", "--tasks", "rte", "--methods", "finegates,propulsion", "--trials-per-task", "2",
        "--mlflow-uri", uri,
        "--storage", str(tmp_path / "ray"), "--out", str(tmp_path / "out"), "--experiment", "nan",
        "--data-dir", str(glue_dir), "--verbose", "0", "--search-space", '{"lr": [1e37, 1e38]}'], cwd=tmp_path)
    assert code == 0, err[-3000:]
    runs = _runs(uri, "nan")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    errors = [r.data.tags.get("error", "") for r in failed]
    assert all(errors) and any("TrainingDiverged" in e for e in errors), errors  # NaN loss (or an overflow)
    assert {r.data.tags["method"] for r in runs} == {"finegates", "propulsion"}
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    c = MlflowClient(uri)
    parent = runs[0].data.tags["mlflow.parentRunId"]
    plotted = c.download_artifacts(parent, "trials_rte.csv", str(tmp_path))
    text = open(plotted).read()
    assert "finegates" in text and "propulsion" in text
    # Ray recorded the trial as errored, and the selection was still written from the good one
    assert "ERROR" in err or "error" in err.lower()
    assert (tmp_path / "out" / "selection" / "selection.json").is_file()


def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(loopback_only, glue_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--smoke-test", "--tasks", "rte", "--trials-per-task", "4", "--mlflow-uri", uri,
            "--storage", str(tmp_path / "ray"), "--out", str(tmp_path / "out"), "--experiment", "resume",
            "--data-dir", str(glue_dir), "--verbose", "0"]
    p = spawn_cli("tune.run", args, tmp_path)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if _finished_count(tmp_path / "mlflow.db") >= 2:
                break
            assert p.poll() is None, p.stderr.read()[-3000:]
            time.sleep(1)
        kill_group(p, signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
        p.wait(timeout=120)
    finally:
        kill_group(p)
    first = {r.data.tags["ray_trial_id"]: r.info.status for r in _runs(uri, "resume")}
    finished_before = {t for t, s in first.items() if s == "FINISHED"}
    assert 2 <= len(finished_before) < 4, first
    # the study (default storage: optuna.db beside mlflow.db) holds the finished trials; the searched ones in
    # flight are RUNNING there (asked, not yet told)
    study_before = _study_trials(tmp_path / "optuna.db", "resume/rte/finegates")
    told_before = {k: v for k, v in study_before.items() if v[1] != TrialState.RUNNING}
    assert set(told_before) == finished_before, (study_before, first)
    assert all(v[1] == TrialState.COMPLETE for v in told_before.values())
    code, out, err = run_cli("tune.run", args + ["--resume"], cwd=tmp_path)
    assert code == 0, err[-3000:]
    runs = _runs(uri, "resume")
    ids = [r.data.tags["ray_trial_id"] for r in runs]
    assert len(ids) == 4 and len(set(ids)) == 4, ids  # the full count, no duplicate run
    assert all(r.info.status == "FINISHED" for r in runs)
    # finished trials were not rerun: their runs were not reopened
    assert all(r.data.tags.get("restarts") is None for r in runs if r.data.tags["ray_trial_id"] in finished_before)
    # the study kept its history: 4 Ray trials in the experiment, reference + 3 searched
    assert sum(r.data.params["reference"] == "True" for r in runs) == 1
    # ... read back from the Optuna storage: the trials told before are unchanged (numbers, values), and the
    # study now has exactly the 4 trials, all COMPLETE, with the MLflow runs' score and sparsity
    study_after = _study_trials(tmp_path / "optuna.db", "resume/rte/finegates")
    assert {k: study_after[k] for k in told_before} == told_before
    assert len(study_after) == 4 and {v[1] for v in study_after.values()} == {TrialState.COMPLETE}
    assert {k: v[2] for k, v in study_after.items()} == {
        r.data.tags["ray_trial_id"]: [r.data.metrics["score"], r.data.metrics["sparsity"]] for r in runs}


def test_a_task_whose_every_trial_failed_makes_the_sweep_fail(loopback_only, glue_dir, tmp_path):
    """Input that is valid but makes every trial fail (a gate learning rate of 1e38 sends the gates to infinity in
    the first step, and the loss to NaN in the second): the sweep exits 1 and says per task the first line of the
    trials' error; nothing is left RUNNING; the task's parent run is FAILED. Also: without --address the sweep starts
    its own Ray even when $RAY_ADDRESS names a cluster."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = run_cli("tune.run", [
        "--smoke-test", "--tasks", "rte", "--trials-per-task", "2", "--gate-lr", "1e38", "--teacher", "none",
        "--max-failures", "0", "--mlflow-uri", uri, "--storage", str(tmp_path / "ray"), "--out",
        str(tmp_path / "out"), "--experiment", "allfail", "--data-dir", str(glue_dir), "--verbose", "0"], cwd=tmp_path,
        # a local sweep starts its own Ray: an address in the environment (nothing listens there) is not used
        env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert code == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert lines == [lines[0]] and lines[0].startswith("error: task rte: no trial finished (2 failed); first error: "
                                                       "TrainingDiverged: loss became nan at step 1"), lines
    runs = _runs(uri, "allfail")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]
    c = MlflowClient(uri)
    parents = c.search_runs([c.get_experiment_by_name("allfail").experiment_id], "tags.`finegates.role` = 'parent'")
    assert [p.info.status for p in parents] == ["FAILED"]
    # the selector agrees: nothing to select, exit 1, one line
    code, out, err = run_cli("tune.select", ["--experiment", "allfail", "--mlflow-uri", uri, "--out",
                                             str(tmp_path / "sel")], cwd=tmp_path)
    assert code == 1 and err.strip().splitlines() == [
        "error: sweep 'allfail' has no finished trial (2 trial runs, none FINISHED with a score): nothing to select"]
    assert not (tmp_path / "sel").exists()



OUTAGE_S = 60


@pytest.fixture()
def server(loopback_only, tmp_path):
    from tests.tune.test_cluster_local import Server

    (tmp_path / "mlflow").mkdir()
    s = Server(tmp_path / "mlflow")
    s.start()
    yield s
    s.stop()


def test_tracking_server_stopped_60_s_mid_sweep_loses_nothing(server, glue_dir, tmp_path):
    """A real ``mlflow server`` (SQLite backend, 127.0.0.1) stops while both trials of a sweep train, after each
    logged its first epoch, and comes back 60 s later on the same store and port. The sweep exits 0, both trial
    runs are FINISHED with every epoch's metrics (those of the epochs trained while the server was away too), no
    run is duplicated or left RUNNING. Prints a ``RELIABILITY`` line (pytest -s)."""
    from tests.tune.test_cluster_local import trial_runs

    epochs = 3
    # 256 examples x 3 epochs (several seconds an epoch): the trials still train when the server stops
    d = spawn_cli("tune.run", [
        "--smoke-test", "--tasks", "rte", "--trials-per-task", "2", "--max-concurrent", "2", "--cpus-per-trial", "1",
        "--teacher", "none", "--max-train", "256", "--epochs", str(epochs), "--mlflow-uri", server.uri,
        "--experiment", "away", "--storage", str(tmp_path / "ray"), "--out", str(tmp_path / "out"),
        "--data-dir", str(glue_dir), "--verbose", "0", "--scheduler", "none"], tmp_path)  # every trial to its end
    c = MlflowClient(server.uri)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # both trials running, each with its first epoch logged
            runs = [r for r in trial_runs(server.uri, "away") if r.info.status == "RUNNING"]
            if len(runs) == 2 and all(c.get_metric_history(r.info.run_id, "train_loss") for r in runs):
                break
            assert d.poll() is None, d.stderr.read()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError("the trials never logged their first epoch")
        stopping = time.time()
        server.stop()
        gone = time.time()
        time.sleep(OUTAGE_S)  # no server process at all
        server.start()  # the same backend store and port
        back = time.time()
        assert d.wait(timeout=900) == 0, d.stderr.read()[-3000:]
    finally:
        kill_group(d)
    runs = trial_runs(server.uri, "away")
    ids = [r.data.tags["ray_trial_id"] for r in runs]
    # train_loss is an epoch metric only (the final metrics do not include it); score is logged at every epoch too
    epoch_metrics = {k: {r.info.run_id: c.get_metric_history(r.info.run_id, k) for r in runs}
                     for k in ("train_loss", "score")}
    steps = {k: {run_id: sorted(m.step for m in h) for run_id, h in hs.items()} for k, hs in epoch_metrics.items()}
    # epochs the trials trained while the server was away (their timestamps), written after it came back
    during = sum(stopping * 1000 <= m.timestamp <= back * 1000 for h in epoch_metrics["train_loss"].values() for m in h)
    print("RELIABILITY", json.dumps({
        "fault": "tracking server stopped mid-sweep", "down_after_exit_s": round(back - gone),  # 60 s without a process, then its restart
        "unreachable_s": round(back - stopping),  # also its shutdown (SIGTERM until exit)
        "runs_in_mlflow": len(runs), "duplicates": len(ids) - len(set(ids)),
        "finished": sum(r.info.status == "FINISHED" for r in runs),
        "left_running": sum(r.info.status == "RUNNING" for r in runs),
        "epochs_logged": sum(len(s) for s in steps["train_loss"].values()), "epochs_expected": epochs * len(runs),
        "epochs_from_the_outage": during}))
    assert len(runs) == 2 and len(set(ids)) == 2  # none lost, none duplicated
    assert all(r.info.status == "FINISHED" for r in runs)  # none failed, none left RUNNING
    assert all(s == list(range(1, epochs + 1)) for s in steps["train_loss"].values()), steps  # one per epoch
    assert all(set(s) == set(range(1, epochs + 1)) for s in steps["score"].values()), steps  # every epoch's score
    assert during >= 1  # epochs trained during the outage were kept and written, not dropped
    assert (tmp_path / "out" / "selection" / "selection.json").is_file()
