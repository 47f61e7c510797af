"""Bootstrap statistics (tune/stats.py) and the paired rule on plain points (tune/pareto.py). No MLflow."""
import doctest
import math

import numpy as np
import pytest

import tune.stats
from tasks import compute_metrics, get_task, trivial_score
from tune.pareto import Point, select
from tune.stats import Bootstrap, _resample_scores, fallback_guard, prediction_interval

TASKS = ["sst2", "cola", "mrpc", "stsb", "mnli", "qqp"]


def synthetic(task, n, accuracy, seed=0, majority=0.6):
    """Labels with a majority class (or STS-B similarities) and predictions right on ~``accuracy`` of them."""
    rng = np.random.default_rng(seed)
    spec = get_task(task)
    if spec.is_regression:
        y = rng.uniform(0, 5, n).round(1)
        return (y + rng.normal(0, 5 * (1 - accuracy), n)).astype(np.float32), y
    k = spec.num_labels
    probs = [majority] + [(1 - majority) / (k - 1)] * (k - 1)
    y = rng.choice(k, size=n, p=probs)
    wrong = (y + rng.integers(1, k, n)) % k
    return np.where(rng.random(n) < accuracy, y, wrong), y


def test_doctests():
    assert doctest.testmod(tune.stats).failed == 0


@pytest.mark.parametrize("task", TASKS)
def test_vectorised_metric_equals_the_task_metric_on_every_resample(task):
    spec = get_task(task)
    p, y = synthetic(task, 300, 0.75, seed=3)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(y), size=(40, len(y)))
    # a few degenerate resamples: a single example repeated (constant predictions and labels), two examples
    idx[0] = 0
    idx[1] = np.resize([0, 1], len(y))
    got = _resample_scores(spec, p, y, idx)
    want = np.array([compute_metrics(spec, p[i], y[i])["score"] for i in idx])
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("task", ["cola", "stsb", "mrpc"])
def test_constant_predictions_score_like_the_task_metric(task):
    spec = get_task(task)
    _, y = synthetic(task, 200, 0.8)
    const = np.full_like(y, y[0])
    bs = Bootstrap(spec, y, n_resamples=200)
    assert bs.point(const) == pytest.approx(compute_metrics(spec, const, y)["score"])
    if task in ("cola", "stsb"):  # MCC and correlations of constant predictions are 0 on every resample
        assert np.all(bs.scores(const) == 0)


@pytest.mark.parametrize("task", TASKS)
def test_intervals_cover_the_point_estimate_and_shrink_with_more_examples(task):
    widths = []
    for n in (200, 800, 3200):
        p, y = synthetic(task, n, 0.8, seed=n)
        ci = Bootstrap(get_task(task), y, n_resamples=1000, seed=0).interval(p)
        assert ci.low <= ci.estimate <= ci.high
        assert ci.estimate == pytest.approx(compute_metrics(get_task(task), p, y)["score"])
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)  # ~ 1/sqrt(n): 16x the examples, 1/4 the width


def test_bootstrap_is_seeded_and_paired():
    spec = get_task("sst2")
    p, y = synthetic("sst2", 500, 0.85)
    q, _ = synthetic("sst2", 500, 0.8, seed=9)
    a, b = Bootstrap(spec, y, seed=7), Bootstrap(spec, y, seed=7)
    np.testing.assert_array_equal(a.scores(p), b.scores(p))
    assert not np.array_equal(a.scores(p), Bootstrap(spec, y, seed=8).scores(p))
    same = a.difference(p, p.copy())
    assert (same.estimate, same.low, same.high, same.se) == (0.0, 0.0, 0.0, 0.0)
    d = a.difference(p, q)
    assert d.estimate == pytest.approx(a.point(p) - a.point(q))
    np.testing.assert_allclose(a.scores(p) - a.scores(q), a.scores(p) - b.scores(q))  # the same resamples


def test_large_eval_sets_are_resampled_in_chunks_with_the_same_result():
    spec = get_task("qqp")
    p, y = synthetic("qqp", 20000, 0.8)
    big = Bootstrap(spec, y, n_resamples=1000)
    assert big._cached is None  # 20k x 1000 indices are not held at once
    np.testing.assert_array_equal(big.scores(p), big.scores(p))
    ci = big.interval(p)
    assert ci.low < ci.estimate < ci.high and ci.high - ci.low < 0.02


