"""The budget selector: per task and budget, the sparsest finished trial within budget of the best.

    python -m tune.select --experiment finegates-glue --budget 0.01,0.02,0.05 [--rule paired|plain]

Reads the finished trial runs of the experiment from MLflow. Per task:

* guard: the task's reference trial (param ``reference=True``) must beat the trivial predictor
  (majority class, constant mean for STS-B) by more than 2 standard errors of the paired difference
  (bootstrap over evaluation examples); otherwise the task is "not learned": nothing is selected or
  registered, and selection.json, the table and the task's parent run (tags ``selection_status``,
  ``selection_reason``) say why. No trial that is not clearly above the trivial predictor is ever
  eligible, whatever the rule.
* reference = the best score of its finished trials; ``--rule plain``: eligible = score >=
  reference * (1 - budget) (relative; ``--budget-mode absolute`` for score points); ``--rule paired``
  (default): also the lower end of the 95% paired bootstrap CI of (trial - reference) must be >=
  -budget*|reference| (the loss is shown to be within budget, not merely estimated to be).
* chosen = the eligible trial with the highest sparsity, ties broken by lower latency (``--select-by
  latency`` prefers speed). Every finished trial is considered, not the first that passes.

Writes ``<out>/<task>/budget-<b>/`` (the exported model), ``selection.json`` (scores with 95%
bootstrap intervals), and registers each choice as a version of the registered model
``finegates-<task>`` (``finegates-<task>-smoke`` for a ``--smoke-test`` sweep) with alias ``budget-<b>``
(dots become underscores: ``budget-0_02``). Exit codes: 0 selected (or reported why not), 1 nothing to
select (no finished trial, or a ``--tasks`` task without one in the sweep), 2 bad input. Re-running
changes only what new trials justify: an unchanged choice keeps its model version and files; a task or
budget without a choice loses its alias and model directory. docs/SELECTION.md has the details.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow import MlflowClient

from tasks import compute_metrics
from tune.errors import UsageError
from tune.pareto import (BUDGET_MODES, RULES, SELECT_BY, Point, Selection, check_budget, check_rule,
                         reference_point, select, threshold)
from tune.stats import (CONFIDENCE, GUARD_Z, MIN_RESAMPLES, RESAMPLES, SEED, Bootstrap, Difference, Guard, Interval,
                        check_resamples, fallback_guard, percentile_interval, prediction_interval)
from tune.tracking import (TAG_REGISTRY_SUFFIX, TAG_ROLE, TAG_SWEEP, TAG_TASK, Tracker, TrackingError, check_reachable,
                           default_tracking_uri, with_retry)
from tune.heldout import Report, report_score, within
from tune.seeds import SeedReruns, SeedStats, check_seeds, fmt, holds_up

if TYPE_CHECKING:
    from tasks import TaskSpec

log = logging.getLogger(__name__)

PREDICTIONS_ARTIFACT = "eval_predictions.npz"
#: task-level guard outcomes (parent run tag ``selection_status``)
LEARNED, NOT_LEARNED, UNVERIFIED = "learned", "not_learned", "unverified"
#: per (task, budget) row status in selection.json
SELECTED, NONE_ELIGIBLE, NOT_CONFIRMED = "selected", "none_eligible", "not_confirmed"
#: which latency --select-by latency compares: the trial's device (its GPU when it had one) or the CPU
LATENCY_DEVICES = ("trial", "cpu")


def parse_budgets(spec: str, mode: str = "relative") -> list[float]:
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            b = float(part)
        except ValueError:
            raise UsageError(f"--budget {part!r} is not a number; accepted: numbers in [0, 1], comma-separated") from None
        try:
            check_budget(b, mode)
        except ValueError:
            raise UsageError(f"--budget {part} is out of range; accepted: numbers in [0, 1] "
                             "(0.02 = 2% below the reference score)") from None
        out.append(b)
    if not out:
        raise UsageError("--budget is empty; accepted: numbers in [0, 1], comma-separated")
    return out


def alias_for(budget: float) -> str:
    return "budget-" + f"{budget:g}".replace(".", "_")


def _copy_model(tracker: Tracker, run, dest: Path) -> None:
    """Copy the chosen trial's exported model to ``dest`` (from its local path, else from MLflow)."""
    src = run.data.tags.get("model_path", "")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        if src and Path(src).is_dir():
            shutil.copytree(src, tmp / "m")
        else:
            import mlflow

            uri = run.data.tags.get("model_uri")
            mlflow.set_tracking_uri(tracker.uri)
            got = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/artifacts/checkpoint", dst_path=str(tmp / "dl"))
            shutil.move(got, tmp / "m")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp / "m", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_name(task: str, suffix: str = "") -> str:
    """The registered model of a task: finegates-<task>, plus ``-smoke`` for a --smoke-test sweep."""
    return f"finegates-{task}{suffix}"


