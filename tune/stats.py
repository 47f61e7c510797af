"""Bootstrap statistics over evaluation examples: score intervals, paired differences, the trivial guard.

Pure numpy on per-example predictions (no MLflow, no Ray). Every statistic resamples the evaluation
examples with replacement and recomputes the task's own metric (accuracy, MCC, F1 + accuracy,
Pearson + Spearman) on each resample, so intervals of MCC, F1 and correlations are right, not a
normal approximation of accuracy. A :class:`Bootstrap` draws the same resamples (same seed, same
number of examples) for every model it is given: differences of two models are paired, example by
example.

>>> import numpy as np
>>> from tasks import get_task
>>> labels = np.array([0, 1] * 200)
>>> bs = Bootstrap(get_task("sst2"), labels, n_resamples=200, seed=0)
>>> ci = bs.interval(labels)                      # a perfect model: every resample scores 1
>>> (ci.estimate, ci.low, ci.high)
(1.0, 1.0, 1.0)
>>> bs.guard(labels).learned, bs.guard(np.zeros_like(labels)).learned
(True, False)

See docs/SELECTION.md for how the selector uses them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Iterator

import numpy as np
from scipy.stats import rankdata

from tasks import TaskSpec, compute_metrics, trivial_predictions

RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95
GUARD_Z = 2.0  # a model has learned when (its score - the trivial score) > GUARD_Z standard errors
MIN_RESAMPLES = 100
_CHUNK_ELEMENTS = 2_000_000  # resample indices held at once (int32): ~8 MB, whatever the eval set size


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass(frozen=True)
class Difference(Interval):
    """``a - b`` on the same examples: estimate, percentile interval, and the bootstrap standard error."""

    se: float = 0.0


@dataclass(frozen=True)
class Guard:
    """Whether a model clearly beats the trivial predictor (majority class / constant mean).

    ``learned`` is None when nothing could be checked (no predictions and no recorded trivial score or
    evaluation size). ``method``: ``bootstrap`` (paired, per example), ``fallback`` (from recorded
    numbers only, SE bound 1/sqrt(n)) or ``none``.
    """

    learned: bool | None
    score: float
    trivial: float
    difference: float
    se: float
    z: float
    n: int
    method: str
    reason: str

    @property
    def margin(self) -> float:
        return self.z * self.se

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"margin": self.margin}


def check_resamples(n_resamples: int) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < MIN_RESAMPLES:
        raise ValueError(f"resamples {n_resamples!r} is invalid; accepted: an integer >= {MIN_RESAMPLES}")


def check_confidence(confidence: float) -> None:
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence!r} is invalid; accepted: a number in (0, 1), e.g. 0.95")


def percentile_interval(values: np.ndarray, estimate: float, confidence: float = CONFIDENCE) -> Interval:
    check_confidence(confidence)
    alpha = (1 - confidence) / 2
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [100 * alpha, 100 * (1 - alpha)])
    return Interval(float(estimate), float(low), float(high), confidence)


def prediction_interval(scores: np.ndarray, estimate: float, n_selection: int, n_report: int,
                        confidence: float = CONFIDENCE) -> Interval:
    """Where the same model should score on ``n_report`` other examples, given ``estimate`` on ``n_selection``
    examples and its bootstrap ``scores`` there: ``estimate +- z se sqrt(1 + n_selection / n_report)``, ``se``
    the bootstrap standard error.

    Two independent estimates of one score differ by ``sqrt(se_sel^2 + se_rep^2)``, and ``se_rep`` is about
    ``se_sel sqrt(n_sel / n_rep)`` for a score that averages over examples (an approximation for MCC, F1 and
    correlations). The confidence interval of the selection score holds an unbiased model's report score
    only ``P(|Z| < z / sqrt(1 + n_sel / n_rep))`` of the time (83% at equal parts); this interval holds it
    ``confidence`` of the time. A pick whose report score falls outside it did worse (or better) on new
    examples than its selection score's noise explains: the winner's curse, or a split that differs.
    """
    check_confidence(confidence)
    if n_selection < 1 or n_report < 1:
        raise ValueError(f"n_selection={n_selection}, n_report={n_report} are invalid; accepted: integers >= 1")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * float(np.std(np.asarray(scores, dtype=np.float64), ddof=1)) * math.sqrt(1 + n_selection / n_report)
    return Interval(float(estimate), float(estimate) - half, float(estimate) + half, confidence)


class Bootstrap:
    """Seeded bootstrap over the evaluation examples of one task (one label vector).

    Every call resamples the same example indices (they depend only on ``seed``, ``n_resamples`` and
    the number of examples), so ``scores(a) - scores(b)`` is the paired bootstrap distribution of
    ``score(a) - score(b)``.
    """

    def __init__(self, task: TaskSpec, labels: np.ndarray, n_resamples: int = RESAMPLES, seed: int = SEED,
                 confidence: float = CONFIDENCE) -> None:
        check_resamples(n_resamples)
        check_confidence(confidence)
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size < 2:
            raise ValueError(f"labels of shape {labels.shape} cannot be bootstrapped; accepted: a 1-D array of >= 2 "
                             "evaluation labels")
        self.task, self.labels, self.n_resamples, self.seed, self.confidence = task, labels, int(n_resamples), int(
            seed), confidence
        self.n = labels.size
        self._cached: list[np.ndarray] | None = None
        self._trivial_scores: np.ndarray | None = None
        if self.n * self.n_resamples <= 4 * _CHUNK_ELEMENTS:
            self._cached = list(self._draw())

    # ---- resamples
    def _draw(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        per = max(1, _CHUNK_ELEMENTS // self.n)
        done = 0
        while done < self.n_resamples:
            b = min(per, self.n_resamples - done)
            yield rng.integers(0, self.n, size=(b, self.n), dtype=np.int32)
            done += b

    def _chunks(self) -> Iterator[np.ndarray]:
        return iter(self._cached) if self._cached is not None else self._draw()

    # ---- statistics
    def _check(self, predictions: np.ndarray) -> np.ndarray:
        p = np.asarray(predictions)
        if p.shape != self.labels.shape:
            raise ValueError(f"predictions shape {p.shape} != labels shape {self.labels.shape}")
        return p

    def point(self, predictions: np.ndarray) -> float:
        """The task's score on all examples (tasks.compute_metrics)."""
        return float(compute_metrics(self.task, self._check(predictions), self.labels)["score"])

    def scores(self, predictions: np.ndarray) -> np.ndarray:
        """The task's score on each resample: shape (n_resamples,)."""
        p = self._check(predictions)
        return np.concatenate([_resample_scores(self.task, p, self.labels, idx) for idx in self._chunks()])

    def interval(self, predictions: np.ndarray) -> Interval:
        return percentile_interval(self.scores(predictions), self.point(predictions), self.confidence)

    def difference(self, a: np.ndarray, b: np.ndarray, scores_a: np.ndarray | None = None,
                   scores_b: np.ndarray | None = None) -> Difference:
        """``score(a) - score(b)`` paired on the same resamples (pass cached ``scores`` to skip recomputing)."""
        sa = self.scores(a) if scores_a is None else scores_a
        sb = self.scores(b) if scores_b is None else scores_b
        d = sa - sb
        ci = percentile_interval(d, self.point(a) - self.point(b), self.confidence)
        return Difference(ci.estimate, ci.low, ci.high, ci.confidence, float(d.std(ddof=1)))

    def trivial(self) -> np.ndarray:
        return trivial_predictions(self.task, self.labels)

    def guard(self, predictions: np.ndarray, z: float = GUARD_Z, scores: np.ndarray | None = None) -> Guard:
        """Learned iff score - trivial score > z standard errors of that paired difference (and > 0)."""
        triv = self.trivial()
        if self._trivial_scores is None:
            self._trivial_scores = self.scores(triv)
        d = self.difference(predictions, triv, scores_a=scores, scores_b=self._trivial_scores)
        learned = d.estimate > 0 and d.estimate > z * d.se
        score, trivial = self.point(predictions), self.point(triv)
        verdict = "clearly above" if learned else "not clearly above"
        reason = (f"{score:.4f} vs trivial {trivial:.4f}: {d.estimate:+.4f} {'>' if learned else '<='} {z:g} SE = "
                  f"{z * d.se:.4f} ({verdict} the trivial predictor; paired bootstrap, {self.n_resamples} resamples "
                  f"of {self.n} examples)")
        return Guard(bool(learned), score, trivial, d.estimate, d.se, z, self.n, "bootstrap", reason)


