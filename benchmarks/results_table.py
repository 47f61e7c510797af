"""The comparison table of docs/RESULTS.md: every method on the GLUE tasks that have train and
validation data here, the embedded MiniLM, data-limited, several seeds.

    python benchmarks/results_table.py --jsonl runs/results.jsonl            # resumable: done runs are skipped
    python benchmarks/results_table.py --jsonl runs/results.jsonl --table-only

Runs are single-threaded by default so that one process per core can share the JSONL, each with its
own ``--tasks`` (docs/RESULTS.md gives the two commands used for the table). Rows remember their
settings (train size, eval size, epochs, max length); rows made with other settings are ignored.

Each baseline runs once per task and seed with its reference configuration (tune/space.py). FineGates
runs once per lambda in ``--lambdas`` (lambda 0 = its dense point); its rows are then chosen per task
and seed by the sweep's selector (tune.pareto.select) at each budget, plus its best dense point.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from tune.pareto import Point, select

TASKS = "cola,sst2,mrpc,stsb,mnli,qnli,rte,wnli"  # QQP has no validation split here
BASELINES = "finegates-lora,lora,gift-sw,sparta,propulsion,bitfit,full"
STRICT = ("head_lr",)  # settings a row must carry itself (rows made before the setting existed lack it)


def run_all(a: argparse.Namespace, out: Path) -> None:
    from finegates.train import run
    from tune.space import get_space
    from tune.trial import trial_config

    setting = settings(a)
    done = {(r["task"], r["method"], r["seed"], r.get("lam")) for r in load(out, setting)}
    jobs = []
    for task in a.tasks.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            for lam in lambdas(a):
                # the table's FineGates rows are the paper penalty as measured then (docs/RESULTS.md)
                jobs.append((task, "finegates", seed, lam, {"lam": lam, "penalty": "paper", "gate_init": "saturated",
                                                            "warmup_frac": 0.0, "recovery_frac": 0.0}))
            for m in [m for m in a.methods.split(",") if m.strip()]:
                jobs.append((task, m, seed, None, dict(get_space(m).reference)))
    train = dict(setting, threads=a.threads, latency_repeats=a.latency_repeats)
    for task, method, seed, lam, params in jobs:
        if (task, method, seed, lam) in done:
            continue
        # the sweep's own mapping of a trial's params onto TrainConfig (method options go to ``extra``)
        r = run(trial_config({"task": task, "method": method, "seed": seed, **params}, {"train": train}, None))
        row = {k: r[k] for k in ("task", "method", "score", "sparsity", "speedup", "params_trainable", "params_total",
                                 "latency_ms", "n_train", "n_eval", "train_time_s")}
        row |= {"seed": seed, "lam": lam, "threads": a.threads} | setting
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def lambdas(a: argparse.Namespace) -> list[float]:
    return [float(x) for x in a.lambdas.split(",") if x.strip()]  # "" = no gates-only FineGates runs


def settings(a: argparse.Namespace) -> dict:
    """What makes rows comparable: rows of a JSONL made with other settings are neither reused nor tabled.
    ``head_lr`` (one head learning rate for every method) is a setting only when given."""
    out = {"max_train": a.max_train, "max_eval": a.max_eval, "epochs": a.epochs, "max_length": a.max_length}
    if getattr(a, "head_lr", None) is not None:
        out["head_lr"] = a.head_lr
    return out


def load(path: Path, setting: dict) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return [r for r in rows if all(r.get(k, None if k in STRICT else v) == v for k, v in setting.items())
            and all(r.get(k) is None for k in STRICT if k not in setting)]


def rows_by_label(rows: list[dict], budgets: list[float], lambdas: list[float]) -> dict[tuple[str, str], list[dict]]:
    """(row label, task) -> records: baselines as they are; FineGates per lambda and as the selector picks them."""
    by = defaultdict(list)
    fg = defaultdict(list)
    for r in rows:
        if r["method"] != "finegates":
            by[(r["method"], r["task"])].append(r)
        elif r["lam"] in lambdas:
            fg[(r["task"], r["seed"])].append(r)
    for (task, seed), rs in fg.items():
        pts = [Point(str(i), x["score"], x["sparsity"], x["latency_ms"], info=x) for i, x in enumerate(rs)]
        for x in rs:
            by[(f"finegates, lambda {x['lam']:g}", task)].append(x)
        dense = [x for x in rs if x["lam"] == 0]
        if dense:
            by[("finegates, dense point (lambda 0)", task)].append(max(dense, key=lambda x: x["score"]))
        for b in budgets:
            by[(f"finegates, selector at budget {b:g}", task)].append(select(pts, b).chosen.info)
    return by


def table(rows: list[dict], budgets: list[float], lambdas: list[float]) -> str:
    """The table of docs/RESULTS.md: score per task (mean ± std over seeds), average, trainable params,
    exported sparsity and CPU speedup (means over tasks and seeds)."""
    by = rows_by_label(rows, budgets, lambdas)
    labels = sorted({k[0] for k in by if ", lambda " not in k[0]}, key=lambda s: (not s.startswith("finegates"), s))
    tasks = sorted({k[1] for k in by})
    head = ["method", *tasks, "average", "trainable params", "exported sparsity", "CPU speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in labels:
        cells, avgs, sp, su, tp = [], [], [], [], []
        for t in tasks:
            xs = by.get((lab, t), [])
            if not xs:
                cells.append("-")
                continue
            sc = [x["score"] for x in xs]
            m = statistics.mean(sc)
            avgs.append(m)
            cells.append(f"{m:.3f} ± {statistics.stdev(sc):.3f}" if len(sc) > 1 else f"{m:.3f}")
            sp += [x["sparsity"] for x in xs]
            su += [x["speedup"] for x in xs]
            tp += [(x["params_trainable"], x["params_total"]) for x in xs]
        avg = statistics.mean(avgs) if avgs else math.nan
        n, tot = tp[0] if tp else (0, 1)
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {avg:.3f} | {n:,} ({100 * n / tot:.2f}%) | "
                     f"{statistics.mean(sp):.1%} | {statistics.mean(su):.2f}x |")
    return "\n".join(lines)


def compression_table(rows: list[dict], budgets: list[float], lambdas: list[float]) -> str:
    """FineGates per task: score, exported sparsity and CPU speedup of each lambda and of each selector pick."""
    by = rows_by_label(rows, budgets, lambdas)
    labels = [f"finegates, lambda {x:g}" for x in lambdas] + [f"finegates, selector at budget {b:g}" for b in budgets]
    tasks = sorted({k[1] for k in by})
    lines = ["| FineGates | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for lab in labels:
        cells = []
        for t in tasks:
            xs = by.get((lab, t), [])
            cells.append(f"{statistics.mean(x['score'] for x in xs):.3f} / {statistics.mean(x['sparsity'] for x in xs):.0%}"
                         f" / {statistics.mean(x['speedup'] for x in xs):.2f}x" if xs else "-")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trivial_scores(tasks: list[str]) -> str:
    """Score of always predicting the majority class on each task's whole validation split (the level
    below which a cell says that nothing was learned). STS-B has none: a constant has no correlation."""
    import numpy as np

    from tasks import get_task
    from tasks.data import load_split
    from tasks.metrics import compute_metrics

    cells = []
    for name in tasks:
        task = get_task(name)
        if task.num_labels == 1:
            cells.append("-")
            continue
        labels = load_split(task, task.validation_split).label.to_numpy()
        majority = np.bincount(labels).argmax()
        cells.append(f"{compute_metrics(task, np.full_like(labels, majority), labels)['score']:.3f}")
    return "| majority class | " + " | ".join(cells) + " |"


def training_cost(rows: list[dict]) -> str:
    """Per method: the sum over tasks of the mean train seconds of its runs, and that relative to LoRA."""
    secs = defaultdict(list)
    for r in rows:
        secs[(r["method"], r["task"])].append(r["train_time_s"])
    tasks = sorted({t for _, t in secs})
    total = {m: sum(statistics.mean(secs[(m, t)]) for t in tasks if secs.get((m, t)))
             for m in sorted({m for m, _ in secs})}
    lines = ["| method | train seconds (sum over tasks of the mean per run) | vs LoRA |", "|---|---:|---:|"]
    for m, v in total.items():
        rel = f"{v / total['lora']:.2f}x" if total.get("lora") else "-"
        lines.append(f"| {m} | {v:.0f} | {rel} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--methods", default=BASELINES)
    p.add_argument("--lambdas", default="0,10,30")
    p.add_argument("--seeds", default="1948,1,2")
    p.add_argument("--budgets", default="0.01,0.02")
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-eval", type=lambda s: None if s == "all" else int(s), default=500,
                   help="validation subset per task and seed; 'all' for the whole split")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--head-lr", type=float, default=None,
                   help="one learning rate for the classification head of every method (default: each method's lr)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-repeats", type=int, default=3)
    p.add_argument("--jsonl", default="runs/results.jsonl")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args()
    out = Path(a.jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    from finegates.config import ConfigError
    from tasks import TaskError

    if not a.table_only:
        try:
            run_all(a, out)
        except (TaskError, ConfigError, ValueError) as e:  # unknown task or method, missing data: rows so far are kept
            raise SystemExit(f"error: {e}") from None
    rows, budgets = load(out, settings(a)), [float(b) for b in a.budgets.split(",")]
    if not rows:
        raise SystemExit(f"no rows with settings {settings(a)} in {out}; run without --table-only to make them")
    print(table(rows, budgets, lambdas(a)))
    print("\nFineGates per task (score / exported sparsity / CPU speedup, means over seeds):\n")
    print(compression_table(rows, budgets, lambdas(a)))
    tasks = sorted({r["task"] for r in rows})
    print("\nTrivial predictor on the whole validation splits:\n")
    print("| predictor | " + " | ".join(tasks) + " |\n|" + "---|" * (len(tasks) + 1))
    try:
        print(trivial_scores(tasks))
        missing = None
    except TaskError as e:
        missing = e
    print("\nTraining cost (all FineGates lambdas pooled under finegates):\n")
    print(training_cost(rows))
    if missing:
        raise SystemExit(f"error: no majority-class row: {missing}")


if __name__ == "__main__":
    main()
