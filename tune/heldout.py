"""Held-out reporting: the chosen model of each task and budget is scored once on the report part.

A sweep's trials are evaluated on the *selection* part of each task's evaluation set (a seeded,
stratified split, :func:`tasks.split_eval`; ``tune.run --report-frac``). The selector picks with those
scores, so the pick's selection score is biased upward (winner's curse: the more trials, the more so).
The *report* part is seen by nobody until a model is picked; then the pick is scored on it once, and
that is the score the table, ``selection.json`` and the registered model's tags report, beside the
selection score.

"Once": the first evaluation logs ``report_score`` (with its 95% bootstrap interval and the number of
examples) on the pick's MLflow run and its predictions as the artifact ``report_predictions.npz``; a
later selection that picks the same trial reads them back instead of evaluating again. Trials that are
never picked are never evaluated on the report part. The split is rebuilt where the selector runs: it is
scored only when it is the trial's (:func:`split_mismatch`), else the row gets a note saying why not.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks import trivial_score
from tune.stats import CONFIDENCE, RESAMPLES, SEED, Bootstrap
from tune.tracking import Tracker, with_retry

if TYPE_CHECKING:
    from finegates.config import TrainConfig
    from tasks import TaskSpec

log = logging.getLogger(__name__)

TAG_CONFIG = "train_config"  # the trial's effective TrainConfig as JSON (written by tune.trial)
REPORT_ARTIFACT = "report_predictions.npz"


@dataclass
class Report:
    """A pick's score on the report part (``score`` is None, with a ``note``, when it cannot be made)."""

    score: float | None
    ci: tuple[float, float] | None = None
    n: int | None = None
    note: str = ""
    computed_now: bool = False
    trivial: float | None = None  # the trivial predictor's score on the report part

    @property
    def confirms(self) -> bool | None:
        """The pick beats the trivial predictor on the held-out examples too (None when either is unknown)."""
        if self.score is None or self.trivial is None:
            return None
        return bool(self.score > self.trivial)

    def to_dict(self) -> dict[str, Any]:
        return {"report_score": self.score, "report_score_ci": list(self.ci) if self.ci else None,
                "report_n": self.n, "report_note": self.note, "report_trivial_score": self.trivial}


def config_tag(cfg: "TrainConfig") -> str:
    """The ``train_config`` tag of a trial run with config ``cfg``: every field but the output dir, and every option of
    the method (:meth:`TrainConfig.recorded`), as JSON. :func:`trial_config` reads it back."""
    return json.dumps({k: v for k, v in cfg.recorded().items() if k != "output_dir"})


def trial_config(run, data_dir: str | None = None) -> "TrainConfig | None":
    """The trial's TrainConfig from its ``train_config`` tag (None for runs made before it was recorded).
    ``data_dir`` (the selector's) replaces the trial's when given: the data may live elsewhere here."""
    from finegates.config import TrainConfig

    raw = run.data.tags.get(TAG_CONFIG)
    if not raw:
        return None
    cfg = TrainConfig.from_dict(json.loads(raw))
    return replace(cfg, data_dir=data_dir) if data_dir else cfg