def fallback_guard(score: float | None, trivial: float | None, n_eval: float | None, task: TaskSpec,
                   z: float = GUARD_Z) -> Guard:
    """The guard without predictions, from the recorded numbers only.

    SE bound: 1/sqrt(n). For accuracy it is an upper bound on the SE of a paired difference (each example
    contributes a difference in [-1, 1], variance <= 1); for MCC and correlations it is their standard
    error when nothing was learned. A missing trivial score is 0 for MCC and correlation tasks (constant
    predictions score 0); for the others nothing can be checked (``learned=None``).
    """
    if trivial is None and (task.primary == "mcc" or task.is_regression):
        trivial = 0.0
    missing = [name for name, v in (("score", score), ("trivial_score", trivial), ("n_eval", n_eval)) if v is None]
    if missing or n_eval < 2:
        what = ", ".join(missing) if missing else f"n_eval >= 2 (got {n_eval:g})"
        return Guard(None, math.nan if score is None else float(score), math.nan if trivial is None else float(trivial),
                     math.nan, math.nan, z, int(n_eval or 0), "none",
                     f"cannot check against the trivial predictor: no eval predictions and no {what} recorded "
                     "(a run from before they were recorded)")
    n = int(n_eval)
    se = 1 / math.sqrt(n)
    diff = float(score) - float(trivial)
    learned = diff > 0 and diff > z * se
    reason = (f"{score:.4f} vs trivial {trivial:.4f}: {diff:+.4f} {'>' if learned else '<='} {z:g} SE = {z * se:.4f} "
              f"(no eval predictions: SE bound 1/sqrt(n) with n = {n} recorded examples)")
    return Guard(bool(learned), float(score), float(trivial), diff, se, z, n, "fallback", reason)


