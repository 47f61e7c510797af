"""Trial cost: how long a FineGates trial takes beside a LoRA trial on the same task, data and sizes, one run at a
time, in interleaved rounds (issue 9's goal: a FineGates trial at most 1.5x a LoRA trial, the teacher amortised
over the trials of a task, and shown).

    python benchmarks/trial_cost.py --threads 2                                   # CPU: SST-2, 1,000 examples, ~15 min
    python benchmarks/trial_cost.py --max-train 10000 --batch-size 32 --rounds 2  # on a GPU (finegates.train picks it)
    python benchmarks/trial_cost.py --smoke-test                                  # the pipeline at tiny sizes (~1 min)

Each run is ``python -m finegates.train`` with a config of ``benchmarks/compression_frontier.py`` (the protocol's
sizes given here, then the config's flags). Round 0 is the LoRA run, which is exactly the task's LoRA teacher: it
puts its model into a fresh teacher cache, and its train time is the teacher's. Rounds 1..R run every config
once, one at a time, in an order that turns by one each round; the FineGates runs reuse the cached teacher (its
logits looked up, its weights their start), as every trial of a task does in a sweep. Per config: the median
train time (``train_time_s``: the epochs with their evaluations) and the min-max over rounds, its ratio to the
LoRA run of the same round (median, min-max), the process's wall time (loading, export, latency timing
included), and the ratio with the teacher's time shared by ``--trials-per-task`` FineGates trials. Where a sweep
runs the LoRA baseline of the task anyway, that run is the teacher and the share is 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

_spec = importlib.util.spec_from_file_location("compression_frontier", Path(__file__).resolve().parent
                                               / "compression_frontier.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)

DEFAULT_CONFIGS = "lora,fg-40-kdinit-dr-dl5-w45,fgl-40-kdinit-dr-dl5-w45"  # LoRA and both FineGates at today's defaults
REFERENCE = "lora"
SMOKE = dict(task="sst2", max_train=64, max_eval=32, epochs=1.0, batch_size=16, max_length=48, rounds=1)


def rotated(configs: list[str], r: int) -> list[str]:
    """Round ``r``'s order: the configs turned by ``r`` places, so that no config always runs first."""
    k = r % len(configs)
    return configs[k:] + configs[:k]


