"""Sweep overhead: wall time of a whole ``tune.run`` against the sum of its trials' own time.

Runs the sweep given after ``--`` in a subprocess (run it inside a loopback-only namespace), then reads
each trial's Ray ``time_total_s`` (the trial function's own time: data, training, export, timing,
MLflow logging) and ``train_time_s`` (data + training loop only) from the MLflow store.

    unshare -n sh -c 'ip link set lo up; python benchmarks/sweep_overhead.py -- --tasks sst2 \\
        --trials-per-task 4 --max-train 600 --epochs 2 --experiment overhead --mlflow-uri sqlite:////tmp/o/m.db \\
        --storage /tmp/o/ray --out /tmp/o/out'
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    argv = sys.argv[1:]
    args = argv[argv.index("--") + 1:] if "--" in argv else argv
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tune.run", *args, "--verbose", "0"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])
    get = lambda name: args[args.index(name) + 1]  # noqa: E731
    storage, experiment = Path(get("--storage")), get("--experiment")
    trial_total, train = 0.0, 0.0
    n = 0
    for res in sorted((storage / experiment).glob("*/result.json")):
        rows = [json.loads(line) for line in res.read_text().splitlines() if line.strip()]
        final = [x for x in rows if x.get("final")]
        if final:
            trial_total += final[-1]["time_total_s"]
            train += final[-1].get("train_time_s", 0.0)
            n += 1
    print("| trials | sweep wall s | sum of trial time s | overhead vs trial time | sum of train loop s |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {n} | {wall:.0f} | {trial_total:.0f} | {wall / trial_total - 1:.1%} | {train:.0f} |")
    print("\nsweep output:\n" + r.stdout[-1500:])


if __name__ == "__main__":
    main()