@pytest.mark.parametrize("task", TASKS)
def test_guard_majority_class_is_not_learned_and_a_clear_learner_is(task):
    spec = get_task(task)
    p, y = synthetic(task, 400, 0.9)
    bs = Bootstrap(spec, y)
    chance = bs.trivial()
    g = bs.guard(chance)
    assert g.learned is False and g.difference == 0 and g.trivial == pytest.approx(trivial_score(spec, y))
    assert "not clearly above" in g.reason
    good = bs.guard(p)
    assert good.learned is True and good.difference > good.margin > 0 and good.method == "bootstrap"


def test_guard_near_chance_is_not_learned():
    spec = get_task("rte")
    y = np.array([0] * 150 + [1] * 100)
    p = np.zeros_like(y)  # majority class ...
    p[150:155] = 1  # ... plus 5 right minority guesses
    p[:3] = 1  # ... and 3 wrong ones: +2 examples of 250
    g = Bootstrap(spec, y).guard(p)
    assert g.learned is False and 0 < g.difference < g.margin


def test_fallback_guard_without_predictions():
    sst2, cola, mrpc = get_task("sst2"), get_task("cola"), get_task("mrpc")
    g = fallback_guard(0.60, 0.55, 400, sst2)  # +0.05 <= 2/sqrt(400) = 0.10
    assert g.learned is False and g.method == "fallback" and g.margin == pytest.approx(0.1)
    assert "no eval predictions" in g.reason
    assert fallback_guard(0.80, 0.55, 400, sst2).learned is True
    assert fallback_guard(0.30, None, 400, cola).learned is True  # MCC of constant predictions is 0
    unknown = fallback_guard(0.80, None, 400, mrpc)
    assert unknown.learned is None and unknown.method == "none" and "trivial_score" in unknown.reason
    assert fallback_guard(0.8, 0.5, None, sst2).learned is None


@pytest.mark.parametrize("bad", [0, 5, 99, 1.5, True])
def test_bad_resample_counts(bad):
    with pytest.raises(ValueError, match=r"resamples .* is invalid; accepted: an integer >= 100"):
        Bootstrap(get_task("sst2"), np.array([0, 1, 1]), n_resamples=bad)


# ---- the paired rule on plain points

def P(id, score, sparsity, latency=10.0):
    return Point(id, score, sparsity, latency)


def test_paired_rule_needs_the_lower_bound_within_budget():
    pts = [P("ref", 0.90, 0.0), P("noisy", 0.88, 0.6), P("close", 0.895, 0.3)]
    assert select(pts, 0.05).chosen.id == "noisy"  # plain: 0.88 >= 0.855
    lows = {"noisy": -0.06, "close": -0.03}  # noisy: its interval reaches below -0.045; close: it does not
    s = select(pts, 0.05, rule="paired", diff_low=lows)
    assert s.chosen.id == "close" and s.eligible_ids == ("ref", "close") and "paired bootstrap" in s.rule_text()
    # never more lenient than plain: a trial the point rule rejects stays rejected
    assert select([P("ref", 0.9, 0.0), P("x", 0.80, 0.5)], 0.05, rule="paired", diff_low={"x": 0.0}).chosen.id == "ref"
    # a trial without a paired interval is not eligible; the reference always is
    assert select(pts, 0.05, rule="paired", diff_low={}).chosen.id == "ref"


def test_excluded_points_are_never_eligible():
    pts = [P("ref", 0.90, 0.0), P("chance", 0.60, 0.9), P("ok", 0.85, 0.5)]
    assert select(pts, 0.5).chosen.id == "chance"
    s = select(pts, 0.5, exclude={"chance"})
    assert s.chosen.id == "ok" and s.excluded == 1 and "trivial predictor" in s.rule_text()
    none = select(pts, 0.0, exclude={"ref"})
    assert none.chosen is None and none.eligible == 0 and none.to_dict()["chosen"] is None


def test_bad_rule():
    with pytest.raises(ValueError, match="rule 'nope' is invalid; accepted: paired, plain"):
        select([P("a", 1, 0)], 0.1, rule="nope")
    with pytest.raises(ValueError, match="needs diff_low"):
        select([P("a", 1, 0)], 0.1, rule="paired")


def test_guard_margin_is_two_standard_errors():
    assert tune.stats.GUARD_Z == 2.0 and tune.stats.RESAMPLES == 1000 and tune.stats.CONFIDENCE == 0.95
    spec = get_task("sst2")
    p, y = synthetic("sst2", 300, 0.7)
    g = Bootstrap(spec, y).guard(p, z=3.0)
    assert g.margin == pytest.approx(3 * g.se) and not math.isnan(g.se)


