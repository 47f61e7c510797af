"""One Optuna study per (task, method), behind one Ray Tune searcher, so that all tasks share the
workers of one Tuner.

Each study is multi-objective (score up, sparsity up) with Optuna's TPE sampler, which handles
several objectives (MOTPE) and works from few trials; NSGA-II would need a population per generation.
Each study's first trial is its method's reference (FineGates: lambda = 0); it is told to the study
with the parameters that lie inside the space. Trials are handed out round-robin over the studies.
A failed or NaN trial is told as FAIL. The searcher pickles its studies for ``--resume``.
"""
from __future__ import annotations

import logging
import math
import pickle
from typing import Any

import optuna
from optuna.trial import TrialState, create_trial
from ray.tune.search import Searcher

from tune.space import SearchSpace

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

Key = tuple[str, str]  # (task, method)


class MultiTaskOptunaSearch(Searcher):
    def __init__(self, tasks: list[str], spaces: list[SearchSpace], trials_per_task: int, seed: int = 0,
                 n_startup_trials: int = 4) -> None:
        super().__init__(metric="score", mode="max")
        self.keys: list[Key] = [(t, s.method) for t in tasks for s in spaces]
        self.spaces = {s.method: s for s in spaces}
        self.trials_per_task = trials_per_task
        self.studies: dict[Key, optuna.Study] = {}
        for i, (task, method) in enumerate(self.keys):
            sampler = optuna.samplers.TPESampler(seed=seed + i, n_startup_trials=n_startup_trials)
            self.studies[(task, method)] = optuna.create_study(
                study_name=f"{task}/{method}", directions=["maximize", "maximize"], sampler=sampler)
        self.suggested: dict[Key, int] = {k: 0 for k in self.keys}
        self.live: dict[str, tuple[Key, int | None, dict[str, Any]]] = {}  # trial_id -> (key, optuna number, params)

    def _next_key(self) -> Key | None:
        open_keys = [k for k in self.keys if self.suggested[k] < self.trials_per_task]
        if not open_keys:
            return None
        return min(open_keys, key=lambda k: (self.suggested[k], self.keys.index(k)))

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        key = self._next_key()
        if key is None:
            return Searcher.FINISHED
        task, method = key
        space = self.spaces[method]
        study = self.studies[key]
        if self.suggested[key] == 0:
            params, number, reference = dict(space.reference), None, True
        else:
            ot = study.ask()
            params, number, reference = space.sample(ot), ot.number, False
        self.suggested[key] += 1
        self.live[trial_id] = (key, number, params)
        return {"task": task, "method": method, "reference": reference, **params}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self.live:
            return
        (task, method), number, params = self.live.pop(trial_id)
        study = self.studies[(task, method)]
        values = None
        if not error and result is not None and result.get("final"):
            score, sparsity = result.get("score"), result.get("sparsity")
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (score, sparsity)):
                values = [float(score), float(sparsity)]
        if number is None:  # the reference trial: add it with the parameters that lie in the space
            space = self.spaces[method]
            inside = space.in_space(params)
            study.add_trial(create_trial(
                params=inside, distributions={k: space.distributions[k] for k in inside},
                values=values, state=TrialState.COMPLETE if values else TrialState.FAIL,
                user_attrs={"reference": True, "ray_trial_id": trial_id, **{f"ref_{k}": v for k, v in params.items()}}))
        elif values is None:
            study.tell(number, state=TrialState.FAIL)
        else:
            study.tell(number, values)
        log.info("study %s/%s told trial %s: %s", task, method, trial_id, values or "FAIL")

    # ---- checkpointing for --resume
    def get_state(self) -> dict[str, Any]:
        return {"studies": self.studies, "suggested": self.suggested, "live": self.live, "keys": self.keys}

    def set_state(self, state: dict[str, Any]) -> None:
        self.studies, self.suggested, self.live, self.keys = (state["studies"], state["suggested"], state["live"],
                                                              state["keys"])

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
