"""Early stopping that knows the user's accuracy budget: a Ray Tune scheduler for the multi-task sweep.

Ray's and Optuna's pruners rank trials by one metric. A FineGates sweep has two objectives (score up,
sparsity up) and a budget: a trial is worth finishing only if it can end on the task's Pareto front
within the budget. At each epoch report before the last (a *rung*) the scheduler compares a trial with the
trials of its task and method that reported the same epoch, and stops it when

* **budget**: its score is below the budget threshold by more than ``margin``. The threshold comes from
  the best score at that epoch, the way the selector uses the reference: ``best * (1 - budget)`` for
  a relative budget (``best - budget * |best|`` when ``best`` is negative), ``best - budget`` for an
  absolute one; with several budgets the loosest is used. Or
* **dominated**: at least ``k`` trials have at least its score and at least its sparsity at that epoch
  (one of them strictly higher). Sparsity at an epoch is ``gate_sparsity``, the share of gates closed
  now (0 for the dense methods).

or, whatever its score, when

* **not learned**: every method's reference trial of the task has finished and none clearly beats the
  trivial predictor (the selector's guard, :func:`tune.select.task_guard`, on the reference's recorded
  predictions). The selector then picks nothing for the task, so its other trials are stopped at their
  next rung, whatever their scores.

A reference trial (each method's first, e.g. FineGates with target 0) is never stopped: the selector
measures every loss against it. Trials are compared within their (task, method), so a baseline's trials
are never stopped because FineGates dominates them: the sweep keeps them for the comparison.

A stopped trial keeps its MLflow run with every epoch it logged; the run is tagged ``stopped_early=true``,
``stopped_epoch`` and ``stop_reason`` and ends KILLED, so it is out of the Pareto front and the
selector (both use FINISHED runs), and its Optuna trial is told PRUNED. On ``--resume`` the history of
the epochs already run is read back from MLflow (Ray does not save a scheduler's state).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tune.pareto import threshold

log = logging.getLogger(__name__)

TAG_STOPPED = "stopped_early"
TAG_STOPPED_EPOCH = "stopped_epoch"
TAG_STOP_REASON = "stop_reason"
#: the per-epoch metric compared as sparsity (absent for the dense methods: 0)
EPOCH_SPARSITY = "gate_sparsity"


@dataclass(frozen=True)
class StopRule:
    """When to stop a trial. ``rungs``: the epochs at which to decide (None: every epoch); never at or after
    ``epochs``, the trials' length: the last epoch's score is in effect the final one, and stopping there would
    save only the export while taking the trial's point off the front."""

    budget: float
    budget_mode: str = "relative"
    margin: float = 0.05
    k: int = 2
    rungs: tuple[int, ...] | None = None
    epochs: float = math.inf

    def decides_at(self, epoch: int) -> bool:
        return epoch < self.epochs and (self.rungs is None or epoch in self.rungs)

    def threshold(self, best: float) -> float:
        """The lowest score within the budget when ``best`` is the best score at this epoch (the selector's
        rule, :func:`tune.pareto.threshold`)."""
        return threshold(best, self.budget, self.budget_mode)


@dataclass(frozen=True)
class EpochPoint:
    trial_id: str
    score: float
    sparsity: float
    reference: bool = False


def decide(rule: StopRule, me: EpochPoint, others: list[EpochPoint]) -> str | None:
    """Why ``me`` should stop, given the other trials of its task and method at the same epoch; None to go on."""
    if me.reference or not math.isfinite(me.score):
        return None
    others = [o for o in others if o.trial_id != me.trial_id and math.isfinite(o.score)]
    if not others:
        return None
    best = max(o.score for o in others)
    if best > me.score:
        threshold = rule.threshold(best)
        if me.score < threshold - rule.margin:
            return (f"budget: score {me.score:.4f} < {threshold:.4f} (best {best:.4f} within budget "
                    f"{rule.budget:g} {rule.budget_mode}) - margin {rule.margin:g}")
    dominating = [o for o in others if o.score >= me.score and o.sparsity >= me.sparsity
                  and (o.score > me.score or o.sparsity > me.sparsity)]
    if len(dominating) >= rule.k:
        return (f"dominated: {len(dominating)} trials (k={rule.k}) have score >= {me.score:.4f} and sparsity >= "
                f"{me.sparsity:.3f}")
    return None