def register(tracker: Tracker, task: str, run, budget: float, suffix: str = "") -> str:
    """Register the run's logged model as a version of finegates-<task><suffix> with the budget's alias."""
    import mlflow

    name = model_name(task, suffix)
    client = tracker.client
    alias = alias_for(budget)
    try:
        current = client.get_model_version_by_alias(name, alias)
        if current.run_id == run.info.run_id:
            return current.version  # unchanged choice: nothing to do
    except Exception:  # noqa: BLE001 - no such model or alias yet
        pass
    mlflow.set_tracking_uri(tracker.uri)
    versions = with_retry(lambda: client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'"),
                          "search versions")
    if versions:
        version = versions[0].version
    else:
        version = with_retry(lambda: mlflow.register_model(run.data.tags["model_uri"], name), "register").version
    with_retry(lambda: client.set_registered_model_alias(name, alias, version), "alias")
    return version


# ---------------------------------------------------------------------------------------------------
# per-example evidence

def load_predictions(tracker: Tracker, run, task: "TaskSpec") -> tuple[np.ndarray, np.ndarray] | None:
    """The trial's eval predictions and labels: from its ``predictions_path`` tag, else from its MLflow
    artifact ``eval_predictions.npz`` (e.g. when the file stayed on a cluster worker). None when neither
    exists or neither reproduces the run's recorded ``score`` (a stale or foreign file)."""
    recorded = run.data.metrics.get("score")
    run_id = run.info.run_id
    candidates: list[tuple[str, Any]] = []
    path = run.data.tags.get("predictions_path", "")
    if path and Path(path).is_file():
        candidates.append(("path", path))
    candidates.append(("artifact", None))
    for source, where in candidates:
        tmp = None
        try:
            if where is None:
                listed = with_retry(lambda: tracker.client.list_artifacts(run_id), "list artifacts", tracker.retry_s)
                if not any(f.path == PREDICTIONS_ARTIFACT for f in listed):
                    continue
                tmp = tempfile.mkdtemp(prefix="finegates-preds-")
                where = with_retry(lambda: tracker.client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, tmp),
                                   "download predictions", tracker.retry_s)
            with np.load(where, allow_pickle=False) as z:
                preds, labels = np.asarray(z["predictions"]), np.asarray(z["labels"])
        except Exception as e:  # noqa: BLE001 - missing or unreadable evidence: the documented fallbacks apply
            log.warning("run %s: cannot read eval predictions from its %s (%s: %s)", run_id, source,
                        type(e).__name__, e)
            continue
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        if preds.ndim != 1 or preds.shape != labels.shape or preds.size < 2:
            log.warning("run %s: eval predictions of shape %s / labels %s are unusable (%s)", run_id, preds.shape,
                        labels.shape, source)
            continue
        got = compute_metrics(task, preds, labels)["score"]
        if recorded is not None and abs(got - recorded) > 1e-6:
            log.warning("run %s: its eval predictions (%s) score %.6f, not the recorded %.6f: ignored", run_id,
                        source, got, recorded)
            continue
        return preds, labels
    return None