def test_the_pareto_plot_draws_the_trivial_score(tmp_path):
    from tune.report import plot_task, recorded_trivial_score as recorded_trivial

    pts = [Point("a", 0.9, 0.0, 10, info={"trivial_score": 0.55, "speedup": 1.0}),
           Point("b", 0.85, 0.5, 6, info={"trivial_score": 0.55, "speedup": 1.6}), Point("c", 0.8, 0.7, 5)]
    assert recorded_trivial(pts) == 0.55 and recorded_trivial(pts[2:]) is None
    assert plot_task("sst2", pts, [0.02], "relative", tmp_path / "p.png").stat().st_size > 0


def test_the_worked_example_of_docs_selection_md():
    y = np.array([0] * 146 + [1] * 131)  # RTE: the guard
    ref = np.zeros(277, dtype=int)
    ref[146:182] = 1
    ref[:24] = 1
    g = Bootstrap(get_task("rte"), y).guard(ref)
    assert (round(g.score, 4), round(g.trivial, 4), round(g.difference, 4), round(g.margin, 4)) == (
        0.5704, 0.5271, 0.0433, 0.0572) and g.learned is False
    y = np.array([1] * 444 + [0] * 428)  # SST-2: the paired rule at budget 0.02
    ref = y.copy()
    ref[:87] = 1 - ref[:87]
    a, b = ref.copy(), ref.copy()
    a[87:116] = 1 - a[87:116]
    a[:16] = y[:16]
    b[200:203] = 1 - b[200:203]
    b[:2] = y[:2]
    bs = Bootstrap(get_task("sst2"), y)
    da, db = bs.difference(a, ref), bs.difference(b, ref)
    assert (round(da.low, 4), round(db.low, 4)) == (-0.0298, -0.0069)
    pts = [P("ref", bs.point(ref), 0.0), P("A", bs.point(a), 0.6), P("B", bs.point(b), 0.3)]
    assert select(pts, 0.02).chosen.id == "A"
    assert select(pts, 0.02, rule="paired", diff_low={"A": da.low, "B": db.low}).chosen.id == "B"
    assert select(pts, 0.05, rule="paired", diff_low={"A": da.low, "B": db.low}).chosen.id == "A"


def test_prediction_interval_closed_form_for_an_accuracy():
    """Accuracy p on n_sel examples: se = sqrt(p (1 - p) / n_sel); the report score on n_rep others should fall
    within 1.96 se sqrt(1 + n_sel / n_rep)."""
    y = np.array([0, 1] * 200)
    p = y.copy()
    p[:80] = 1 - p[:80]  # 80% correct on 400 examples
    bs = Bootstrap(get_task("sst2"), y, n_resamples=4000, seed=0)
    pi = prediction_interval(bs.scores(p), bs.point(p), 400, 100)
    half = 1.96 * math.sqrt(0.8 * 0.2 / 400) * math.sqrt(1 + 400 / 100)
    assert pi.estimate == pytest.approx(0.8)
    assert pi.low == pytest.approx(0.8 - half, abs=0.004) and pi.high == pytest.approx(0.8 + half, abs=0.004)
    with pytest.raises(ValueError, match="n_report=0 are invalid"):
        prediction_interval(bs.scores(p), 0.8, 400, 0)


def test_an_unbiased_report_score_lands_in_the_prediction_interval_not_always_in_the_confidence_interval():
    """Two independent samples of one model's per-example correctness (equal parts): the report score falls
    in the selection score's 95% interval about 83% of the time, in the prediction interval about 95%."""
    rng = np.random.default_rng(0)
    task, n, trials = get_task("sst2"), 300, 300
    y = np.array([0, 1] * (n // 2))
    in_ci = in_pi = 0
    for _ in range(trials):
        sel = np.where(rng.random(n) < 0.75, y, 1 - y)  # a model right 75% of the time, on two samples
        rep = np.where(rng.random(n) < 0.75, y, 1 - y)
        bs = Bootstrap(task, y, n_resamples=300, seed=int(rng.integers(1 << 30)))
        scores = bs.scores(sel)
        ci, pi = bs.interval(sel), prediction_interval(scores, bs.point(sel), n, n)
        r = compute_metrics(task, rep, y)["score"]
        in_ci += ci.low <= r <= ci.high
        in_pi += pi.low <= r <= pi.high
    assert 0.76 <= in_ci / trials <= 0.89
    assert 0.91 <= in_pi / trials <= 0.98
