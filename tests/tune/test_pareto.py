import doctest

import pytest

import tune.pareto
from tune.pareto import Point, pareto_front, select, threshold


def P(id, score, sparsity, latency=10.0):
    return Point(id, score, sparsity, latency)


def test_doctests():
    assert doctest.testmod(tune.pareto).failed == 0


def test_dominated_points_leave_the_front_and_ties_stay():
    pts = [P("a", 0.9, 0.1), P("b", 0.8, 0.1), P("c", 0.9, 0.1), P("d", 0.7, 0.5), P("e", 0.6, 0.4)]
    assert [p.id for p in pareto_front(pts)] == ["a", "c", "d"]


def test_nan_points_are_ignored():
    assert [p.id for p in pareto_front([P("a", float("nan"), 0.9), P("b", 0.5, 0.1)])] == ["b"]


def test_budget_zero_takes_the_sparsest_of_the_best_scores():
    pts = [P("ref", 0.9, 0.0), P("same", 0.9, 0.2), P("lower", 0.899, 0.5)]
    s = select(pts, 0.0)
    assert s.chosen.id == "same" and s.eligible == 2


def test_budget_half_admits_much_lower_scores():
    pts = [P("ref", 0.9, 0.0), P("half", 0.46, 0.8), P("too_low", 0.44, 0.95)]
    assert select(pts, 0.5).chosen.id == "half"


def test_relative_vs_absolute():
    pts = [P("ref", 0.5, 0.0), P("x", 0.49, 0.3), P("y", 0.485, 0.6)]
    assert select(pts, 0.02).chosen.id == "x"  # 0.5 * 0.98 = 0.49
    assert select(pts, 0.02, mode="absolute").chosen.id == "y"  # 0.5 - 0.02 = 0.48


def test_cola_mcc_and_negative_references():
    # a reference MCC of 0.30 and a 10% budget admits 0.27
    pts = [P("ref", 0.30, 0.0), P("ok", 0.27, 0.4), P("no", 0.26, 0.6)]
    assert select(pts, 0.10).chosen.id == "ok"
    # a negative reference still gives a threshold below it
    assert threshold(-0.2, 0.1) == pytest.approx(-0.22)


def test_stsb_scores_and_latency_tie_break():
    pts = [P("ref", 0.85, 0.0, 10), P("slow", 0.84, 0.4, 9), P("fast", 0.845, 0.4, 7)]
    s = select(pts, 0.02)
    assert s.chosen.id == "fast"
    assert select(pts, 0.02, select_by="latency").chosen.id == "fast"
    pts2 = [P("ref", 0.85, 0.0, 10), P("sparse", 0.84, 0.5, 8), P("quick", 0.84, 0.4, 6)]
    assert select(pts2, 0.02).chosen.id == "sparse"
    assert select(pts2, 0.02, select_by="latency").chosen.id == "quick"


@pytest.mark.parametrize("budget", [-0.1, 1.5, float("nan")])
def test_bad_budgets(budget):
    with pytest.raises(ValueError, match="out of range"):
        select([P("a", 1, 0)], budget)


def test_selection_states_its_rule():
    d = select([P("a", 0.9, 0.0), P("b", 0.89, 0.2)], 0.02).to_dict()
    assert "reference - budget*|reference|" in d["rule"] and d["chosen"]["id"] == "b"