class TaskEvidence:
    """Predictions, bootstrap score vectors, intervals and guards of one task's trials (cached)."""

    def __init__(self, tracker: Tracker, task: "TaskSpec", points: list[Point], n_resamples: int = RESAMPLES,
                 seed: int = SEED, confidence: float = CONFIDENCE, z: float = GUARD_Z) -> None:
        self.task, self.z = task, z
        self.n_resamples, self.seed, self.confidence = n_resamples, seed, confidence
        self.points = {p.id: p for p in points}
        self.preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for p in points:
            got = load_predictions(tracker, p.info["run"], task)
            if got is not None:
                self.preds[p.id] = got
        self._boot: dict[bytes, Bootstrap] = {}
        self._scores: dict[str, np.ndarray] = {}
        self._guards: dict[str, Guard] = {}

    def _bootstrap(self, run_id: str) -> tuple[Bootstrap, bytes]:
        labels = self.preds[run_id][1]
        key = labels.dtype.str.encode() + labels.tobytes()
        if key not in self._boot:
            self._boot[key] = Bootstrap(self.task, labels, self.n_resamples, self.seed, self.confidence)
        return self._boot[key], key

    def scores(self, run_id: str) -> np.ndarray:
        if run_id not in self._scores:
            self._scores[run_id] = self._bootstrap(run_id)[0].scores(self.preds[run_id][0])
        return self._scores[run_id]

    def interval(self, run_id: str) -> Interval | None:
        if run_id not in self.preds:
            return None
        bs, _ = self._bootstrap(run_id)
        return percentile_interval(self.scores(run_id), bs.point(self.preds[run_id][0]), self.confidence)

    def prediction(self, run_id: str, n_report: int | None) -> Interval | None:
        """Where the trial's score on ``n_report`` held-out examples should fall (tune.stats.prediction_interval)."""
        if run_id not in self.preds or not n_report:
            return None
        est = self.interval(run_id).estimate
        return prediction_interval(self.scores(run_id), est, len(self.preds[run_id][1]), n_report, self.confidence)

    def paired(self, a: str, b: str) -> bool:
        """Both trials have predictions on the same evaluation examples (equal label vectors)."""
        return a in self.preds and b in self.preds and np.array_equal(self.preds[a][1], self.preds[b][1])

    def difference(self, a: str, b: str) -> Difference | None:
        """score(a) - score(b), paired on the same resamples; None when they cannot be paired."""
        if not self.paired(a, b):
            return None
        bs, _ = self._bootstrap(a)
        return bs.difference(self.preds[a][0], self.preds[b][0], self.scores(a), self.scores(b))

    def guard(self, run_id: str) -> Guard:
        if run_id not in self._guards:
            if run_id in self.preds:
                bs, _ = self._bootstrap(run_id)
                self._guards[run_id] = bs.guard(self.preds[run_id][0], self.z, scores=self.scores(run_id))
            else:
                m = self.points[run_id].info
                self._guards[run_id] = fallback_guard(m.get("score"), m.get("trivial_score"), m.get("n_eval"),
                                                      self.task, self.z)
        return self._guards[run_id]


def _is_reference(p: Point) -> bool:
    return p.info["run"].data.params.get("reference", "").lower() == "true"


def task_guard(ev: TaskEvidence, points: list[Point]) -> tuple[str, str, Point, Guard]:
    """The task-level guard: (status, reason, the trial that decided, its guard).

    The task's reference trials (param ``reference=True``; one per method) are checked; the task is
    learned when one of them clearly beats the trivial predictor. Without a finished reference trial
    the best trial is checked instead, and the reason says so.
    """
    refs = [p for p in points if _is_reference(p)]
    note = ""
    if not refs:
        refs = [reference_point(points)]
        note = "no finished reference trial (param reference=True): the best trial was checked instead; "
    checked = sorted(((p, ev.guard(p.id)) for p in refs), key=lambda pg: -pg[0].score)
    passing = [pg for pg in checked if pg[1].learned]
    failing = [pg for pg in checked if pg[1].learned is False]
    p, g = (passing or failing or checked)[0]
    who = f"reference trial {p.id} ({p.info['run'].data.tags.get('method', '?')})"
    if passing:
        return LEARNED, f"learned: {note}{who} scores {g.reason}", p, g
    if failing:
        return NOT_LEARNED, (f"not learned: {note}{who} scores {g.reason}; nothing is selected or registered "
                             "for this task"), p, g
    return UNVERIFIED, (f"unverified: {note}{who}: {g.reason}; nothing is selected or registered for this task "
                        "(re-run the sweep to record them)"), p, g


def _tag_parents(tracker: Tracker, task: str, sweep: str | None, status: str, reason: str) -> None:
    filters = [f"tags.`{TAG_ROLE}` = 'parent'", f"tags.`{TAG_TASK}` = '{task}'"]
    if sweep:
        filters.append(f"tags.`{TAG_SWEEP}` = '{sweep}'")
    try:
        for r in tracker.find_runs(*filters):
            for k, v in (("selection_status", status), ("selection_reason", reason[:4900])):
                if r.data.tags.get(k) != v:
                    with_retry(lambda: tracker.client.set_tag(r.info.run_id, k, v), "tag parent")
    except Exception as e:  # noqa: BLE001 - the selection itself is written anyway
        log.warning("could not tag the parent run of %s with its selection status: %s", task, e)


def _ci_metrics(ev: TaskEvidence, run_id: str) -> dict[str, float]:
    ci = ev.interval(run_id)
    return {"score_ci_low": ci.low, "score_ci_high": ci.high} if ci is not None else {}


def _log_intervals(tracker: Tracker, ev: TaskEvidence, points: list[Point]) -> None:
    """Each trial's 95% score interval as metrics ``score_ci_low``/``score_ci_high`` (written when changed)."""
    from mlflow.entities import Metric

    for p in points:
        want = _ci_metrics(ev, p.id)
        if not want:
            continue
        m = p.info["run"].data.metrics
        if all(k in m and abs(m[k] - v) < 1e-12 for k, v in want.items()):
            continue
        now = int(time.time() * 1000)
        try:
            with_retry(lambda: tracker.client.log_batch(p.id, metrics=[Metric(k, float(v), now, 0)
                                                                      for k, v in want.items()]), "log intervals")
        except Exception as e:  # noqa: BLE001
            log.warning("could not log the score interval of run %s: %s", p.id, e)


