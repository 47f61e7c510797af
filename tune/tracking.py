"""MLflow tracking of a sweep: one experiment per sweep, one parent run per task, one child run per
trial (logged from the worker that runs it), Pareto tags, per-task plots and the front table.

Every call goes through an explicit :class:`mlflow.MlflowClient` and explicit run ids (no fluent
"active run" state), so the same code works in Ray workers with reused actors and against a remote
tracking server. Child runs carry the tag ``ray_trial_id``: a trial that Ray restarts (a lost worker,
``--resume``) continues its own run instead of creating a duplicate.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from tune.pareto import Point, pareto_front

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_SWEEP = "finegates.sweep"
TAG_ROLE = "finegates.role"  # parent | trial
TAG_TASK = "task"
TAG_METHOD = "method"
TAG_TRIAL = "ray_trial_id"
TAG_PARETO = "pareto"
#: experiment tag: appended to the registered model names (``-smoke`` for a --smoke-test sweep)
TAG_REGISTRY_SUFFIX = "finegates.registry_suffix"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")

FINAL_METRICS = ("score", "sparsity", "gate_sparsity", "params_total", "params_trainable", "trainable_pct",
                 "params_exported", "latency_ms", "dense_latency_ms", "speedup", "train_time_s",
                 "export_max_abs_diff", "n_train", "n_eval", "teacher_score", "teacher_train_time_s",
                 "trivial_score", "speedup_q25", "speedup_q75", "cpu_latency_ms", "cpu_dense_latency_ms", "cpu_speedup",
                 "cpu_speedup_q25", "cpu_speedup_q75", "expected_sparsity_at_pin",
                 "schedule_closed")


class TrackingError(RuntimeError):
    """The tracking store cannot be used. One-line message."""


#: seconds a tracking call keeps retrying transient errors (server away, restarting, overloaded)
RETRY_ENV = "FINEGATES_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 180.0
#: the longest wait between two attempts (the backoff doubles from 1 s up to this)
MAX_BACKOFF_S = 10.0
#: MLflow's own HTTP retries per request unless MLFLOW_HTTP_REQUEST_MAX_RETRIES is set: its default (7, backoff
#: 0, 4, 8 ... 64 s) keeps one call retrying for about 4 minutes, longer than our deadline and up to a minute late
#: after the server is back; 2 (about 4 s against a stopped server) leaves the waiting to :func:`with_retry`
MLFLOW_HTTP_RETRIES = "2"
#: the most metrics one ``log_batch`` request may carry (MLflow's limit)
MAX_METRICS_PER_BATCH = 1000


def retry_deadline_s() -> float:
    """``$FINEGATES_MLFLOW_RETRY_S`` (default 180): a number of seconds >= 0; else one-line :class:`TrackingError`."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise TrackingError(f"{RETRY_ENV}={raw!r} is not a number of seconds; accepted: a number >= 0 (how long a "
                            f"tracking call retries while the server is away; default {DEFAULT_RETRY_S:g}, "
                            "0 = one attempt)")
    return value


def is_transient(e: BaseException) -> bool:
    """Worth retrying: the server could not be reached or did not answer in time (a connection error anywhere in
    the exception's chain: MLflow wraps the ``requests`` error in an :class:`MlflowException` with code
    INTERNAL_ERROR), the server answered 5xx or 429 (``RestException``), or the store said it is temporarily
    unavailable (a locked SQLite database). Not transient: every other answer (an invalid parameter, a missing
    run: 4xx) and errors of our own."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                          requests.exceptions.RetryError, ConnectionError, TimeoutError)):
            return True
        if isinstance(x, requests.HTTPError) and x.response is not None and x.response.status_code >= 500:
            return True  # an artifact upload or download the server answered with 5xx
        x = x.__cause__ or x.__context__
    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return status in (408, 429, 503, 504) or (isinstance(e, RestException) and status >= 500)
    return False


def with_retry(fn: Callable[[], T], what: str, deadline_s: float | None = None) -> T:
    """Call ``fn``; while it fails with a transient error (:func:`is_transient`: a tracking server that is away
    or restarting) retry with a backoff doubling from 1 s up to :data:`MAX_BACKOFF_S`, one warning per retry,
    until ``deadline_s`` seconds (default ``$FINEGATES_MLFLOW_RETRY_S``, else 180) have passed; then, or at once
    for any other error, raise the last error. ``deadline_s=0``: one attempt."""
    deadline_s = retry_deadline_s() if deadline_s is None else deadline_s
    end = time.monotonic() + deadline_s
    wait, attempt = 1.0, 1
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            left = end - time.monotonic()
            if not is_transient(e) or left <= 0:
                raise
            pause = min(wait, left)
            first = (str(e).splitlines() or [""])[0][:300]
            log.warning("MLflow %s failed (%s: %s); attempt %d, next in %.0f s (%.0f s of %g s left)", what,
                        type(e).__name__, first, attempt + 1, pause, left, deadline_s)
            time.sleep(pause)
            wait, attempt = min(2 * wait, MAX_BACKOFF_S), attempt + 1


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`TrackingError` (one line) unless the tracking store at ``uri`` answers (and
    ``$FINEGATES_MLFLOW_RETRY_S``, if set, is valid)."""
    retry_deadline_s()
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri!r} answered HTTP {r.status} on /health")
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"MLflow tracking server {uri!r} is unreachable ({type(e).__name__}: {e}); "
                                "start it or pass a reachable --mlflow-uri (http(s)://host:port, sqlite:///abs/path.db, "
                                "or a local directory)") from e
        return
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise TrackingError(f"MLflow store {uri!r}: directory {str(db.parent)!r} does not exist")
        return
    if "://" in uri and not uri.startswith("file://"):
        raise TrackingError(f"MLflow tracking URI {uri!r} is not supported; accepted: http(s)://..., sqlite:///..., "
                            "file:///... or a local path")


