"""Seed re-runs (``tune.run --seeds N``): a pick is a model only if it holds up under other seeds.

Before registration, the task's reference trial and each budget's pick are trained again with N - 1
other training seeds (``seed + 1 ... seed + N - 1``; the data, its evaluation split and the teacher stay
those of the sweep). Each re-run is an MLflow run, child of the trial it repeats (tag
``finegates.role = seed-rerun``, ``seed``), with its metrics and eval predictions. The table and
``selection.json`` then report each pick's score as mean +- std over its N seeds (the sweep's trial
included). A pick holds up when its mean score is within budget of the reference's mean (the plain rule
on means); one that does not is dropped, and the next eligible trial is tried (re-run too), and so on.

``tune.select --seeds N`` reads the re-runs a sweep made (it trains nothing); a missing re-run is said in
the row's notes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tune.pareto import Point, threshold
from tune.tracking import TAG_ROLE, Tracker

log = logging.getLogger(__name__)

ROLE_RERUN = "seed-rerun"
#: ``launch(jobs)``: train every (trial run, seed) in ``jobs`` and log each as a child run (tune.run does it on Ray)
Launcher = Callable[[list[tuple[Any, int]]], None]


def check_seeds(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--seeds {n!r} is invalid; accepted: an integer >= 1 (1 = no re-runs)")
    return n


def rerun_seeds(base: int, n: int) -> list[int]:
    return [base + k for k in range(1, n)]


@dataclass
class SeedStats:
    """A trial's scores over its seeds (the trial itself first)."""

    run_id: str
    seeds: list[int]
    scores: list[float]
    sparsities: list[float]
    missing: list[int]

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        return float(np.std(self.scores, ddof=1)) if len(self.scores) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "seeds": self.seeds, "scores": self.scores, "sparsities": self.sparsities,
                "mean": self.mean, "std": self.std, "missing_seeds": self.missing}


class SeedReruns:
    """Seed statistics of trials, re-running the missing seeds with ``launch`` (None: read only)."""

    def __init__(self, tracker: Tracker, n_seeds: int, launch: Launcher | None = None) -> None:
        self.tracker, self.n, self.launch = tracker, check_seeds(n_seeds), launch
        self._cache: dict[str, SeedStats] = {}

    def _existing(self, run_id: str) -> dict[int, Any]:
        runs = self.tracker.find_runs(f"tags.`{TAG_ROLE}` = '{ROLE_RERUN}'", f"tags.`mlflow.parentRunId` = '{run_id}'",
                                      status="FINISHED")
        return {int(r.data.tags["seed"]): r for r in runs if "score" in r.data.metrics and "seed" in r.data.tags}

    def stats(self, points: list[Point]) -> dict[str, SeedStats]:
        todo = list({p.id: p for p in points if p.id not in self._cache}.values())  # the pick may be the reference
        if todo and self.launch is not None:
            jobs = []
            for p in todo:
                run = p.info["run"]
                have = self._existing(p.id)
                jobs += [(run, s) for s in rerun_seeds(_seed_of(run), self.n) if s not in have]
            if jobs:
                log.warning("seed re-runs: %d runs (%s)", len(jobs), ", ".join(f"{r.info.run_id[:8]}@{s}" for r, s in jobs))
                self.launch(jobs)
        for p in todo:
            run = p.info["run"]
            have = self._existing(p.id)
            want = rerun_seeds(_seed_of(run), self.n)
            got = [s for s in want if s in have]
            self._cache[p.id] = SeedStats(
                p.id, [_seed_of(run)] + got, [p.score] + [have[s].data.metrics["score"] for s in got],
                [p.sparsity] + [have[s].data.metrics.get("sparsity", float("nan")) for s in got],
                [s for s in want if s not in have])
        return {p.id: self._cache[p.id] for p in points}


def _seed_of(run) -> int:
    return int(run.data.params.get("seed", 0))


def holds_up(pick: SeedStats, reference: SeedStats, budget: float, mode: str) -> bool:
    """The plain budget rule on the means over seeds."""
    return pick.mean >= threshold(reference.mean, budget, mode) - 1e-12


def fmt(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f} (n={len(stats['scores'])})"


__all__ = ["ROLE_RERUN", "SeedReruns", "SeedStats", "check_seeds", "fmt", "holds_up", "rerun_seeds"]
