"""One Optuna study per (task, method), behind one Ray Tune searcher, so that all tasks share the
workers of one Tuner.

Each study is multi-objective (score up, sparsity up) with Optuna's TPE sampler, which handles
several objectives (MOTPE) and works from few trials; NSGA-II would need a population per generation.
Each study's first trial is its method's reference (FineGates: lambda = 0); it is told to the study
with the parameters that lie inside the space. Trials are handed out round-robin over the studies.
A failed or NaN trial is told as FAIL; a trial that ended without error but without its final result
(a scheduler stopped it early) as PRUNED, with its last epoch's ``stopped_epoch``, ``last_score`` and
``last_sparsity`` as user attributes.

The studies live in an Optuna RDB storage (tune/studies.py), named ``<experiment>/<task>/<method>``,
and are opened with ``load_if_exists``. Ray's searcher checkpoint holds only the counters and the live
trials (Ray trial id -> study, Optuna trial number, parameters): on ``--resume`` the studies are read
back from the storage. A study trial that is RUNNING but no live trial of the checkpoint (asked after
Ray's last checkpoint, lost with the driver) is told FAIL, with the user attribute ``lost`` = True.
"""
from __future__ import annotations

import logging
import math
import pickle
from typing import Any

import optuna
from optuna.trial import TrialState, create_trial
from ray.tune.search import Searcher

from tune.scheduler import EPOCH_SPARSITY
from tune.space import SearchSpace
from tune.studies import open_storage, study_name

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

Key = tuple[str, str]  # (task, method)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class MultiTaskOptunaSearch(Searcher):
    def __init__(self, tasks: list[str], spaces: list[SearchSpace], trials_per_task: int, storage: str,
                 experiment: str, seed: int = 0, n_startup_trials: int = 4) -> None:
        super().__init__(metric="score", mode="max")
        self.keys: list[Key] = [(t, s.method) for t in tasks for s in spaces]
        self.spaces = {s.method: s for s in spaces}
        self.trials_per_task = trials_per_task
        self.storage = storage
        self.experiment = experiment
        self.seed, self.n_startup_trials = seed, n_startup_trials
        self.suggested: dict[Key, int] = {k: 0 for k in self.keys}
        self.live: dict[str, tuple[Key, int | None, dict[str, Any]]] = {}  # trial_id -> (key, optuna number, params)
        self._studies: dict[Key, optuna.Study] = {}  # opened on first use; neither is pickled
        self._rdb: optuna.storages.BaseStorage | None = None

    def study(self, key: Key) -> optuna.Study:
        """The study of ``key``, created or loaded from the storage; RUNNING trials that no live trial
        owns are told FAIL (``lost``)."""
        if key in self._studies:
            return self._studies[key]
        storage = self._storage()
        name = study_name(self.experiment, *key)
        study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "maximize"],
                                    load_if_exists=True)
        trials = study.get_trials(deepcopy=False)
        # a resumed study gets another sampler seed: a restarted RandomSampler would repeat the first trials
        i = self.keys.index(key)
        study.sampler = optuna.samplers.TPESampler(seed=self.seed + i + len(self.keys) * len(trials),
                                                   n_startup_trials=self.n_startup_trials)
        owned = {number for k, number, _ in self.live.values() if k == key}
        for t in trials:
            if t.state == TrialState.RUNNING and t.number not in owned:
                storage.set_trial_user_attr(t._trial_id, "lost", True)
                study.tell(t.number, state=TrialState.FAIL)
                log.warning("study %s: trial %d was asked but lost with the driver: told FAIL", name, t.number)
        self._studies[key] = study
        return study

    def _storage(self) -> optuna.storages.BaseStorage:
        if self._rdb is None:
            self._rdb = open_storage(self.storage)
        return self._rdb

    def use_storage(self, storage: str) -> None:
        """Read and write the studies in ``storage`` from now on (a resumed sweep's ``--optuna-storage``)."""
        if storage != self.storage:
            self.storage, self._rdb, self._studies = storage, None, {}

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
        study = self.study(key)
        if self.suggested[key] == 0:
            params, number, reference = dict(space.reference), None, True
        else:
            ot = study.ask()
            ot.set_user_attr("ray_trial_id", trial_id)
            params, number, reference = space.sample(ot), ot.number, False
        self.suggested[key] += 1
        self.live[trial_id] = (key, number, params)
        return {"task": task, "method": method, "reference": reference, **params}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self.live:
            return
        key, number, params = self.live[trial_id]
        study = self.study(key)
        values, attrs = None, {}
        state = TrialState.FAIL
        if not error and result is not None and result.get("final"):
            score, sparsity = result.get("score"), result.get("sparsity")
            if _finite(score) and _finite(sparsity):
                values, state = [float(score), float(sparsity)], TrialState.COMPLETE
        elif not error and result is not None and result.get("final") is False:  # stopped early by a scheduler
            state = TrialState.PRUNED
            last = {"stopped_epoch": result.get("epoch"), "last_score": result.get("score"),
                    "last_sparsity": result.get(EPOCH_SPARSITY, 0.0)}  # what tune.scheduler compared
            attrs = {k: float(v) for k, v in last.items() if _finite(v)}
        if number is None:  # the reference trial: add it with the parameters that lie in the space
            if any(t.user_attrs.get("ray_trial_id") == trial_id for t in study.get_trials(deepcopy=False)):
                log.info("study %s: reference %s was told before the resume", study.study_name, trial_id)
            else:
                space = self.spaces[key[1]]
                inside = space.in_space(params)
                study.add_trial(create_trial(
                    params=inside, distributions={k: space.distributions[k] for k in inside}, values=values,
                    state=state, user_attrs={"reference": True, "ray_trial_id": trial_id, **attrs,
                                             **{f"ref_{k}": v for k, v in params.items()}}))
        else:
            frozen = study.get_trials(deepcopy=False)[number]
            if frozen.state.is_finished():  # told before the driver died, after Ray's last checkpoint
                log.info("study %s: trial %d was told before the resume", study.study_name, number)
            else:
                for k, v in attrs.items():
                    self._storage().set_trial_user_attr(frozen._trial_id, k, v)
                study.tell(number, values, state=state)
        del self.live[trial_id]
        log.info("study %s told trial %s: %s", study.study_name, trial_id, values or state.name)

    # ---- checkpointing for --resume: counters and live trials only; the studies are in the storage
    def get_state(self) -> dict[str, Any]:
        return {"suggested": self.suggested, "live": self.live, "keys": self.keys}

    def set_state(self, state: dict[str, Any]) -> None:
        self.suggested, self.live, self.keys = state["suggested"], state["live"], state["keys"]
        self._studies = {}
        for key in self.keys:  # reopen every study now: trials lost with the driver are told FAIL at once
            self.study(key)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles the searcher into tuner.pkl: no connections
        state = dict(self.__dict__)
        state["_studies"], state["_rdb"] = {}, None
        return state