class Tracker:
    """A sweep's view of the MLflow store."""

    def __init__(self, uri: str, experiment: str | None = None, experiment_id: str | None = None,
                 retry_s: float | None = None) -> None:
        """``retry_s``: how long each call retries while the server is away (default ``$FINEGATES_MLFLOW_RETRY_S``,
        else 180 s; 0: one attempt, for best-effort callers)."""
        self.uri, self.retry_s = uri, retry_s
        if uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_HTTP_RETRIES)
        self.client = MlflowClient(tracking_uri=uri)
        #: per run: epoch metrics not yet written (the server was away); written with the run's next call
        self._pending: dict[str, list] = {}
        if experiment_id is None:
            assert experiment is not None
            exp = self._retry(lambda: self.client.get_experiment_by_name(experiment), "get experiment")
            experiment_id = exp.experiment_id if exp is not None else self._retry(
                lambda: self.client.create_experiment(experiment), "create experiment")
        self.experiment_id = experiment_id

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return with_retry(fn, what, self.retry_s)

    # ---- runs
    def find_runs(self, *filters: str, status: str | None = None) -> list:
        q = " and ".join(filters + ((f"attributes.status = '{status}'",) if status else ()))
        return self._retry(lambda: self.client.search_runs([self.experiment_id], q, max_results=5000), "search")

    def parent_run(self, sweep: str, task: str) -> str:
        """The task's parent run (created once, found again on resume)."""
        runs = self.find_runs(f"tags.`{TAG_ROLE}` = 'parent'", f"tags.`{TAG_TASK}` = '{task}'",
                              f"tags.`{TAG_SWEEP}` = '{sweep}'")
        if runs:
            run_id = runs[0].info.run_id
            if runs[0].info.status != "RUNNING":
                self._retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen parent run")
            return run_id
        run = self._retry(lambda: self.client.create_run(
            self.experiment_id, run_name=task, tags={TAG_ROLE: "parent", TAG_TASK: task, TAG_SWEEP: sweep}),
            "create parent run")
        return run.info.run_id

    def trial_run(self, sweep: str, parent_id: str, trial_id: str, task: str, method: str,
                  params: dict[str, Any]) -> str:
        """The trial's child run: reused when this trial id already has one (a restarted trial)."""
        runs = self.find_runs(f"tags.`{TAG_TRIAL}` = '{trial_id}'", f"tags.`{TAG_SWEEP}` = '{sweep}'")
        if runs:
            run_id = runs[0].info.run_id
            self._retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen run")
            self._retry(lambda: self.client.set_tag(run_id, "node_id", _node_id()), "tag")
            self._retry(lambda: self.client.set_tag(run_id, "restarts", str(int(runs[0].data.tags.get("restarts", "0")) + 1)),
                       "tag")
            return run_id
        tags = {"mlflow.parentRunId": parent_id, TAG_ROLE: "trial", TAG_TASK: task, TAG_METHOD: method,
                TAG_TRIAL: trial_id, TAG_SWEEP: sweep, TAG_PARETO: "false", "node_id": _node_id()}
        run = self._retry(lambda: self.client.create_run(self.experiment_id, run_name=f"{task}-{method}-{trial_id}",
                                                        tags=tags), "create trial run")
        flat = {k: ("none" if v is None else str(v))[:500] for k, v in params.items()}
        self._retry(lambda: self.client.log_batch(run.info.run_id, params=_params(flat)), "log params")
        return run.info.run_id

    def rerun_run(self, sweep: str, trial_run_id: str, task: str, method: str, seed: int) -> str:
        """A seed re-run's run (tune.seeds): a child of the trial it repeats, found again if it exists."""
        from tune.seeds import ROLE_RERUN

        runs = self.find_runs(f"tags.`{TAG_ROLE}` = '{ROLE_RERUN}'", f"tags.`mlflow.parentRunId` = '{trial_run_id}'",
                              f"tags.`seed` = '{seed}'")
        if runs:
            self._retry(lambda: self.client.update_run(runs[0].info.run_id, status="RUNNING"), "reopen run")
            return runs[0].info.run_id
        tags = {"mlflow.parentRunId": trial_run_id, TAG_ROLE: ROLE_RERUN, TAG_TASK: task, TAG_METHOD: method,
                TAG_SWEEP: sweep, "seed": str(seed), "node_id": _node_id()}
        run = self._retry(lambda: self.client.create_run(self.experiment_id, run_name=f"{task}-{method}-seed{seed}",
                                                        tags=tags), "create re-run")
        self._retry(lambda: self.client.log_batch(run.info.run_id, params=_params({"seed": str(seed),
                                                                                   "rerun_of": trial_run_id})),
                   "log params")
        return run.info.run_id

    def tag(self, run_id: str, key: str, value: str) -> None:
        self._retry(lambda: self.client.set_tag(run_id, key, value), f"tag {key}")

    def tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Several tags in one request (all or none written)."""
        from mlflow.entities import RunTag

        batch = [RunTag(k, v) for k, v in tags.items()]
        self._retry(lambda: self.client.log_batch(run_id, tags=batch), f"tag {', '.join(tags)}")

    def log_epoch(self, run_id: str, metrics: dict[str, Any], step: int) -> None:
        """Log one epoch's metrics in one attempt, so that a tracking server that is away never holds up training:
        metrics that cannot be written now are kept and written with the run's next epoch or, at the latest, by
        :meth:`finish_trial` / :meth:`fail_trial`, which retry until the deadline. Only metrics the server
        refuses (a non-transient error) are dropped, with a warning."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.setdefault(run_id, []).extend(Metric(k, float(v), now, step) for k, v in metrics.items()
                                                    if _is_number(v))
        try:
            self._flush_epochs(run_id, deadline_s=0)
        except Exception as e:  # noqa: BLE001 - an epoch's metrics must not kill the trial
            first = (str(e).splitlines() or [""])[0][:300]
            if is_transient(e):
                log.warning("epoch %d metrics kept for later (%d pending): MLflow unavailable (%s: %s)", step,
                            len(self._pending.get(run_id, [])), type(e).__name__, first)
            else:
                dropped = self._pending.pop(run_id, [])
                log.warning("MLflow refused %d epoch metrics (up to epoch %d), dropped: %s: %s", len(dropped), step,
                            type(e).__name__, first)

    def _flush_epochs(self, run_id: str, deadline_s: float | None = None) -> None:
        """Write the run's pending epoch metrics (in batches MLflow accepts); what is written leaves the queue."""
        pending = self._pending.get(run_id, [])
        while pending:
            batch = pending[:MAX_METRICS_PER_BATCH]
            with_retry(lambda: self.client.log_batch(run_id, metrics=batch), "log epoch metrics",
                       self.retry_s if deadline_s is None else deadline_s)
            del pending[:len(batch)]
        self._pending.pop(run_id, None)

    def finish_trial(self, run_id: str, result: dict[str, Any], model_dir: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000) + 1
        # step = the last epoch: the exported model's final values supersede that epoch's (same step,
        # later timestamp), so MLflow's "latest" score is the exported model's
        step = int(result.get("epochs_completed", 0))
        ms = [Metric(k, float(v), now, step) for k, v in result.items()
              if (k in FINAL_METRICS or k.startswith(("eval_", "gpu_"))) and _is_number(v)]
        self._flush_epochs(run_id)  # epochs the server missed first (their final values supersede them below)
        tags = [RunTag("validation_source", str(result.get("validation_source", ""))),
                RunTag("latency_device", str(result.get("latency_device", ""))),
                RunTag("latency_note", str(result.get("latency_note", ""))),
                RunTag("model_path", str(model_dir or "")),
                RunTag("predictions_path", str(result.get("predictions_path") or ""))]
        if result.get("teacher_path"):  # the cached teacher this trial distilled from (trained by it or reused)
            tags += [RunTag("teacher_path", str(result["teacher_path"])),
                     RunTag("teacher_reused", str(bool(result.get("teacher_reused"))).lower())]
        self._retry(lambda: self.client.log_batch(run_id, metrics=ms, tags=tags), "log final metrics")
        preds = result.get("predictions_path")
        if preds and os.path.isfile(preds):  # per-example eval predictions: bootstrap intervals, paired tests
            self._retry(lambda: self.client.log_artifact(run_id, preds), "log predictions")
        if model_dir:
            self._retry(lambda: self.log_model(run_id, model_dir), "log model")
        self._retry(lambda: self.client.set_terminated(run_id, status="FINISHED"), "finish run")

    def end_stopped(self, run_id: str) -> None:
        """End the run of a trial that Tune stopped at a report (early stopping): KILLED, not FAILED; its epochs
        stay logged. The scheduler also ends it from the driver, since a parked worker may never get here."""
        try:
            self._flush_epochs(run_id)  # the epochs it trained stay visible
            self._retry(lambda: self.client.set_terminated(run_id, status="KILLED"), "end stopped run")
        except Exception as e:  # noqa: BLE001 - reconcile closes it after the sweep
            log.warning("could not end stopped run %s: %s", run_id, e)

    def fail_trial(self, run_id: str, error: BaseException) -> None:
        try:
            self._flush_epochs(run_id)  # the epochs it trained stay visible
            self._retry(lambda: self.client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:4000]), "tag")
            self._retry(lambda: self.client.set_terminated(run_id, status="FAILED"), "fail run")
        except Exception as e:  # noqa: BLE001
            log.warning("could not mark run %s FAILED: %s", run_id, e)

    def log_model(self, run_id: str, model_dir: str) -> str:
        """Log the exported checkpoint as an MLflow pyfunc model (models-from-code, no pickle)."""
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        sig = ModelSignature(inputs=Schema([ColSpec("string", "text"), ColSpec("string", "text_pair", required=False)]),
                             outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]))
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE),
                                           artifacts={"checkpoint": model_dir}, signature=sig,
                                           pip_requirements=["torch", "transformers", "safetensors", "pandas"])
        # the fluent context set the run FINISHED on exit; finish_trial sets it again explicitly
        self._retry(lambda: self.client.set_tag(run_id, "model_uri", info.model_uri), "tag model_uri")
        return info.model_uri

    def reconcile(self, sweep: str, trial_ids: set[str]) -> int:
        """After a sweep (and after its seed re-runs): close trial runs that no Ray trial owns any more (their
        trial was lost with a killed driver before Ray saved its state, and was rerun under another id) and
        trial or seed re-run runs that a dead worker left RUNNING. Returns how many runs were closed as FAILED."""
        from tune.seeds import ROLE_RERUN

        closed = 0
        for role in ("trial", ROLE_RERUN):
            for r in self.find_runs(f"tags.`{TAG_ROLE}` = '{role}'", f"tags.`{TAG_SWEEP}` = '{sweep}'"):
                if r.info.status not in ("RUNNING", "SCHEDULED"):
                    continue
                run_id = r.info.run_id
                if r.data.tags.get("stopped_early") == "true":  # stopped by tune.scheduler; its worker went first
                    self._retry(lambda: self.client.set_terminated(run_id, status="KILLED"), "close stopped run")
                    continue
                if role == "trial" and r.data.tags.get(TAG_TRIAL) not in trial_ids:
                    self.tag(run_id, "orphaned", "its Ray trial was lost with the driver; the search went on under "
                             "another trial id")
                self.tag(run_id, "error", f"run left RUNNING when its {role} ended")
                self._retry(lambda: self.client.set_terminated(run_id, status="FAILED"), "close stale run")
                closed += 1
        return closed

    # ---- Pareto
    def trial_points(self, task: str, sweep: str | None = None, latency: str = "latency_ms") -> list[Point]:
        """The task's finished trials as points; ``latency``: the metric that is their latency
        (``latency_ms``: on the trial's device; ``cpu_latency_ms``: on the CPU)."""
        filters = [f"tags.`{TAG_ROLE}` = 'trial'", f"tags.`{TAG_TASK}` = '{task}'"]
        if sweep:
            filters.append(f"tags.`{TAG_SWEEP}` = '{sweep}'")
        pts = []
        for r in self.find_runs(*filters, status="FINISHED"):
            m = r.data.metrics
            if "score" in m and "sparsity" in m:
                pts.append(Point(r.info.run_id, m["score"], m["sparsity"], m.get(latency, m.get("latency_ms", math.inf)),
                                 info={"run": r, **m}))
        return pts

    def update_pareto_tags(self, task: str, sweep: str | None = None) -> list[Point]:
        pts = self.trial_points(task, sweep)
        front = {p.id for p in pareto_front(pts)}
        for p in pts:
            want = "true" if p.id in front else "false"
            if p.info["run"].data.tags.get(TAG_PARETO) != want:
                self._retry(lambda: self.client.set_tag(p.id, TAG_PARETO, want), "pareto tag")
        return pts


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001
        return ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _params(flat: dict[str, str]):
    from mlflow.entities import Param

    return [Param(k, v) for k, v in flat.items()]


__all__ = ["RunStatus", "TrackingError", "Tracker", "check_reachable", "default_tracking_uri", "is_transient",
           "retry_deadline_s", "with_retry"]
