"""Retries of tracking calls (tune.tracking.with_retry) against real MLflow stores: transient errors (a server
that does not answer) are retried until the deadline, refusals (4xx) are not; epoch metrics the server missed
are kept and written later; a bad $FINEGATES_MLFLOW_RETRY_S is one error line."""
import socket

import pytest
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from tune.tracking import RETRY_ENV, Tracker, TrackingError, is_transient, retry_deadline_s, with_retry


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _counted(fn):
    calls = []

    def wrapped():
        calls.append(1)
        return fn()

    return wrapped, calls


@pytest.mark.parametrize("raw", ["abc", "-1", "inf", "nan", "3 min"])
def test_a_bad_retry_deadline_is_one_error_line(monkeypatch, raw):
    monkeypatch.setenv(RETRY_ENV, raw)
    with pytest.raises(TrackingError) as e:
        retry_deadline_s()
    assert str(e.value) == (f"{RETRY_ENV}={raw!r} is not a number of seconds; accepted: a number >= 0 (how long a "
                            "tracking call retries while the server is away; default 180, 0 = one attempt)")


def test_the_retry_deadline_defaults_to_180_s_and_reads_the_environment(monkeypatch):
    monkeypatch.delenv(RETRY_ENV, raising=False)
    assert retry_deadline_s() == 180
    monkeypatch.setenv(RETRY_ENV, "2.5")
    assert retry_deadline_s() == 2.5


def test_tune_run_refuses_a_bad_retry_deadline_before_starting(monkeypatch, capsys, glue_dir, tmp_path):
    from tune.run import main

    monkeypatch.setenv(RETRY_ENV, "soon")
    code = main(["--smoke-test", "--tasks", "rte", "--data-dir", str(glue_dir), "--mlflow-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(tmp_path / "out"),
                 "--storage", str(tmp_path / "ray")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: {RETRY_ENV}='soon' is not a number of seconds; accepted: a number >= 0 (how long a "
                   "tracking call retries while the server is away; default 180, 0 = one attempt)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_a_server_that_does_not_answer_is_retried_until_the_deadline(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # one HTTP request per attempt
    client = MlflowClient(f"http://127.0.0.1:{_closed_port()}")
    fn, calls = _counted(lambda: client.get_experiment_by_name("x"))
    with pytest.raises(MlflowException) as e:
        with_retry(fn, "probe", deadline_s=2.5)
    # what MLflow raises when the server is down: an MlflowException (INTERNAL_ERROR) wrapping requests' error
    assert e.value.error_code == "INTERNAL_ERROR" and "ConnectionError" in type(e.value.__context__).__name__
    assert is_transient(e.value)
    assert len(calls) >= 3  # retried (after 1 s, 2 s ...) until the deadline, then raised
    fn, calls = _counted(lambda: client.get_experiment_by_name("x"))
    with pytest.raises(MlflowException):
        with_retry(fn, "probe", deadline_s=0)
    assert len(calls) == 1  # deadline 0: one attempt


def test_a_refused_call_is_not_retried(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    client.log_batch(run_id, params=[Param("x", "1")])
    fn, calls = _counted(lambda: client.log_batch(run_id, params=[Param("x", "2")]))
    with pytest.raises(MlflowException) as e:
        with_retry(fn, "change a param", deadline_s=60)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and not is_transient(e.value)
    assert len(calls) == 1
    fn, calls = _counted(lambda: client.get_run("0" * 32))
    with pytest.raises(MlflowException) as e:
        with_retry(fn, "missing run", deadline_s=60)
    assert e.value.error_code == "RESOURCE_DOES_NOT_EXIST" and len(calls) == 1


@pytest.mark.slow  # starts an MLflow server
def test_epoch_metrics_logged_while_the_server_is_away_are_written_later(loopback_only, monkeypatch, tmp_path):
    from tests.tune.test_cluster_local import Server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = Server(tmp_path)
    server.start()
    try:
        tracker = Tracker(server.uri, "away")
        run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
        tracker.log_epoch(run_id, {"score": 0.5, "train_loss": 1.0}, step=1)  # written at once
        server.stop()
        tracker.log_epoch(run_id, {"score": 0.6, "train_loss": 0.9}, step=2)  # one attempt: kept, training goes on
        tracker.log_epoch(run_id, {"score": 0.7, "train_loss": 0.8}, step=3)
        assert [m.step for m in tracker._pending[run_id]] == [2, 2, 3, 3]
        server.start()  # same backend store and port
        tracker.finish_trial(run_id, {"epochs_completed": 3, "score": 0.7, "sparsity": 0.3}, None)
        history = tracker.client.get_metric_history(run_id, "score")
        assert sorted((m.step, m.value) for m in history)[:3] == [(1, 0.5), (2, 0.6), (3, 0.7)]
        assert sorted(m.step for m in tracker.client.get_metric_history(run_id, "train_loss")) == [1, 2, 3]
        assert tracker.client.get_run(run_id).info.status == "FINISHED" and not tracker._pending
    finally:
        server.stop()
