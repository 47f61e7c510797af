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
                 "cpu_speedup_q25", "cpu_speedup_q75")


class TrackingError(RuntimeError):
    """The tracking store cannot be used. One-line message."""


def with_retry(fn: Callable[[], T], what: str, attempts: int = 5, backoff: float = 1.0) -> T:
    """Call ``fn``; on an error retry with exponential backoff (a tracking server may be restarting)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if i == attempts - 1:
                raise
            log.warning("MLflow %s failed (%s: %s); retry %d/%d", what, type(e).__name__, e, i + 1, attempts - 1)
            time.sleep(backoff * 2**i)
    raise AssertionError("unreachable")


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`TrackingError` (one line) unless the tracking store at ``uri`` answers."""
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

    def __init__(self, uri: str, experiment: str | None = None, experiment_id: str | None = None) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if experiment_id is None:
            assert experiment is not None
            exp = with_retry(lambda: self.client.get_experiment_by_name(experiment), "get experiment")
            experiment_id = exp.experiment_id if exp is not None else with_retry(
                lambda: self.client.create_experiment(experiment), "create experiment")
        self.experiment_id = experiment_id

    # ---- runs
    def find_runs(self, *filters: str, status: str | None = None) -> list:
        q = " and ".join(filters + ((f"attributes.status = '{status}'",) if status else ()))
        return with_retry(lambda: self.client.search_runs([self.experiment_id], q, max_results=5000), "search")

    def parent_run(self, sweep: str, task: str) -> str:
        """The task's parent run (created once, found again on resume)."""
        runs = self.find_runs(f"tags.`{TAG_ROLE}` = 'parent'", f"tags.`{TAG_TASK}` = '{task}'",
                              f"tags.`{TAG_SWEEP}` = '{sweep}'")
        if runs:
            run_id = runs[0].info.run_id
            if runs[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = with_retry(lambda: self.client.create_run(
            self.experiment_id, run_name=task, tags={TAG_ROLE: "parent", TAG_TASK: task, TAG_SWEEP: sweep}),
            "create parent run")
        return run.info.run_id

    def trial_run(self, sweep: str, parent_id: str, trial_id: str, task: str, method: str,
                  params: dict[str, Any]) -> str:
        """The trial's child run: reused when this trial id already has one (a restarted trial)."""
        runs = self.find_runs(f"tags.`{TAG_TRIAL}` = '{trial_id}'", f"tags.`{TAG_SWEEP}` = '{sweep}'")
        if runs:
            run_id = runs[0].info.run_id
            with_retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen run")
            with_retry(lambda: self.client.set_tag(run_id, "node_id", _node_id()), "tag")
            with_retry(lambda: self.client.set_tag(run_id, "restarts", str(int(runs[0].data.tags.get("restarts", "0")) + 1)),
                       "tag")
            return run_id
        tags = {"mlflow.parentRunId": parent_id, TAG_ROLE: "trial", TAG_TASK: task, TAG_METHOD: method,
                TAG_TRIAL: trial_id, TAG_SWEEP: sweep, TAG_PARETO: "false", "node_id": _node_id()}
        run = with_retry(lambda: self.client.create_run(self.experiment_id, run_name=f"{task}-{method}-{trial_id}",
                                                        tags=tags), "create trial run")
        flat = {k: ("none" if v is None else str(v))[:500] for k, v in params.items()}
        with_retry(lambda: self.client.log_batch(run.info.run_id, params=_params(flat)), "log params")
        return run.info.run_id

    def rerun_run(self, sweep: str, trial_run_id: str, task: str, method: str, seed: int) -> str:
        """A seed re-run's run (tune.seeds): a child of the trial it repeats, found again if it exists."""
        from tune.seeds import ROLE_RERUN

        runs = self.find_runs(f"tags.`{TAG_ROLE}` = '{ROLE_RERUN}'", f"tags.`mlflow.parentRunId` = '{trial_run_id}'",
                              f"tags.`seed` = '{seed}'")
        if runs:
            with_retry(lambda: self.client.update_run(runs[0].info.run_id, status="RUNNING"), "reopen run")
            return runs[0].info.run_id
        tags = {"mlflow.parentRunId": trial_run_id, TAG_ROLE: ROLE_RERUN, TAG_TASK: task, TAG_METHOD: method,
                TAG_SWEEP: sweep, "seed": str(seed), "node_id": _node_id()}
        run = with_retry(lambda: self.client.create_run(self.experiment_id, run_name=f"{task}-{method}-seed{seed}",
                                                        tags=tags), "create re-run")
        with_retry(lambda: self.client.log_batch(run.info.run_id, params=_params({"seed": str(seed),
                                                                                   "rerun_of": trial_run_id})),
                   "log params")
        return run.info.run_id

    def tag(self, run_id: str, key: str, value: str) -> None:
        with_retry(lambda: self.client.set_tag(run_id, key, value), f"tag {key}")

    def log_epoch(self, run_id: str, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        try:
            with_retry(lambda: self.client.log_batch(run_id, metrics=ms), "log epoch", attempts=3)
        except Exception as e:  # noqa: BLE001 - a lost epoch metric must not kill the trial
            log.warning("could not log epoch %d to MLflow: %s", step, e)

    def finish_trial(self, run_id: str, result: dict[str, Any], model_dir: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000) + 1
        # step = the last epoch: the exported model's final values supersede that epoch's (same step,
        # later timestamp), so MLflow's "latest" score is the exported model's
        step = int(result.get("epochs_completed", 0))
        ms = [Metric(k, float(v), now, step) for k, v in result.items()
              if (k in FINAL_METRICS or k.startswith(("eval_", "gpu_"))) and _is_number(v)]
        tags = [RunTag("validation_source", str(result.get("validation_source", ""))),
                RunTag("latency_device", str(result.get("latency_device", ""))),
                RunTag("latency_note", str(result.get("latency_note", ""))),
                RunTag("model_path", str(model_dir or "")),
                RunTag("predictions_path", str(result.get("predictions_path") or ""))]
        if result.get("teacher_path"):  # the cached teacher this trial distilled from (trained by it or reused)
            tags += [RunTag("teacher_path", str(result["teacher_path"])),
                     RunTag("teacher_reused", str(bool(result.get("teacher_reused"))).lower())]
        with_retry(lambda: self.client.log_batch(run_id, metrics=ms, tags=tags), "log final metrics")
        preds = result.get("predictions_path")
        if preds and os.path.isfile(preds):  # per-example eval predictions: bootstrap intervals, paired tests
            with_retry(lambda: self.client.log_artifact(run_id, preds), "log predictions", attempts=3)
        if model_dir:
            with_retry(lambda: self.log_model(run_id, model_dir), "log model", attempts=3)
        with_retry(lambda: self.client.set_terminated(run_id, status="FINISHED"), "finish run")

    def fail_trial(self, run_id: str, error: BaseException) -> None:
        try:
            with_retry(lambda: self.client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:4000]), "tag")
            with_retry(lambda: self.client.set_terminated(run_id, status="FAILED"), "fail run")
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
        self.client.set_tag(run_id, "model_uri", info.model_uri)
        return info.model_uri

    def reconcile(self, sweep: str, trial_ids: set[str]) -> int:
        """After a sweep (and after its seed re-runs): close trial runs that no Ray trial owns any more (their
        trial was lost with a killed driver before Ray saved its state, and was rerun under another id) and
        trial or seed re-run runs that a dead worker left RUNNING. Returns how many runs were closed as FAILED."""
        from tune.seeds import ROLE_RERUN

        closed = 0
        for role in ("trial", ROLE_RERUN):
            for r in self.find_runs(f"tags.`{TAG_ROLE}` = '{role}'", f"tags.`{TAG_SWEEP}` = '{sweep}'"):
                if r.info.status in ("RUNNING", "SCHEDULED"):
                    if role == "trial" and r.data.tags.get(TAG_TRIAL) not in trial_ids:
                        self.client.set_tag(r.info.run_id, "orphaned", "its Ray trial was lost with the driver; "
                                            "the search went on under another trial id")
                    self.client.set_tag(r.info.run_id, "error", f"run left RUNNING when its {role} ended")
                    self.client.set_terminated(r.info.run_id, status="FAILED")
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
                with_retry(lambda: self.client.set_tag(p.id, TAG_PARETO, want), "pareto tag")
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


__all__ = ["RunStatus", "TrackingError", "Tracker", "check_reachable", "default_tracking_uri", "with_retry"]