class BudgetStopper(FIFOScheduler):
    """The sweep's default scheduler (``--scheduler budget``); trials run in the order Tune starts them.

    ``tracking``: (MLflow URI, experiment id, sweep name), to mark stopped runs and to read the history back
    on resume; None keeps everything in memory (unit use)."""

    def __init__(self, rule: StopRule, tracking: tuple[str, str, str] | None = None,
                 methods: tuple[str, ...] = ("finegates",)) -> None:
        super().__init__()
        self.rule = rule
        self.tracking = tracking
        self.methods = tuple(methods)
        # (task, method) -> the guard's verdict on its finished reference (True / False / None = unverified)
        self.reference_learned: dict[tuple[str, str], bool | None] = {}
        self.not_learned: dict[str, str] = {}  # task -> the guard's reason, once no reference of it is learned
        # (task, method) -> epoch -> trial id -> point
        self.history: dict[tuple[str, str], dict[int, dict[str, EpochPoint]]] = defaultdict(lambda: defaultdict(dict))
        self.stopped: dict[str, tuple[int, str]] = {}  # trial id -> (epoch, reason)
        self._loaded = tracking is None

    # Ray pickles the scheduler with the Tuner; the defaultdict's lambda cannot be pickled
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["history"] = {k: dict(v) for k, v in self.history.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        history = state.pop("history")
        self.__dict__.update(state)
        self.history = defaultdict(lambda: defaultdict(dict))
        for k, by_epoch in history.items():
            self.history[k].update(by_epoch)
        self._loaded = self.tracking is None  # a restored sweep reads its history back from MLflow

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        cfg = trial.config
        if not self._loaded:
            self._load_history()
        if result.get("final"):
            if cfg.get("reference"):
                self._check_reference(cfg["task"], cfg["method"], trial.trial_id)
            return TrialScheduler.CONTINUE
        if "epoch" not in result or "score" not in result:
            return TrialScheduler.CONTINUE
        if trial.trial_id in self.stopped:  # stopped before a driver restart that Ray's saved state missed
            return TrialScheduler.STOP
        key, epoch = (cfg["task"], cfg["method"]), int(round(float(result["epoch"])))
        me = EpochPoint(trial.trial_id, float(result["score"]), float(result.get(EPOCH_SPARSITY, 0.0)),
                        bool(cfg.get("reference")))
        at_epoch = self.history[key][epoch]
        others = list(at_epoch.values())
        at_epoch[trial.trial_id] = me
        if not self.rule.decides_at(epoch):
            return TrialScheduler.CONTINUE
        reason = decide(self.rule, me, others)
        if cfg["task"] in self.not_learned and not me.reference:
            reason = f"not learned: {self.not_learned[cfg['task']]}"
        if reason is None:
            return TrialScheduler.CONTINUE
        self.stopped[trial.trial_id] = (epoch, reason)
        log.warning("stopping trial %s (%s/%s) at epoch %d: %s", trial.trial_id, *key, epoch, reason)
        self._mark(trial.trial_id, epoch, reason)
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        return f"BudgetStopper: {len(self.stopped)} trials stopped early"

    # ---- MLflow
    def _tracker(self, retry_s: float | None = None):
        from tune.tracking import Tracker

        uri, experiment_id, _ = self.tracking  # type: ignore[misc]
        return Tracker(uri, experiment_id=experiment_id, retry_s=retry_s)

    def _trial_runs(self, tracker, trial_id: str, status: str | None = None) -> list:
        from tune.tracking import TAG_SWEEP, TAG_TRIAL

        return tracker.find_runs(f"tags.`{TAG_TRIAL}` = '{trial_id}'", f"tags.`{TAG_SWEEP}` = '{self.tracking[2]}'",
                                 status=status)

    # ---- the task guard on finished references
    def _check_reference(self, task: str, method: str, trial_id: str) -> None:
        """The selector's guard on a finished reference trial's run; once every method's reference of the task
        is checked and none is learned, the task's other trials stop at their next rung."""
        if self.tracking is None or (task, method) in self.reference_learned:
            return
        try:
            tracker = self._tracker(retry_s=10)
            runs = self._trial_runs(tracker, trial_id, status="FINISHED")
            if runs:
                self._record_guard(tracker, task, method, runs[0])
        except Exception as e:  # noqa: BLE001 - without the guard the scheduler only stops less
            log.warning("could not check the reference trial %s of %s against the trivial predictor: %s",
                        trial_id, task, e)

    def _record_guard(self, tracker, task: str, method: str, run) -> None:
        from tasks import get_task
        from tune.pareto import Point
        from tune.select import LEARNED, NOT_LEARNED, TaskEvidence, task_guard

        m = run.data.metrics
        point = Point(run.info.run_id, m["score"], m.get("sparsity", 0.0), m.get("latency_ms", math.inf),
                      info={"run": run, **m})
        status, reason, _, _ = task_guard(TaskEvidence(tracker, get_task(task), [point]), [point])
        self.reference_learned[(task, method)] = {LEARNED: True, NOT_LEARNED: False}.get(status)  # else unverified
        verdicts = [self.reference_learned.get((task, mm), "pending") for mm in self.methods]
        if all(v is False for v in verdicts):
            self.not_learned[task] = reason.removeprefix("not learned: ").split("; nothing is selected")[0] + \
                "; the selector picks nothing for this task"
            log.warning("task %s is not learned by its reference(s): its other trials stop at their next rung", task)

    def _mark(self, trial_id: str, epoch: int, reason: str) -> None:
        """Tag the trial's run as stopped early and end it KILLED, from the driver: with reused actors Ray parks
        the stopped trial's worker, whose thread may never reach its own ``end_stopped``. A short deadline: the
        driver's event loop waits on these calls; ``reconcile`` closes the run after the sweep if they fail."""
        if self.tracking is None:
            return
        tags = {TAG_STOPPED: "true", TAG_STOPPED_EPOCH: str(epoch), TAG_STOP_REASON: reason[:500]}
        try:
            tracker = self._tracker(retry_s=2)
            for r in self._trial_runs(tracker, trial_id):
                tracker.tags(r.info.run_id, tags)
                tracker.end_stopped(r.info.run_id)
        except Exception as e:  # noqa: BLE001 - the decision stands; reconcile closes the run in any case
            log.warning("could not mark trial %s as stopped early: %s", trial_id, e)

    def _load_history(self) -> None:
        """The epochs that trials of this sweep logged before a resume (from MLflow)."""
        from tune.tracking import TAG_ROLE, TAG_SWEEP

        self._loaded = True
        sweep = self.tracking[2]  # type: ignore[index]
        try:
            tracker = self._tracker()
            runs = tracker.find_runs(f"tags.`{TAG_ROLE}` = 'trial'", f"tags.`{TAG_SWEEP}` = '{sweep}'")
        except Exception as e:  # noqa: BLE001 - without history the resumed sweep only stops less
            log.warning("could not read the sweep's epoch history back from MLflow: %s", e)
            return
        for r in runs:
            try:
                self._load_run(tracker, r)
            except Exception as e:  # noqa: BLE001 - one unreadable run costs only its own history
                log.warning("could not read the epoch history of run %s back from MLflow: %s", r.info.run_id, e)
        log.info("scheduler: read back %d trial runs of sweep %s", len(runs), sweep)

    def _load_run(self, tracker, r) -> None:
        """One trial run's epochs, stop and (for a finished reference) guard verdict."""
        from tune.tracking import TAG_METHOD, TAG_TASK, TAG_TRIAL, with_retry

        tags, trial_id = r.data.tags, r.data.tags.get(TAG_TRIAL, "")
        key = (tags.get(TAG_TASK, ""), tags.get(TAG_METHOD, ""))
        reference = r.data.params.get("reference", "False") == "True"
        history = {name: {int(m.step): m.value for m in with_retry(
            lambda: tracker.client.get_metric_history(r.info.run_id, name), "read epoch history", 10)}
            for name in ("score", EPOCH_SPARSITY)}
        last_epoch = int(tags[TAG_STOPPED_EPOCH]) if tags.get(TAG_STOPPED) == "true" else None
        for epoch, score in history["score"].items():
            if last_epoch is None or epoch <= last_epoch:
                self.history[key][epoch].setdefault(
                    trial_id, EpochPoint(trial_id, score, history[EPOCH_SPARSITY].get(epoch, 0.0), reference))
        if last_epoch is not None:
            self.stopped[trial_id] = (last_epoch, tags.get(TAG_STOP_REASON, ""))
        if reference and r.info.status == "FINISHED" and key not in self.reference_learned:
            self._record_guard(tracker, *key, r)


def parse_rungs(text: str) -> tuple[int, ...] | None:
    """``all`` -> None (every epoch); ``1,2`` -> (1, 2). Raises ValueError (one line)."""
    if text.strip() == "all":
        return None
    try:
        rungs = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        rungs = ()
    if not rungs or rungs[0] < 1:
        raise ValueError(f"--stop-rungs {text!r} is invalid; accepted: 'all' or a comma list of epochs >= 1 (e.g. 1,2)")
    return rungs
