"""Pareto front and the budget selector, on plain points (no Ray, no MLflow).

A point is a finished trial: its ``score`` (higher is better, may be negative: CoLA MCC), its
``sparsity`` and ``latency_ms``. Budgets are relative by default: ``budget=0.02`` admits every trial
whose score is at least ``reference - 0.02 * |reference|``; ``mode="absolute"`` admits
``reference - budget`` (score points).

>>> pts = [Point("a", 0.90, 0.0, 10.0), Point("b", 0.89, 0.3, 8.0), Point("c", 0.85, 0.6, 6.0)]
>>> [p.id for p in pareto_front(pts)]
['a', 'b', 'c']
>>> select(pts, budget=0.02).chosen.id
'b'
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

BUDGET_MODES = ("relative", "absolute")
SELECT_BY = ("sparsity", "latency")
EPS = 1e-12


@dataclass(frozen=True)
class Point:
    id: str
    score: float
    sparsity: float
    latency_ms: float = math.inf
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def dominates(a: Point, b: Point) -> bool:
    """a dominates b: no worse in score and sparsity, strictly better in one."""
    return a.score >= b.score and a.sparsity >= b.sparsity and (a.score > b.score or a.sparsity > b.sparsity)


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """Non-dominated points (score up, sparsity up), sorted by sparsity; equal points all stay."""
    pts = [p for p in points if math.isfinite(p.score) and math.isfinite(p.sparsity)]
    front = [p for p in pts if not any(dominates(q, p) for q in pts)]
    return sorted(front, key=lambda p: (p.sparsity, -p.score, p.id))


def threshold(reference: float, budget: float, mode: str = "relative") -> float:
    check_budget(budget, mode)
    if mode == "absolute":
        return reference - budget
    return reference - budget * abs(reference)


def check_budget(budget: float, mode: str = "relative") -> None:
    if mode not in BUDGET_MODES:
        raise ValueError(f"budget mode {mode!r} is invalid; accepted: {', '.join(BUDGET_MODES)}")
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or not 0 <= budget <= 1:
        raise ValueError(f"budget {budget!r} is out of range; accepted: a number in [0, 1]")


@dataclass
class Selection:
    budget: float
    mode: str
    select_by: str
    reference: Point
    threshold: float
    chosen: Point
    eligible: int
    considered: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rule"] = (f"reference = best score of {self.considered} finished trials; eligible = score >= "
                     f"{'reference - budget*|reference|' if self.mode == 'relative' else 'reference - budget'}"
                     f" = {self.threshold:.6g}; chosen = highest "
                     f"{'sparsity, ties: lower latency' if self.select_by == 'sparsity' else 'speed (lowest latency), ties: higher sparsity'}")
        return d


def select(points: Iterable[Point], budget: float, mode: str = "relative", select_by: str = "sparsity") -> Selection:
    """The best point within ``budget`` of the best score. Every finished point is considered."""
    if select_by not in SELECT_BY:
        raise ValueError(f"select-by {select_by!r} is invalid; accepted: {', '.join(SELECT_BY)}")
    pts = [p for p in points if math.isfinite(p.score) and math.isfinite(p.sparsity)]
    if not pts:
        raise ValueError("no finished trial to select from")
    ref = max(pts, key=lambda p: (p.score, p.sparsity, -p.latency_ms))
    thr = threshold(ref.score, budget, mode)
    eligible = [p for p in pts if p.score >= thr - EPS]
    if select_by == "sparsity":
        key = lambda p: (p.sparsity, -p.latency_ms, p.score)  # noqa: E731
    else:
        key = lambda p: (-p.latency_ms, p.sparsity, p.score)  # noqa: E731
    chosen = max(eligible, key=key)
    return Selection(budget, mode, select_by, ref, thr, chosen, len(eligible), len(pts))
