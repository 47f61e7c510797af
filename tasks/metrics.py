"""GLUE metrics and the one primary ``score`` per task.

``score``: CoLA MCC, STS-B mean of Pearson and Spearman, MRPC/QQP mean of F1 and accuracy, others
accuracy. Higher is better; MCC and correlations lie in [-1, 1].
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tasks.glue import TaskSpec


def _finite(x: float) -> float:
    x = float(x)
    return 0.0 if math.isnan(x) else x


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of ``predictions`` (class ids, or floats for STS-B) against ``labels``, plus ``score``.

    >>> from tasks.glue import get_task
    >>> m = compute_metrics(get_task("mrpc"), np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    >>> round(m["accuracy"], 3), round(m["f1"], 3), round(m["score"], 3)
    (0.75, 0.667, 0.708)
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions shape {predictions.shape} != labels shape {labels.shape}")
    out: dict[str, float] = {}
    if task.is_regression:
        # Constant predictions make the correlations undefined: count them as 0 (no correlation).
        const = np.allclose(predictions, predictions.flat[0]) if predictions.size else True
        out["pearson"] = 0.0 if const else _finite(pearsonr(predictions, labels)[0])
        out["spearman"] = 0.0 if const else _finite(spearmanr(predictions, labels)[0])
        out["score"] = (out["pearson"] + out["spearman"]) / 2
        return out
    out["accuracy"] = float(accuracy_score(labels, predictions))
    if task.primary == "mcc":
        out["mcc"] = float(matthews_corrcoef(labels, predictions))
        out["score"] = out["mcc"]
    elif task.primary == "f1_accuracy":
        out["f1"] = float(f1_score(labels, predictions, zero_division=0))
        out["score"] = (out["f1"] + out["accuracy"]) / 2
    else:
        out["score"] = out["accuracy"]
    return out


def trivial_predictions(task: TaskSpec, labels: np.ndarray) -> np.ndarray:
    """The trivial predictor on these examples: the most frequent class (ties: the smallest id), or the
    constant mean for regression. Its score is the floor a model must clearly beat to have learned."""
    labels = np.asarray(labels)
    if task.is_regression:
        return np.full(labels.shape, float(labels.mean()) if labels.size else 0.0, dtype=np.float32)
    values, counts = np.unique(labels, return_counts=True)
    return np.full(labels.shape, values[np.argmax(counts)], dtype=labels.dtype)


def trivial_score(task: TaskSpec, labels: np.ndarray) -> float:
    """Score of :func:`trivial_predictions` (majority class / constant mean) on the same examples.

    >>> from tasks.glue import get_task
    >>> trivial_score(get_task("sst2"), np.array([1, 1, 0])), trivial_score(get_task("cola"), np.array([1, 0]))
    (0.6666666666666666, 0.0)
    """
    return compute_metrics(task, trivial_predictions(task, labels), labels)["score"]