def _drop_alias(tracker: Tracker, task: str, budget: float, suffix: str = "") -> None:
    """Remove a budget alias left by an earlier selection (so it cannot serve a model that is no pick now)."""
    name, alias = model_name(task, suffix), alias_for(budget)
    try:
        tracker.client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no such model or alias: nothing to drop
        return
    with_retry(lambda: tracker.client.delete_registered_model_alias(name, alias), "drop alias")
    log.warning("%s@%s removed: this selection has no model for it", name, alias)


def _ci(i: Interval | None) -> list[float] | None:
    return [i.low, i.high] if i is not None else None


# ---------------------------------------------------------------------------------------------------
# the sweep's selection

def select_sweep(tracker: Tracker, tasks: list[str], budgets: list[float], out_dir: Path, mode: str = "relative",
                 select_by: str = "sparsity", sweep: str | None = None, do_register: bool = True, *,
                 rule: str = "paired", n_resamples: int = RESAMPLES, seed: int = SEED, data_dir: str | None = None,
                 seeds: SeedReruns | None = None, latency_device: str = "trial",
                 registry_suffix: str = "") -> list[dict[str, Any]]:
    """Select per task and budget; write files, register, tag; return one record per (task, budget).

    ``rule``: ``paired`` (default) or ``plain``; the trivial-predictor guard applies under both.
    ``data_dir``: where the evaluation data is (for the picks' held-out report score, tune.heldout).
    ``seeds``: seed re-runs of the reference and the picks (tune.seeds); None = the sweep's trials only.
    ``latency_device``: ``trial`` (the latency on the trial's device: its GPU when it had one) or ``cpu``.
    ``registry_suffix``: appended to the registered model names (``-smoke`` for a smoke sweep).
    """
    if latency_device not in LATENCY_DEVICES:
        raise UsageError(f"--latency-device {latency_device!r} is invalid; accepted: {', '.join(LATENCY_DEVICES)}")
    latency = "cpu_latency_ms" if latency_device == "cpu" else "latency_ms"
    check_rule(rule)
    check_resamples(n_resamples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in tasks:
        points = [p for p in tracker.trial_points(task, sweep, latency)
                  if np.isfinite(p.score) and np.isfinite(p.sparsity)]
        if not points:
            log.warning("task %s has no finished trial: nothing to select", task)
            continue
        compared, note = latency, ""
        devices = sorted({p.info["run"].data.tags.get("latency_device") or "unknown" for p in points})
        if latency == "latency_ms" and len(devices) > 1:  # a CPU-only worker's ms vs a GPU's: not comparable
            compared = "cpu_latency_ms"
            note = (f"trials timed on different devices ({', '.join(devices)}): latencies compared on the CPU "
                    "(cpu_latency_ms, which every trial has)")
            log.warning("task %s: %s", task, note)
            points = [p for p in tracker.trial_points(task, sweep, compared)
                      if np.isfinite(p.score) and np.isfinite(p.sparsity)]
        rows += _select_task(tracker, task, points, budgets, out_dir, mode, select_by, sweep, do_register, rule,
                             n_resamples, seed, data_dir, seeds, registry_suffix, compared, note)
    tmp = out_dir / ".selection.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2, default=str))
    os.replace(tmp, out_dir / "selection.json")
    return rows


def _select_task(tracker: Tracker, task: str, points: list[Point], budgets: list[float], out_dir: Path, mode: str,
                 select_by: str, sweep: str | None, do_register: bool, rule: str, n_resamples: int,
                 seed: int, data_dir: str | None = None, seeds: SeedReruns | None = None,
                 suffix: str = "", latency: str = "latency_ms", latency_note: str = "") -> list[dict[str, Any]]:
    from tasks import get_task

    spec = get_task(task)
    ev = TaskEvidence(tracker, spec, points, n_resamples, seed)
    _log_intervals(tracker, ev, points)
    status, reason, guard_point, guard = task_guard(ev, points)
    _tag_parents(tracker, task, sweep, status, reason)
    ref = reference_point(points)
    excluded = {p.id for p in points if not ev.guard(p.id).learned}
    diffs = {p.id: ev.difference(p.id, ref.id) for p in points}
    applied, notes = rule, [latency_note] if latency_note else []
    if rule == "paired" and ref.id not in ev.preds:
        applied = "plain"
        notes.append("the reference trial has no eval predictions: the plain rule was applied")
    elif rule == "paired" and (unpaired := sum(1 for p in points if diffs[p.id] is None)):
        notes.append(f"{unpaired} trials have no eval predictions on the reference's examples: not eligible under "
                     "the paired rule")
    if guard.method != "bootstrap" and status == LEARNED:
        notes.append(f"task guard without eval predictions: {guard.reason}")
    rows = []
    reports: dict[str, Report] = {}
    for b in budgets:
        dest = out_dir / task / f"budget-{b:g}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        sel_file = dest.parent / f"budget-{b:g}.selection.json"
        record: dict[str, Any] = {
            "task": task, "budget": b, "budget_mode": mode, "select_by": select_by, "latency_compared": latency,
            "selection_rule": rule,
            "rule_applied": applied if status == LEARNED else None, "task_status": status,
            "reference_score": ref.score, "reference_score_ci": _ci(ev.interval(ref.id)), "reference_run_id": ref.id,
            "trivial_score": guard.trivial, "guard": {"run_id": guard_point.id, **guard.to_dict()},
            "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": CONFIDENCE, "guard_z": GUARD_Z},
        }
        s = None
        dropped: list[dict[str, Any]] = []
        seed_stats: dict[str, SeedStats] = {}
        if status == LEARNED:
            diff_low = {k: d.low for k, d in diffs.items() if d is not None} if applied == "paired" else None
            s = select(points, b, mode, select_by, rule=applied, exclude=excluded, diff_low=diff_low)
            while seeds is not None and seeds.n > 1 and s.chosen is not None:  # does the pick hold up?
                seed_stats |= seeds.stats([ref, s.chosen])
                pick_st, ref_st = seed_stats[s.chosen.id], seed_stats[ref.id]
                if holds_up(pick_st, ref_st, b, mode):
                    break
                dropped.append({"run_id": s.chosen.id, "seeds": pick_st.to_dict(),
                                "reason": f"mean over {len(pick_st.scores)} seeds {pick_st.mean:.4f} is below the "
                                          f"threshold {threshold(ref_st.mean, b, mode):.4f} from the reference's mean "
                                          f"{ref_st.mean:.4f}"})
                s = select(points, b, mode, select_by, rule=applied,
                           exclude=excluded | {d["run_id"] for d in dropped}, diff_low=diff_low)
        rep: Report | None = None
        if s is not None and s.chosen is not None:  # the pick is scored once on the held-out part, then confirmed
            run = s.chosen.info["run"]
            previous = json.loads(sel_file.read_text()) if sel_file.is_file() else None
            unchanged = previous is not None and previous.get("chosen_run_id") == run.info.run_id and dest.is_dir()
            if not unchanged:
                _copy_model(tracker, run, dest)
            if run.info.run_id not in reports:  # once per pick (two budgets may pick the same trial)
                reports[run.info.run_id] = report_score(tracker, run, spec, dest, data_dir, n_resamples, seed)
            rep = reports[run.info.run_id]
        if rep is not None and rep.confirms is not False:
            version = register(tracker, task, run, b, suffix) if do_register and run.data.tags.get("model_uri") else None
            m = run.data.metrics
            d = diffs.get(run.info.run_id)
            pick_notes = list(notes)
            if s.chosen.id not in ev.preds:
                pick_notes.append("the chosen trial has no eval predictions: no interval; it passed the guard by the "
                                  "1/sqrt(n) fallback")
            if rep.confirms is None and rep.score is not None:
                pick_notes.append("the report part has no trivial score (scored before it was recorded): the pick "
                                  "was not checked against the trivial predictor on held-out examples")
            if dropped:
                pick_notes.append(f"{len(dropped)} earlier pick(s) did not hold up over seeds and were dropped "
                                  "(dropped_after_seeds)")
            if rep.note:
                pick_notes.append(rep.note)
            expected = _ci(ev.prediction(run.info.run_id, rep.n))
            if within(rep, expected) is False:
                pick_notes.append(f"the report score {rep.score:.4f} is outside [{expected[0]:.4f}, {expected[1]:.4f}], "
                                  "where the selection score and its noise put it (report_prediction_interval): "
                                  "the pick did worse or better on held-out examples than chance explains")
            pick_seeds = seed_stats.get(run.info.run_id)
            ref_seeds = seed_stats.get(ref.id)
            if pick_seeds is not None and pick_seeds.missing:
                pick_notes.append(f"seed re-runs missing for seeds {pick_seeds.missing}: the mean is over "
                                  f"{len(pick_seeds.scores)} seeds")
            if version is not None:
                _tag_version(tracker, model_name(task, suffix), version, run.data.metrics.get("score"), rep, pick_seeds)
            record |= {
                "status": SELECTED, "reason": reason, "notes": pick_notes, "threshold": s.threshold,
                "chosen_run_id": run.info.run_id, "chosen_trial_id": run.data.tags.get("ray_trial_id"),
                "method": run.data.tags.get("method"), "score": m.get("score"),
                "score_ci": _ci(ev.interval(run.info.run_id)),
                "diff_vs_reference": d.to_dict() if d is not None else None, "sparsity": m.get("sparsity"),
                "speedup": m.get("speedup"), "latency_ms": m.get("latency_ms"), "params": dict(run.data.params),
                "speedup_iqr": [m["speedup_q25"], m["speedup_q75"]] if "speedup_q25" in m else None,
                "latency_device": run.data.tags.get("latency_device") or None, "cpu_latency_ms": m.get("cpu_latency_ms"),
                "cpu_speedup": m.get("cpu_speedup"),
                "metrics": dict(m) | _ci_metrics(ev, run.info.run_id), "eligible": s.eligible,
                "considered": s.considered, "excluded": len(excluded), "rule": s.rule_text(),
                "candidates": _candidates(ev, points, diffs, s), "model_dir": str(dest.resolve()),
                "registered_model": model_name(task, suffix) if version else None, "model_version": version,
                "alias": alias_for(b) if version else None,
                "validation_source": run.data.tags.get("validation_source", ""),
                "selection_score": m.get("score"), **rep.to_dict(),
                "report_within_selection_ci": within(rep, _ci(ev.interval(run.info.run_id))),
                "report_prediction_interval": expected, "report_within_prediction_interval": within(rep, expected),
                "refused_run_id": None, "seeds": pick_seeds.to_dict() if pick_seeds else None,
                "reference_seeds": ref_seeds.to_dict() if ref_seeds else None, "dropped_after_seeds": dropped,
            }
        else:  # no pick: no model directory, no alias (an earlier selection's are removed)
            if rep is not None:  # a pick the held-out part does not confirm
                row_status = NOT_CONFIRMED
                sel_score = run.data.metrics.get("score", float("nan"))
                row_reason = (f"the pick (run {run.info.run_id}, selection score {sel_score:.4f}) "
                              f"scores {rep.score:.4f} on the {rep.n} held-out examples, not above the trivial "
                              f"predictor's {rep.trivial:.4f} there: the pick is not confirmed on held-out data, and no "
                              f"model gets the alias of budget {b:g}")
            elif s is not None:
                row_status = NONE_ELIGIBLE
                row_reason = (f"no trial is eligible at budget {b:g}: {len(excluded)} of {len(points)} trials are "
                              "not clearly above the trivial predictor and are never eligible, the others are not "
                              "within budget")
            else:
                row_status, row_reason = status, reason
            if dest.exists():
                shutil.rmtree(dest)
            if do_register:
                _drop_alias(tracker, task, b, suffix)
            record |= {
                "status": row_status, "reason": row_reason, "notes": notes if s is not None else [],
                "threshold": s.threshold if s else None, "chosen_run_id": None, "chosen_trial_id": None,
                "method": None, "score": None, "score_ci": None, "diff_vs_reference": None, "sparsity": None,
                "speedup": None, "latency_ms": None, "params": {}, "metrics": {},
                "eligible": s.eligible if s else 0, "considered": len(points), "excluded": len(excluded),
                "rule": s.rule_text() if s else row_reason, "candidates": _candidates(ev, points, diffs, s),
                "model_dir": None, "registered_model": None, "model_version": None, "alias": None,
                "validation_source": ref.info["run"].data.tags.get("validation_source", ""),
                "selection_score": None, "report_score": None, "report_score_ci": None, "report_n": None,
                "report_note": "", "report_within_selection_ci": None, "report_prediction_interval": None,
                "report_within_prediction_interval": None, "report_trivial_score": None, "refused_run_id": None,
                "seeds": None, "reference_seeds": seed_stats[ref.id].to_dict() if ref.id in seed_stats else None,
                "dropped_after_seeds": dropped,
            }
            if rep is not None:  # what refused the pick, kept for the reader
                record |= {"refused_run_id": run.info.run_id, "selection_score": run.data.metrics.get("score"),
                           **rep.to_dict()}
        record = _finite(record)
        tmp = sel_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, sel_file)
        rows.append(record)
    return rows