def table(rows: list[dict], configs: list[str], trials_per_task: int) -> str:
    """The configs' train and wall times over the rounds (round 0, the teacher, left out), each beside the LoRA
    run of its round."""
    timed = [r for r in rows if r["round"] > 0 and "error" not in r]
    ref = {r["round"]: r for r in timed if r["config"] == REFERENCE}
    lines = [f"| config | train s, median (min-max) | vs LoRA, per round | wall s, median | "
             f"vs LoRA, teacher shared by {trials_per_task} trials | score / exported sparsity |",
             "|---|---:|---:|---:|---:|---|"]
    for c in configs:
        rs = [r for r in timed if r["config"] == c]
        if not rs:
            lines.append(f"| {c} | - | - | - | - | - |")
            continue
        t = [r["train_time_s"] for r in rs]
        ratios = [r["train_time_s"] / ref[r["round"]]["train_time_s"] for r in rs if r["round"] in ref]
        # the teacher's training and export, as the cache the run read records it (its own teacher_train_time_s)
        teacher = rs[0].get("teacher_train_time_s")
        distils = teacher is not None
        share = teacher / trials_per_task if distils else 0.0
        shared = [(r["train_time_s"] + share) / ref[r["round"]]["train_time_s"] for r in rs if r["round"] in ref]
        scores = sorted({f"{r['score']:.3f} / {100 * r['sparsity']:.1f}%" for r in rs})
        lines.append(f"| {c} | {statistics.median(t):.1f} ({min(t):.1f}-{max(t):.1f}) | "
                     + (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-")
                     + f" | {statistics.median(r['wall_s'] for r in rs):.1f} | "
                     + (f"{statistics.median(shared):.2f}x" if shared and distils else "-")
                     + f" | {', '.join(scores)} |")
    teachers = sorted({r["teacher_train_time_s"] for r in timed if r.get("teacher_train_time_s") is not None})
    if teachers:
        lines.append(f"\nTeacher: {', '.join(f'{t:.1f}' for t in teachers)} s of training and export.")
    if timed:
        lines.append("Devices: " + ", ".join(sorted({f"{r.get('device')} {r.get('precision')}" for r in timed})))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma list of benchmarks/compression_frontier.py configs, {REFERENCE} among them "
                        f"(default: {DEFAULT_CONFIGS})")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, every config once in each (default: 3)")
    p.add_argument("--seed", type=int, default=1948)
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-eval", type=int, default=None, help="default: the whole validation set")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    p.add_argument("--trials-per-task", type=int, default=12,
                   help="FineGates trials that share one teacher (default: 12, tune.run's GPU size)")
    p.add_argument("--jsonl", default=None, help="also append every run as a JSON line to this file")
    p.add_argument("--model", default=None, help="model dir (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--data-dir", default=None, help="GLUE Parquet dir (default: $FINEGATES_GLUE_DIR)")
    p.add_argument("--smoke-test", action="store_true", help="one round at tiny sizes (sets the task and sizes)")
    a = p.parse_args(argv)
    if a.smoke_test:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    configs = [c for c in a.configs.split(",") if c]
    bad = [c for c in configs if c not in cf.CONFIGS]
    if bad or REFERENCE not in configs:
        print(f"error: --configs {a.configs!r} is invalid; accepted: a comma list with {REFERENCE} in it, of "
              f"{', '.join(cf.CONFIGS)}", file=sys.stderr)
        return 2
    for name in ("rounds", "trials_per_task", "max_train", "max_eval", "batch_size", "max_length", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            print(f"error: --{name.replace('_', '-')} {getattr(a, name)} is invalid; accepted: an integer >= 1",
                  file=sys.stderr)
            return 2
    if not a.epochs > 0:
        print(f"error: --epochs {a.epochs:g} is invalid; accepted: a number > 0", file=sys.stderr)
        return 2
    a.head_lr, a.predictions_dir = None, None  # what compression_frontier's train_command and one_run read
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as cache:
        plan = [(0, REFERENCE)] + [(r, c) for r in range(1, a.rounds + 1) for c in rotated(configs, r - 1)]
        for rnd, c in plan:
            row = cf.one_run(a, a.task, c, a.seed, cache) | {"round": rnd}
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("round", "config", "train_time_s", "wall_s", "score", "error")}),
                  flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(row | {"max_train": a.max_train, "epochs": a.epochs, "batch_size": a.batch_size,
                                              "max_length": a.max_length, "threads": a.threads}) + "\n")
            if "error" in row:
                print(f"error: {c} (round {rnd}) failed: {row['error']}", file=sys.stderr)
                return 1
            if rnd == 0 and not row.get("teacher_published"):  # the FineGates runs would train their own teacher
                print(f"error: the round-0 {REFERENCE} run did not publish the task's teacher; its flags no longer "
                      "match the teacher's (finegates.distill.teacher_of_run)", file=sys.stderr)
                return 1
            if row.get("teacher_reused") is False:
                print(f"warning: {c} (round {rnd}) trained its own teacher (a --teacher other than {REFERENCE}'s?): "
                      "its train time does not count it; its teacher_train_time_s is shared", file=sys.stderr)
    print(f"\n{a.task}, {a.max_train} train examples, {a.epochs:g} epochs, batch {a.batch_size} x {a.max_length}, "
          f"seed {a.seed}, {a.threads} CPU threads per run, one run at a time, {a.rounds} rounds after the teacher's\n")
    print(table(rows, configs, a.trials_per_task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
