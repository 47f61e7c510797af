"""Tune callbacks that run on the driver."""
from __future__ import annotations

import logging

from ray.tune import Callback

from tune.tracking import Tracker

log = logging.getLogger(__name__)


class ParetoCallback(Callback):
    """Re-tag the task's Pareto front in MLflow (``pareto=true/false``) whenever one of its trials ends,
    so the MLflow UI can filter to the front while the sweep runs. Best effort, one attempt per call: while the
    tracking server is away it must not hold up Tune's loop, and the sweep re-tags every front at its end."""

    def __init__(self, uri: str, experiment_id: str, sweep: str) -> None:
        self.uri, self.experiment_id, self.sweep = uri, experiment_id, sweep

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._retag(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._retag(trial)

    def _retag(self, trial) -> None:
        try:
            Tracker(self.uri, experiment_id=self.experiment_id, retry_s=0).update_pareto_tags(trial.config["task"], self.sweep)
        except Exception as e:  # noqa: BLE001 - tagging must never stop the sweep
            log.warning("could not update Pareto tags: %s", e)
