"""Pareto front and the budget selector, on plain points (no Ray, no MLflow).

A point is a finished trial: its ``score`` (higher is better, may be negative: CoLA MCC), its
``sparsity`` and ``latency_ms``. Budgets are relative by default: ``budget=0.02`` admits every trial
whose score is at least ``reference - 0.02 * |reference|``; ``mode="absolute"`` admits
``reference - budget`` (score points).

Two eligibility rules (docs/SELECTION.md): ``plain`` compares point scores with the threshold;
``paired`` additionally needs the lower end of the 95% paired bootstrap interval of
``(trial - reference)`` (``diff_low``, computed by the caller from per-example predictions, see
tune/stats.py) to be >= ``-budget*|reference|`` (``-budget`` when absolute): a trial is eligible only
when the evaluation examples show that it loses no more than the budget. Points listed in
``exclude`` (e.g. not distinguishable from the trivial predictor) are never eligible, under either rule.

>>> pts = [Point("a", 0.90, 0.0, 10.0), Point("b", 0.89, 0.3, 8.0), Point("c", 0.85, 0.6, 6.0)]
>>> [p.id for p in pareto_front(pts)]
['a', 'b', 'c']
>>> select(pts, budget=0.02).chosen.id
'b'
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

BUDGET_MODES = ("relative", "absolute")
SELECT_BY = ("sparsity", "latency")
RULES = ("paired", "plain")
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


def allowed_loss(reference: float, budget: float, mode: str = "relative") -> float:
    """How many score points below the reference a trial may lose: ``budget*|reference|`` or ``budget``."""
    return reference - threshold(reference, budget, mode)


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is invalid; accepted: {', '.join(RULES)}")


def reference_point(points: Iterable[Point]) -> Point:
    """The reference of a budget: the best score of the finished points (ties: sparser, then faster)."""
    pts = [p for p in points if math.isfinite(p.score) and math.isfinite(p.sparsity)]
    if not pts:
        raise ValueError("no finished trial to select from")
    return max(pts, key=lambda p: (p.score, p.sparsity, -p.latency_ms))


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
    chosen: Point | None  # None: nothing eligible (only possible with ``exclude``)
    eligible: int
    considered: int
    rule: str = "plain"
    excluded: int = 0
    eligible_ids: tuple[str, ...] = ()

    def rule_text(self) -> str:
        loss = "budget*|reference|" if self.mode == "relative" else "budget"
        text = (f"reference = best score of {self.considered} finished trials; eligible = score >= "
                f"{'reference - budget*|reference|' if self.mode == 'relative' else 'reference - budget'}"
                f" = {self.threshold:.6g}")
        if self.rule == "paired":
            text += (f" and the lower end of the 95% paired bootstrap CI of (trial - reference) >= -{loss} = "
                     f"{self.threshold - self.reference.score:.6g}")
        if self.excluded:
            text += f"; {self.excluded} trials not clearly above the trivial predictor are never eligible"
        by = ("sparsity, ties: lower latency" if self.select_by == "sparsity"
              else "speed (lowest latency), ties: higher sparsity")
        return text + f"; chosen = highest {by}"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("reference", "chosen")}
        d["reference"] = _point_dict(self.reference)
        d["chosen"] = _point_dict(self.chosen) if self.chosen is not None else None
        d["eligible_ids"] = list(self.eligible_ids)
        d["rule_name"] = self.rule
        d["rule"] = self.rule_text()
        return d


def _point_dict(p: Point) -> dict[str, Any]:
    return {"id": p.id, "score": p.score, "sparsity": p.sparsity, "latency_ms": p.latency_ms}


def select(points: Iterable[Point], budget: float, mode: str = "relative", select_by: str = "sparsity", *,
           rule: str = "plain", diff_low: Mapping[str, float] | None = None,
           exclude: Iterable[str] = ()) -> Selection:
    """The best point within ``budget`` of the best score. Every finished point is considered.

    ``rule="paired"`` needs ``diff_low``: per point id, the lower end of the paired bootstrap interval
    of (point - reference); a point without an entry is not eligible (the reference is, with 0).
    Points in ``exclude`` are never eligible; ``chosen`` is None when nothing is.
    """
    if select_by not in SELECT_BY:
        raise ValueError(f"select-by {select_by!r} is invalid; accepted: {', '.join(SELECT_BY)}")
    check_rule(rule)
    if rule == "paired" and diff_low is None:
        raise ValueError("rule 'paired' needs diff_low (paired bootstrap lower bounds per point); accepted rules "
                         f"without it: plain")
    pts = [p for p in points if math.isfinite(p.score) and math.isfinite(p.sparsity)]
    ref = reference_point(pts)
    thr = threshold(ref.score, budget, mode)
    excluded = set(exclude)
    eligible = [p for p in pts if p.score >= thr - EPS and p.id not in excluded]
    if rule == "paired":
        assert diff_low is not None
        loss = allowed_loss(ref.score, budget, mode)
        lows = {**diff_low, ref.id: 0.0}
        eligible = [p for p in eligible if p.id in lows and math.isfinite(lows[p.id]) and lows[p.id] >= -loss - EPS]
    if select_by == "sparsity":
        key = lambda p: (p.sparsity, -p.latency_ms, p.score)  # noqa: E731
    else:
        key = lambda p: (-p.latency_ms, p.sparsity, p.score)  # noqa: E731
    chosen = max(eligible, key=key) if eligible else None
    return Selection(budget, mode, select_by, ref, thr, chosen, len(eligible), len(pts), rule,
                     sum(1 for p in pts if p.id in excluded), tuple(p.id for p in eligible))