# ---------------------------------------------------------------------------------------------------
# the task metrics, one value per resample (vectorised; they equal tasks.compute_metrics on each resample)

def _resample_scores(task: TaskSpec, p: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    if task.is_regression:
        return _pearson_spearman(p.astype(np.float64)[idx], y.astype(np.float64)[idx])
    if task.primary == "accuracy":
        return (p == y)[idx].mean(axis=1)
    if task.primary == "mcc":
        return _mcc(p, y, idx)
    if task.primary == "f1_accuracy":
        acc = (p == y)[idx].mean(axis=1)
        tp = ((p == 1) & (y == 1))[idx].sum(axis=1)
        denom = (p == 1)[idx].sum(axis=1) + (y == 1)[idx].sum(axis=1)
        f1 = np.divide(2.0 * tp, denom, out=np.zeros(len(idx)), where=denom > 0)
        return (f1 + acc) / 2
    # a metric without a vectorised form: the task's own function per resample
    return np.array([compute_metrics(task, p[i], y[i])["score"] for i in idx], dtype=np.float64)


def _mcc(p: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Multiclass MCC as sklearn computes it (0 where undefined)."""
    n = float(idx.shape[1])
    correct = (p == y)[idx].sum(axis=1).astype(np.float64)
    tp_sum = np.zeros(len(idx))
    pp = np.zeros(len(idx))
    tt = np.zeros(len(idx))
    for k in np.union1d(np.unique(p), np.unique(y)):
        t_k = (y == k)[idx].sum(axis=1).astype(np.float64)
        p_k = (p == k)[idx].sum(axis=1).astype(np.float64)
        tp_sum += t_k * p_k
        pp += p_k * p_k
        tt += t_k * t_k
    cov_ytyp = correct * n - tp_sum
    cov_ypyp = n * n - pp
    cov_ytyt = n * n - tt
    prod = cov_ytyt * cov_ypyp
    return np.divide(cov_ytyp, np.sqrt(prod, where=prod > 0, out=np.ones_like(prod)), out=np.zeros_like(prod),
                     where=prod > 0)


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    r = np.divide((xc * yc).sum(axis=1), den, out=np.zeros(len(x)), where=den > 0)
    return np.clip(r, -1.0, 1.0)


def _pearson_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # tasks.compute_metrics counts constant predictions (np.allclose to the first) as no correlation
    const = np.isclose(x, x[:, :1]).all(axis=1)
    pearson = _rowwise_pearson(x, y)
    spearman = _rowwise_pearson(rankdata(x, axis=1), rankdata(y, axis=1))
    out = (pearson + spearman) / 2
    out[const] = 0.0
    return out


__all__ = ["CONFIDENCE", "GUARD_Z", "MIN_RESAMPLES", "RESAMPLES", "SEED", "Bootstrap", "Difference", "Guard",
           "Interval", "check_confidence", "check_resamples", "fallback_guard", "percentile_interval",
           "prediction_interval"]