def _tag_version(tracker: Tracker, name: str, version: str, selection: float | None, rep: "Report",
                 seed_stats: SeedStats | None) -> None:
    """What the registered model version serves, in its tags: held-out and selection scores, seeds."""
    tags = {"selection_score": selection, "report_score": rep.score, "report_n": rep.n,
            "report_score_ci": f"[{rep.ci[0]:.4f}, {rep.ci[1]:.4f}]" if rep.ci else None}
    if seed_stats is not None:
        tags |= {"seeds": len(seed_stats.scores), "score_mean_over_seeds": seed_stats.mean,
                 "score_std_over_seeds": seed_stats.std}
    for k, v in tags.items():
        if v is None:
            continue
        try:
            with_retry(lambda: tracker.client.set_model_version_tag(name, version, k, str(v)),
                       "tag model version")
        except Exception as e:  # noqa: BLE001 - the selection itself stands
            log.warning("could not tag %s v%s with %s: %s", name, version, k, e)


def _finite(x: Any) -> Any:
    """NaN/inf (a check that could not be made) become None: selection.json stays valid JSON."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _candidates(ev: TaskEvidence, points: list[Point], diffs: dict[str, Difference | None],
                s: Selection | None) -> list[dict[str, Any]]:
    """Every finished trial of the task with its interval, its paired difference to the reference, whether
    it clearly beats the trivial predictor, and whether it was eligible at this budget."""
    eligible = set(s.eligible_ids) if s is not None else set()
    out = []
    for p in sorted(points, key=lambda p: (-p.sparsity, -p.score)):
        d = diffs.get(p.id)
        g = ev.guard(p.id)
        out.append({"run_id": p.id, "method": p.info["run"].data.tags.get("method"),
                    "reference_trial": _is_reference(p), "score": p.score, "score_ci": _ci(ev.interval(p.id)), "sparsity": p.sparsity,
                    "latency_ms": p.latency_ms if np.isfinite(p.latency_ms) else None,
                    "diff_vs_reference_ci": _ci(d), "beats_trivial": g.learned, "guard_method": g.method,
                    "eligible": p.id in eligible})
    return out


def _fmt_ci(score: float | None, ci: list[float] | None) -> str:
    if score is None:
        return "-"
    return f"{score:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " [no CI]")


def _fmt_speedup(r: dict[str, Any]) -> str:
    """The speedup with its spread (quartiles of the interleaved timing rounds) and where it was timed."""
    text = f"{(r['speedup'] or float('nan')):.2f}x"
    if r.get("speedup_iqr"):
        text += f" [{r['speedup_iqr'][0]:.2f}, {r['speedup_iqr'][1]:.2f}]"
    dev = (r.get("latency_device") or "").split(" ")[0]
    return text + (f" {dev}" if dev else "")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary table (scores with their 95% bootstrap intervals), then one note per task that has no
    pick or whose selection fell back to a rule without predictions."""
    head = ["task", "budget", "status", "reference", "chosen (selection part)", "report part", "over seeds",
            "sparsity", "speedup [IQR] device", "method", "rule", "validation", "path"]
    lines = [head]
    notes: dict[str, str] = {}  # text -> where (each text once)
    for r in rows:
        chosen = r.get("chosen_run_id") is not None
        status = r.get("status", SELECTED)
        lines.append([r["task"], f"{r['budget']:g}", status.replace("_", " "),
                      _fmt_ci(r["reference_score"], r.get("reference_score_ci")),
                      _fmt_ci(r["score"], r.get("score_ci")) if chosen else "-",
                      _fmt_ci(r.get("report_score"), r.get("report_score_ci")) if chosen else "-",
                      fmt(r.get("seeds")) if chosen else "-",
                      f"{r['sparsity']:.1%}" if chosen else "-",
                      _fmt_speedup(r) if chosen else "-", r["method"] or "-",
                      r.get("rule_applied") or "-", r["validation_source"], r["model_dir"] or "-"])
        texts = ([r.get("reason", "")] if status != SELECTED else []) + list(r.get("notes") or [])
        for t in texts:
            notes.setdefault(t, f"{r['task']} (budget {r['budget']:g})" if status == NONE_ELIGIBLE else r["task"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
    if notes:
        text += "\n\n" + "\n".join(f"{where}: {t}" for t, where in notes.items())
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.select", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment (= sweep name)")
    p.add_argument("--budget", default="0.02", help="comma list of budgets in [0, 1]")
    p.add_argument("--budget-mode", default="relative", choices=BUDGET_MODES)
    p.add_argument("--select-by", default="sparsity", choices=SELECT_BY)
    p.add_argument("--latency-device", default="trial", choices=LATENCY_DEVICES,
                   help="latency compared by --select-by latency: the trial's device (its GPU in bf16, or fp16, when it "
                        "had one; the CPU for a task whose trials were timed on different devices) or cpu")
    p.add_argument("--rule", default="paired", choices=RULES,
                   help="eligibility: paired = the 95%% paired bootstrap CI of (trial - reference) shows the loss "
                        "is within budget; plain = the point score is within budget (docs/SELECTION.md)")
    p.add_argument("--resamples", type=int, default=RESAMPLES,
                   help=f"bootstrap resamples of the evaluation examples (>= {MIN_RESAMPLES})")
    p.add_argument("--bootstrap-seed", type=int, default=SEED, help="seed of the bootstrap resamples")
    p.add_argument("--tasks", default=None, help="comma list (default: every task with trials)")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--out", default=None, help="output dir (default: runs/<experiment>/selection)")
    p.add_argument("--no-register", action="store_true", help="do not touch the model registry")
    p.add_argument("--data-dir", default=None, help="GLUE Parquet dir, to score each pick once on its report part "
                   "(default: $FINEGATES_GLUE_DIR, else the trial's recorded data dir)")
    p.add_argument("--seeds", type=int, default=1, help="judge picks by their mean over this many seeds, reading the "
                   "re-runs that tune.run --seeds made (this command trains nothing)")
    return p


class NothingToSelect(RuntimeError):
    """The experiment has nothing the selector could choose from: one line, exit code 1."""


def _tasks_to_select(tracker: Tracker, experiment: str, spec: str | None) -> list[str]:
    """The tasks to select for: those named (each must have a finished trial in the sweep), else every
    task with a finished trial. Raises :class:`NothingToSelect` when there is nothing to select."""
    runs = tracker.find_runs(f"tags.`{TAG_ROLE}` = 'trial'")
    in_sweep = sorted({r.data.tags.get(TAG_TASK) for r in runs if r.data.tags.get(TAG_TASK)})
    finished = sorted({t for t in in_sweep if any(np.isfinite(p.score) and np.isfinite(p.sparsity)
                                                  for p in tracker.trial_points(t))})
    if spec:
        from tasks import parse_tasks

        tasks = [t.name for t in parse_tasks(spec)]
        for t in tasks:
            if t not in in_sweep:
                raise NothingToSelect(f"--tasks {t!r} is not in sweep {experiment!r}; its tasks: "
                                      f"{', '.join(in_sweep) or 'none'}")
            if t not in finished:
                raise NothingToSelect(f"task {t!r} has no finished trial in sweep {experiment!r}: nothing to select")
        return tasks
    if not finished:
        raise NothingToSelect(f"sweep {experiment!r} has no finished trial ({len(runs)} trial runs, none FINISHED "
                              "with a score): nothing to select")
    return finished


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        budgets = parse_budgets(args.budget, args.budget_mode)
        if args.resamples < MIN_RESAMPLES:
            raise UsageError(f"--resamples {args.resamples} is too few; accepted: an integer >= {MIN_RESAMPLES}")
        uri = args.mlflow_uri or default_tracking_uri()
        check_reachable(uri)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            # opening a missing SQLite store would create an empty one: the selector only reads
            raise UsageError(f"no MLflow store at {uri}; give the sweep's --mlflow-uri")
        out = Path(args.out or Path("runs") / args.experiment / "selection").resolve()
        from finegates.preflight import check_output_dir

        problems = check_output_dir(out, "--out")
        if problems:
            raise UsageError(problems[0])
        if args.tasks:
            from tasks import parse_tasks

            parse_tasks(args.tasks)  # a bad name is a usage error (2), before the store is read
        exp = with_retry(lambda: MlflowClient(tracking_uri=uri).get_experiment_by_name(args.experiment),
                         "get experiment")
        if exp is None:
            raise UsageError(f"--experiment {args.experiment!r} does not exist in {uri}")
        tracker = Tracker(uri, experiment_id=exp.experiment_id)
        tasks = _tasks_to_select(tracker, args.experiment, args.tasks)
        suffix = exp.tags.get(TAG_REGISTRY_SUFFIX, "")
        try:
            check_seeds(args.seeds)
        except ValueError as e:
            raise UsageError(str(e)) from None
        from tasks import resolve_data_dir

        local = resolve_data_dir(args.data_dir)  # --data-dir, else $FINEGATES_GLUE_DIR; a missing folder: one line
        data_dir = str(local) if local is not None else None
        rows = select_sweep(tracker, tasks, budgets, out, args.budget_mode, args.select_by,
                            do_register=not args.no_register, rule=args.rule, n_resamples=args.resamples,
                            seed=args.bootstrap_seed, data_dir=data_dir,
                            seeds=SeedReruns(tracker, args.seeds) if args.seeds > 1 else None,
                            latency_device=args.latency_device, registry_suffix=suffix)
    except NothingToSelect as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (UsageError, TrackingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"\nselection: {out / 'selection.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