def report_score(tracker: Tracker, run, task: "TaskSpec", model_dir: str | os.PathLike, data_dir: str | None = None,
                 n_resamples: int = RESAMPLES, seed: int = SEED) -> Report:
    """The pick's report-part score: read back when it was made before, else computed now (once) and logged
    on its run."""
    m = run.data.metrics
    if "report_score" in m:
        ci = (m["report_score_ci_low"], m["report_score_ci_high"]) if "report_score_ci_low" in m else None
        return Report(m["report_score"], ci, int(m["report_n"]) if "report_n" in m else None,
                      trivial=m.get("report_trivial_score"))
    from finegates.errors import ConfigError

    try:
        cfg = trial_config(run, data_dir)
    except ConfigError as e:  # e.g. an option recorded then that this version no longer has
        return Report(None, note=f"report part not scored: its {TAG_CONFIG} tag does not read as a config here ({e})")
    if cfg is None or cfg.eval_part != "selection":
        return Report(None, note="no report part: this trial was evaluated on its whole evaluation set (a sweep made "
                                 "before held-out reporting, or one run outside tune.run)")
    from finegates.train import evaluate_checkpoint

    try:
        mismatch = split_mismatch(run, cfg, task)
        if mismatch:
            return Report(None, note=f"report part not scored: the split rebuilt here is not the trial's ({mismatch}); "
                                     "give tune.select --data-dir with the sweep's data")
        preds, labels = evaluate_checkpoint(model_dir, cfg, "report")
    except Exception as e:  # noqa: BLE001 - no data here, hub offline, ...: the selection itself stands
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return Report(None, note=f"report part not scored here ({type(e).__name__}: {first}); give tune.select "
                                 "--data-dir to score it")
    bs = Bootstrap(task, labels, n_resamples, seed, CONFIDENCE)
    ci = bs.interval(preds)
    rep = Report(ci.estimate, (ci.low, ci.high), int(labels.size), computed_now=True,
                 trivial=trivial_score(task, labels))
    _log(tracker, run.info.run_id, rep, preds, labels)
    return rep


def split_mismatch(run, cfg: "TrainConfig", task: "TaskSpec") -> str:
    """Why the evaluation split rebuilt here from ``cfg`` (the trial's ``train_config`` tag, with this
    machine's data dir) is not the one the trial was evaluated on; empty when it is. Checked: the tag's
    data seed, eval part and report fraction against the run's params, then the rebuilt selection part
    against the trial's ``validation_source`` tag and ``n_eval`` metric (other data here: another file,
    QQP with a validation split where the trial held out train rows, ...)."""
    from tasks.data import select_frames

    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    problems = []
    for name, value in (("data_seed", cfg.data_seed), ("eval_part", cfg.eval_part), ("report_frac", cfg.report_frac)):
        recorded = params.get(name)
        if recorded is not None and recorded != ("none" if value is None else str(value)):
            problems.append(f"{name} {value} in its {TAG_CONFIG} tag vs {recorded} in its params")
    if problems:
        return "; ".join(problems)
    _, sel, source, _ = select_frames(task, data_dir=cfg.data_dir, max_train=cfg.max_train, max_eval=cfg.max_eval,
                                      seed=cfg.subset_seed, eval_part="selection", report_frac=cfg.report_frac)
    if tags.get("validation_source") and tags["validation_source"] != source:
        problems.append(f"validation source {source} here vs {tags['validation_source']} in the trial")
    if "n_eval" not in metrics:
        problems.append("the trial recorded no n_eval")
    elif int(metrics["n_eval"]) != len(sel):
        problems.append(f"{len(sel)} selection examples here vs n_eval {int(metrics['n_eval'])} in the trial")
    return "; ".join(problems)


def _log(tracker: Tracker, run_id: str, rep: Report, preds: np.ndarray, labels: np.ndarray) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric("report_score", float(rep.score), now, 0), Metric("report_n", float(rep.n), now, 0)]
    if rep.trivial is not None:
        metrics.append(Metric("report_trivial_score", float(rep.trivial), now, 0))
    if rep.ci:
        metrics += [Metric("report_score_ci_low", float(rep.ci[0]), now, 0),
                    Metric("report_score_ci_high", float(rep.ci[1]), now, 0)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / REPORT_ARTIFACT
        np.savez(path, predictions=preds, labels=labels)
        try:
            with_retry(lambda: tracker.client.log_artifact(run_id, str(path)), "log report predictions")
        except Exception as e:  # noqa: BLE001 - the score itself is what matters; it is still logged below
            log.warning("could not log the report predictions of run %s: %s", run_id, e)
    with_retry(lambda: tracker.client.log_batch(run_id, metrics=metrics), "log report score")


def within(rep: Report, selection_ci: list[float] | None) -> bool | None:
    """Whether the report score lies inside the pick's selection-part 95% interval (None if unknown)."""
    if rep.score is None or not selection_ci:
        return None
    return bool(selection_ci[0] <= rep.score <= selection_ci[1])


__all__ = ["REPORT_ARTIFACT", "Report", "TAG_CONFIG", "config_tag", "report_score", "split_mismatch", "trial_config", "within"]
