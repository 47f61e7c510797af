"""Does a pick's held-out score fall inside the interval of its selection score? (issue 11's goal: in
>= 90% of picks). Measured on real predictions, without retraining anything.

    python benchmarks/compression_frontier.py ... --predictions-dir runs/preds        # whole-validation predictions
    python benchmarks/heldout_coverage.py runs/preds [--splits 20] [--report-frac 0.5] [--budgets 0.01,0.02,0.05]

The frontier's runs are scored on whole validation sets, and ``--predictions-dir`` keeps each run's
predictions (``<task>-<config>-<seed>.npz``). The runs of one task and seed share their examples, so
they stand for the trials of one sweep. For each of ``--splits`` split seeds, this script does what a
sweep does with its evaluation set (docs/SELECTION.md):

1. it splits the examples into a selection part and a report part, seeded and stratified
   (``tasks.data.split_eval``, the sweep's own split);
2. on the selection part it computes each run's score and 95% bootstrap interval, and applies the
   selector: the guard on the reference (the best run), then the paired rule at each budget
   (``tune.stats``, ``tune.pareto.select``);
3. it scores the pick once on the report part.

It prints, per task, how often the report score lies inside the selection interval, and inside the
prediction interval (``tune.stats.prediction_interval``: where the report score should fall given the
selection score and the sizes of the two parts; selection.json's ``report_prediction_interval``). It gives
this for the picks, which carry the winner's curse, and for every run, which does not.
The split seeds are not independent draws of data, since every split reuses the same validation set.
Read the spread across tasks and seeds, not only the pooled figure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def load_groups(folder: Path) -> dict[tuple[str, int], dict[str, dict[str, np.ndarray]]]:
    """(task, seed) -> config -> {predictions, labels}, from ``<task>-<config>-<seed>.npz`` files."""
    groups: dict[tuple[str, int], dict[str, dict[str, np.ndarray]]] = defaultdict(dict)
    for f in sorted(folder.glob("*.npz")):
        task, rest = f.stem.split("-", 1)
        config, seed = rest.rsplit("-", 1)
        with np.load(f) as z:
            groups[(task, int(seed))][config] = {"predictions": z["predictions"], "labels": z["labels"]}
    return groups


def trusted_picks(runs: dict[str, dict[str, np.ndarray]], task_name: str, split_seed: int, report_frac: float,
                  budgets: list[float], resamples: int = 1000, sparsity: dict[str, float] | None = None) -> dict:
    """The sweep's trusted selection over ``runs`` (config -> predictions and labels on the same examples):
    split them into a selection and a report part (``tasks.data.split_eval``), score each run on the selection
    part with its 95% bootstrap interval, check the reference (the best) against the trivial predictor (the
    guard), pick per budget with the paired rule, and score each run once on the report part.

    ``sparsity``: config -> exported sparsity (default: the target a config's name gives, ``fg-40-kd`` 0.4).
    Returns {"learned", "guard", "interval": {config: Interval}, "prediction": {config: Interval},
    "report": {config: score}, "report_trivial": score, "picks": {budget: config or None}}; ``prediction`` is
    where the report score should fall (``tune.stats.prediction_interval``); a pick is registered by a sweep
    only if its report score is above ``report_trivial``, the trivial predictor's on the report part."""
    from tasks import compute_metrics, get_task, trivial_score
    from tasks.data import split_eval
    from tune.pareto import Point, select
    from tune.stats import Bootstrap, prediction_interval

    task = get_task(task_name)
    labels = next(iter(runs.values()))["labels"]
    if any(not np.array_equal(r["labels"], labels) for r in runs.values()):
        raise SystemExit(f"error: {task_name}: the runs were not scored on the same examples; accepted: runs of "
                         "one protocol and seed")
    sel, rep = split_eval(task, labels, report_frac, split_seed)
    bs = Bootstrap(task, labels[sel], n_resamples=resamples)
    scores = {c: bs.scores(r["predictions"][sel]) for c, r in runs.items()}
    intervals = {c: bs.interval(r["predictions"][sel]) for c, r in runs.items()}
    prediction = {c: prediction_interval(scores[c], intervals[c].estimate, len(sel), len(rep)) for c in runs}
    report = {c: float(compute_metrics(task, r["predictions"][rep], labels[rep])["score"]) for c, r in runs.items()}
    points = [Point(c, intervals[c].estimate, (sparsity or {}).get(c, _target(c))) for c in runs]
    ref = max(points, key=lambda p: (p.score, p.sparsity))
    guard = bs.guard(runs[ref.id]["predictions"][sel], scores=scores[ref.id])
    picks: dict[float, str | None] = {}
    if guard.learned:
        diff_low = {c: bs.difference(runs[c]["predictions"][sel], runs[ref.id]["predictions"][sel], scores[c],
                                     scores[ref.id]).low for c in runs}
        for b in budgets:
            chosen = select(points, b, rule="paired", diff_low=diff_low).chosen
            picks[b] = None if chosen is None else chosen.id
    return {"learned": bool(guard.learned), "guard": guard, "interval": intervals, "prediction": prediction,
            "report": report, "report_trivial": float(trivial_score(task, labels[rep])), "picks": picks}


def coverage(runs: dict[str, dict[str, np.ndarray]], task_name: str, split_seed: int, report_frac: float,
             budgets: list[float], resamples: int
             ) -> tuple[list[tuple[bool, bool]], list[tuple[float, str, bool, bool]], bool]:
    """One split of one (task, seed): ((report inside the selection interval, inside the prediction interval)
    per run), ((budget, pick, inside the selection interval, inside the prediction interval) per budget with
    a pick), learned (the reference passes the guard)."""
    t = trusted_picks(runs, task_name, split_seed, report_frac, budgets, resamples)
    inside = {c: (t["interval"][c].low <= t["report"][c] <= t["interval"][c].high,
                  t["prediction"][c].low <= t["report"][c] <= t["prediction"][c].high) for c in runs}
    picks = [(b, c, *inside[c]) for b, c in t["picks"].items() if c is not None]
    return [inside[c] for c in runs], picks, t["learned"]


def parse_budgets(spec: str) -> list[float] | None:
    """``--budgets`` as numbers in [0, 1]; None, after one error line on stderr, when it is not that."""
    try:
        budgets = [float(b) for b in spec.split(",") if b.strip()]
    except ValueError:
        budgets = []
    if not budgets or not all(0 <= b <= 1 for b in budgets):
        print(f"error: --budgets {spec!r} is invalid; accepted: comma-separated numbers in [0, 1]", file=sys.stderr)
        return None
    return budgets


def _rate(flags: list[tuple[bool, ...]], i: int, spec: str = ".0%") -> str:
    """``share (k/n)`` of the rows whose ``i``-th flag is set."""
    k = sum(1 for f in flags if f[i])
    return f"{k / len(flags):{spec}} ({k}/{len(flags)})"


def _target(config: str) -> float:
    for part in config.split("-"):
        if part.isdigit():
            return int(part) / 100
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("predictions", help="folder of <task>-<config>-<seed>.npz (compression_frontier --predictions-dir)")
    p.add_argument("--splits", type=int, default=20, help="split seeds per task and seed")
    p.add_argument("--report-frac", type=float, default=0.5)
    p.add_argument("--budgets", default="0.01,0.02,0.05")
    p.add_argument("--resamples", type=int, default=1000)
    a = p.parse_args(argv)
    folder = Path(a.predictions)
    if not folder.is_dir() or not any(folder.glob("*.npz")):
        print(f"error: {a.predictions!r} holds no <task>-<config>-<seed>.npz; accepted: a --predictions-dir of "
              "benchmarks/compression_frontier.py", file=sys.stderr)
        return 2
    if a.splits < 1:
        print(f"error: --splits {a.splits} is invalid; accepted: an integer >= 1", file=sys.stderr)
        return 2
    if not 0 < a.report_frac < 1:
        print(f"error: --report-frac {a.report_frac} is invalid; accepted: a number in (0, 1)", file=sys.stderr)
        return 2
    budgets = parse_budgets(a.budgets)
    if budgets is None:
        return 2
    groups = load_groups(folder)
    print(f"{len(groups)} task x seed groups from {folder}; {a.splits} split seeds each, report fraction "
          f"{a.report_frac:g}, 95% bootstrap intervals ({a.resamples} resamples), budgets {a.budgets}")
    print("| task | seed | runs | examples | learned (of splits) | every run: report inside (prediction interval) "
          "| picks | picks: report inside (prediction interval) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    all_runs, all_picks, per_group = [], [], []
    for (task, seed), runs in sorted(groups.items()):
        ins, pk, n_learned = [], [], 0
        for k in range(a.splits):
            i, picks, learned = coverage(runs, task, k, a.report_frac, budgets, a.resamples)
            ins += i
            pk += [x[2:] for x in picks]
            n_learned += learned
        all_runs += ins
        all_picks += pk
        if pk:
            per_group.append(sum(x[0] for x in pk) / len(pk))
        n = len(next(iter(runs.values()))["labels"])
        pick_cell = f"{_rate(pk, 0)} ({_rate(pk, 1)})" if pk else "-"
        print(f"| {task} | {seed} | {len(runs)} | {n} | {n_learned}/{a.splits} | {_rate(ins, 0)} ({_rate(ins, 1)}) "
              f"| {len(pk)} | {pick_cell} |")
    if all_runs:
        print(f"\nevery run: report score inside its selection interval in {_rate(all_runs, 0, '.1%')}, inside its "
              f"prediction interval in {_rate(all_runs, 1, '.1%')}")
    if all_picks:
        spread = (f"; per task and seed {min(per_group):.0%}-{max(per_group):.0%}, median "
                  f"{statistics.median(per_group):.0%}" if len(per_group) > 1 else "")
        print(f"picks: report score inside its selection interval in {_rate(all_picks, 0, '.1%')}{spread}; inside its "
              f"prediction interval in {_rate(all_picks, 1, '.1%')}")
    else:
        print("picks: none (no task and seed passed the guard)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
