import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tasks import compute_metrics, get_task

rng = np.random.default_rng(0)
Y2 = rng.integers(0, 2, 200)
P2 = np.where(rng.random(200) < 0.8, Y2, 1 - Y2)


def test_cola_score_is_mcc():
    m = compute_metrics(get_task("cola"), P2, Y2)
    assert m["score"] == pytest.approx(matthews_corrcoef(Y2, P2))
    assert m["accuracy"] == pytest.approx(accuracy_score(Y2, P2))


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_accuracy_tasks_average_both(task):
    m = compute_metrics(get_task(task), P2, Y2)
    assert m["f1"] == pytest.approx(f1_score(Y2, P2))
    assert m["score"] == pytest.approx((f1_score(Y2, P2) + accuracy_score(Y2, P2)) / 2)


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task):
    assert compute_metrics(get_task(task), P2, Y2)["score"] == pytest.approx(accuracy_score(Y2, P2))


def test_mnli_three_classes():
    y = rng.integers(0, 3, 100)
    p = np.where(rng.random(100) < 0.5, y, (y + 1) % 3)
    assert compute_metrics(get_task("mnli"), p, y)["score"] == pytest.approx(accuracy_score(y, p))


def test_stsb_mean_of_pearson_spearman():
    y = rng.random(300) * 5
    p = y + rng.normal(0, 1, 300)
    m = compute_metrics(get_task("stsb"), p, y)
    assert m["pearson"] == pytest.approx(pearsonr(p, y)[0])
    assert m["spearman"] == pytest.approx(spearmanr(p, y)[0])
    assert m["score"] == pytest.approx((m["pearson"] + m["spearman"]) / 2)


def test_stsb_constant_predictions_score_zero_not_nan():
    m = compute_metrics(get_task("stsb"), np.full(10, 2.5), rng.random(10))
    assert m["score"] == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(get_task("sst2"), np.zeros(3), np.zeros(4))


def test_docstring_example_runs():
    import doctest

    import tasks.metrics

    assert doctest.testmod(tasks.metrics).failed == 0
