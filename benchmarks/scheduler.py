"""The same sweep with and without the early-stopping scheduler (tune.scheduler), interleaved.

Each repeat runs ``python -m tune.run <sweep args> --scheduler budget`` and ``... --scheduler none`` with the
same seed (so the same trial configurations: Optuna's first trials are seeded random ones), alternating which
goes first, each in its own MLflow store, Ray storage and output folder under ``--work``. Without
``--trials-per-task`` in the sweep args each arm gets tune.run's default for it: on a CPU 5 trials per task
with the scheduler and 3 without (the comparison "more trials in the same time"); give ``--trials-per-task``
to compare the same trials. Then it prints:

* per sweep: wall time, trials run, trials stopped early, trial-epochs trained, and the sum of the trials' own
  time (Ray's ``time_total_s`` of each trial's last result: the compute the trials used);
* per task: what each sweep selected (status, score on the selection part, score on the report part,
  sparsity), so the selections can be compared.

Run it inside a loopback-only namespace (it starts Ray):

    unshare -rn sh -c 'ip link set lo up && python benchmarks/scheduler.py --work /tmp/sched -- \\
        --tasks sst2,mrpc,stsb,qnli --trials-per-task 4'

Rows are also appended to ``<work>/scheduler.jsonl`` as each sweep ends, and the tables are made from every
row there: ``--arms budget --first-repeat 1`` adds one more sweep to an earlier comparison (e.g. after a change
to the scheduler, beside the ``none`` sweep already measured).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ARMS = ("budget", "none")


def run_arm(arm: str, rep: int, work: Path, sweep_args: list[str]) -> dict[str, Any]:
    d = work / f"{arm}-{rep}"
    d.mkdir(parents=True, exist_ok=True)
    experiment = f"sched-{arm}-{rep}"
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "tune.run", *sweep_args, "--scheduler", arm, "--experiment", experiment,
           "--mlflow-uri", uri, "--storage", str(d / "ray"), "--out", str(d / "out"), "--verbose", "0"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
    wall = time.perf_counter() - t0
    (d / "stdout.txt").write_text(r.stdout)
    (d / "stderr.txt").write_text(r.stderr)
    if r.returncode not in (0, 1):  # 1: a task without a finished trial, still measured
        sys.exit(f"{arm} sweep failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    trials, epochs, trial_s = 0, 0, 0.0
    for res in sorted((d / "ray" / experiment).glob("*/result.json")):
        rows = [json.loads(line) for line in res.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        trials += 1
        epochs += len({int(x["epoch"]) for x in rows if not x.get("final") and "epoch" in x})
        trial_s += rows[-1]["time_total_s"]
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    stopped = len(c.search_runs([exp.experiment_id], "tags.`stopped_early` = 'true'")) if exp else 0
    sel_path = d / "out" / "selection" / "selection.json"
    sel = json.loads(sel_path.read_text()) if sel_path.is_file() else []
    rows = sel["rows"] if isinstance(sel, dict) else sel
    picks = {r["task"]: {k: r.get(k) for k in ("status", "reference_score", "score", "report_score", "sparsity",
                                                 "method", "budget")} for r in rows}
    return dict(arm=arm, repeat=rep, exit=r.returncode, wall_s=wall, trials=trials, stopped=stopped,
                trial_epochs=epochs, trial_s=trial_s, picks=picks)


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def main() -> None:
    argv = sys.argv[1:]
    sweep_args = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="folder for the sweeps' stores and outputs")
    p.add_argument("--repeats", type=int, default=1, help="rounds of sweeps (default: 1)")
    p.add_argument("--arms", default=",".join(ARMS), help="schedulers to run each round (default: budget,none)")
    p.add_argument("--first-repeat", type=int, default=0, help="number of the first round (default: 0)")
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    arms = tuple(x.strip() for x in a.arms.split(",") if x.strip())
    if not arms or any(x not in ARMS for x in arms):
        sys.exit(f"error: --arms {a.arms!r} is invalid; accepted: a comma list of {', '.join(ARMS)}")
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for rep in range(a.first_repeat, a.first_repeat + a.repeats):
        for arm in (arms if rep % 2 == 0 else arms[::-1]):
            res = run_arm(arm, rep, work, sweep_args)
            with open(work / "scheduler.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
            print(f"{arm} #{rep}: {res['wall_s']:.0f} s, {res['trials']} trials, {res['stopped']} stopped", flush=True)
    results = [json.loads(line) for line in (work / "scheduler.jsonl").read_text().splitlines() if line.strip()]
    print("\n| scheduler | repeat | wall s | trials | stopped early | trial-epochs | sum of trial time s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['arm']} | {r['repeat']} | {r['wall_s']:.0f} | {r['trials']} | {r['stopped']} | "
              f"{r['trial_epochs']} | {r['trial_s']:.0f} |")
    for b in (r for r in results if r["arm"] == "budget"):
        for n in (r for r in results if r["arm"] == "none"):
            print(f"\nbudget #{b['repeat']} / none #{n['repeat']}: wall {b['wall_s'] / n['wall_s']:.2f}, trial time "
                  f"{b['trial_s'] / n['trial_s']:.2f}, trial-epochs {b['trial_epochs'] / n['trial_epochs']:.2f}")
    print("\n| task | repeat | scheduler | status | reference | chosen (selection part) | report part | sparsity |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    tasks = sorted({t for r in results for t in r["picks"]})
    for t in tasks:
        for r in results:
            pk = r["picks"].get(t, {})
            print(f"| {t} | {r['repeat']} | {r['arm']} | {pk.get('status', '-')} | {_f(pk.get('reference_score'))} | "
                  f"{_f(pk.get('score'))} | {_f(pk.get('report_score'))} | {_f(pk.get('sparsity'), '.1%')} |")


if __name__ == "__main__":
    main()
