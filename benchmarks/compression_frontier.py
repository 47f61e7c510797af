"""Accuracy vs exported sparsity: full finetuning, LoRA and FineGates at several sparsities (docs/COMPRESSION.md).

    python benchmarks/compression_frontier.py --protocol cpu --jsonl runs/frontier-cpu.jsonl      # ~90 min, 2 cores
    python benchmarks/compression_frontier.py --protocol gpu --jsonl $OUT/frontier-gpu.jsonl      # one H100/H200
    python benchmarks/compression_frontier.py --jsonl runs/frontier-cpu.jsonl --table-only
    python benchmarks/compression_frontier.py --smoke-test                                        # ~2 min

Every run is one ``python -m finegates.train`` process; ``--jobs`` of them run at once (on a GPU they share
it). Each finished run is appended to the JSONL at once, so a stopped benchmark resumes where it was
(rows remember their settings; rows of other settings are ignored). Teachers (``--teacher``) are made
once per task and seed and cached (finegates/distill.py): the ``lora`` (``full``) row is the LoRA (full)
teacher, so it runs first and the distilled rows of its task reuse its model; without such a row the first
distilled row trains the teacher. Their training time is shown, and amortised over the rows of the task
that used them.

The dense baselines of the sweep (``gift-sw``, ``sparta``, ``propulsion``, ``bitfit``) are configs too, each at
its registry reference, so that the GPU protocol can also make issue 11's fair table (docs/RESULTS.md):
``--head-lr`` gives every config one head learning rate (its rows are kept apart from rows without it),
``--per-seed`` prints one row per config and seed (every cell one model) with cells at chance level marked,
and ``--predictions-dir`` keeps each run's predictions for benchmarks/heldout_coverage.py.

Protocols (the issue's):
  gpu: sst2 mrpc rte stsb cola qnli mnli; up to 10,000 train examples, 3 epochs, batch 32, length 128,
       whole validation sets, bf16 autocast; 6 processes on the one GPU.
  cpu: sst2 mrpc stsb qnli; 2,000 train examples, 3 epochs, batch 32, length 128, whole validation sets;
       2 single-threaded processes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

# name -> finegates.train flags. fg-<t>: FineGates (gates only), controller to t% removed, recovery;
# fgl-<t>: FineGates-LoRA (r8 inside the gates, lr 1e-3); -kd: distilled from the task's cached LoRA teacher.
CONFIGS: dict[str, list[str]] = {
    "full": ["--method", "full", "--lr", "5e-5"],
    "lora": ["--method", "lora", "--rank", "8", "--lr", "1e-3"],
    # the gate form before issue 9 (official init above the clamp, no penalty), without and with distillation
    "fg-old-0": ["--gate-init", "saturated", "--penalty", "paper", "--lambda", "0", "--recovery-frac", "0",
                 "--teacher", "none"],
    "fg-old-0-kd": ["--gate-init", "saturated", "--penalty", "paper", "--lambda", "0", "--recovery-frac", "0",
                    "--teacher", "lora"],
    "fg-0": ["--target-sparsity", "0", "--teacher", "none"],
    "fg-0-glr1e-2": ["--target-sparsity", "0", "--gate-lr", "1e-2", "--teacher", "none"],
    "fg-0-kd": ["--target-sparsity", "0", "--teacher", "lora"],
    "fg-40": ["--target-sparsity", "0.4", "--teacher", "none"],
    "fg-40-kd": ["--target-sparsity", "0.4", "--teacher", "lora"],
    "fg-60-kd": ["--target-sparsity", "0.6", "--teacher", "lora"],
    "fgl-0-kd": ["--method", "finegates-lora", "--target-sparsity", "0", "--teacher", "lora", "--lr", "1e-3"],
    "fgl-40-kd": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "lora", "--lr", "1e-3"],
    "fgl-60-kd": ["--method", "finegates-lora", "--target-sparsity", "0.6", "--teacher", "lora", "--lr", "1e-3"],
    # -kdfull: distilled from the task's cached full-finetuning teacher instead (lr 5e-5; the `full` row's training)
    "fg-0-kdfull": ["--target-sparsity", "0", "--teacher", "full"],
    "fgl-40-kdfull": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "full", "--lr", "1e-3"],
    # -kdinit: the student starts from its LoRA teacher's finetuned weights (--teacher-init), not the pretrained ones
    "fg-0-kdinit": ["--target-sparsity", "0", "--teacher", "lora", "--teacher-init"],
    "fg-40-kdinit": ["--target-sparsity", "0.4", "--teacher", "lora", "--teacher-init"],
    "fg-60-kdinit": ["--target-sparsity", "0.6", "--teacher", "lora", "--teacher-init"],
    "fgl-40-kdinit": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "lora", "--lr", "1e-3",
                      "--teacher-init"],
    "fgl-60-kdinit": ["--method", "finegates-lora", "--target-sparsity", "0.6", "--teacher", "lora", "--lr", "1e-3",
                      "--teacher-init"],
    # -lr3e-4: the same at a third of the learning rate (a student that starts from its teacher already knows the task)
    "fgl-40-kdinit-lr3e-4": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "lora", "--lr",
                             "3e-4", "--teacher-init"],
    # -a1: distillation only (--distill-alpha 1, no task loss, as CoFi trains): the student keeps to its teacher
    "fgl-40-kdinit-a1": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "lora", "--lr", "1e-3",
                         "--teacher-init", "--distill-alpha", "1"],
    # -e<n>: the student trains n epochs from its teacher, which trains the protocol's epochs (train_command passes
    # --teacher-epochs), so it is the same teacher as the other rows'; the row's epochs_completed says n
    "fgl-40-kdinit-e1": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "lora", "--lr", "1e-3",
                         "--teacher-init", "--epochs", "1"],
    "fgl-40-kdinit-e2": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "lora", "--lr", "1e-3",
                         "--teacher-init", "--epochs", "2"],
    # -al: the aligned close schedule (--close-schedule aligned): what closes on the line to the pin is what the
    # structure the exporter writes drops, so the pin changes little (session 15)
    "fgl-40-kdinit-al": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "lora", "--lr", "1e-3",
                         "--teacher-init", "--close-schedule", "aligned"],
    # -ld<w>: and matches the teacher's hidden states layer by layer too, at weight w (--layer-distill; CoFi's layer
    # distillation; the teacher runs beside the student)
    "fgl-60-kdinit-ld1": ["--method", "finegates-lora", "--target-sparsity", "0.6", "--teacher", "lora", "--lr", "1e-3",
                          "--teacher-init", "--layer-distill", "1"],
    # -atpin: what the gates have not closed by the pin closes at the pin, all at once (before session 9)
    "fg-40-kd-atpin": ["--target-sparsity", "0.4", "--teacher", "lora", "--close-schedule", "at-pin"],
    "fgl-40-kd-atpin": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "lora", "--lr", "1e-3",
                        "--close-schedule", "at-pin"],
    # fglqv-<t>: FineGates-LoRA with LoRA inside the gates of Q and V only (peft LoRA's placement, a third of the cost)
    "fglqv-40-kd": ["--method", "finegates-lora", "--target-sparsity", "0.4", "--teacher", "lora", "--lr", "1e-3",
                    "--option", 'lora_slots=["q","v"]'],
    "fglqv-60-kd": ["--method", "finegates-lora", "--target-sparsity", "0.6", "--teacher", "lora", "--lr", "1e-3",
                    "--option", 'lora_slots=["q","v"]'],
}

# variants named <base>-<variant>: the base config's flags, then the variant's.
# -dl05: the controller's multipliers at a third of their learning rate (--dual-lr 0.05), against its overshoot
# (60% closed for a 40% target on seed 7); the gradual schedule closes what it lags behind (session 15).
# -dr: the controller's linear multiplier restarts from 0 when the expected sparsity crosses the target
# (--dual-reset crossing, the default since session 16): the lag it summed during the ramp no longer carries the
# gates past it.
# -dl5: with the restart, the multipliers at 0.5 (--dual-lr 0.5, the default since session 17): the gates follow the
# ramp and reach the target before the pin instead of lagging behind it.
# -ra: the recovery anneals: every learning rate decays linearly to 0 from the pin to the last step
# (--recovery-lr linear; constant before), against the points a 40% or 60% run lost in its recovery (session 18).
# -r45: a longer recovery, the last 45% of the steps (--recovery-frac 0.45; 0.3 is the default): more steps to repair
# what the aligned pin reshapes, now that the faster controller has closed the target by then (session 18).
# -w45: the recovery starts as soon as the gates' expected sparsity has reached the target, from the point where 45% of
# the steps remain (--max-recovery-frac 0.45), at 30% at the latest: -r45's longer recovery where the gates are done,
# the fixed pin where they lag (session 19).
_VARIANT_FLAGS = {"dl05": ["--dual-lr", "0.05"], "dr": ["--dual-reset", "crossing"], "dl5": ["--dual-lr", "0.5"],
                  "ra": ["--recovery-lr", "linear"], "r45": ["--recovery-frac", "0.45"],
                  "w45": ["--max-recovery-frac", "0.45"]}
for _name in ("fgl-40-kdinit-dl05", "fgl-40-kdinit-al-dl05", "fgl-40-kdinit-dr", "fgl-60-kdinit-dr",
              "fgl-40-kdinit-al-dr", "fgl-40-kdinit-dr-dl5", "fgl-60-kdinit-dr-dl5", "fgl-40-kdinit-dr-dl5-ra",
              "fgl-60-kdinit-dr-dl5-ra", "fgl-40-kdinit-dr-dl5-r45", "fgl-60-kdinit-dr-dl5-r45",
              "fgl-40-kdinit-dr-dl5-w45", "fgl-60-kdinit-dr-dl5-w45", "fgl-40-kdinit-dr-dl5-w45-ra",
              "fgl-60-kdinit-dr-dl5-w45-ra",
              "fg-40-kdinit-dr", "fg-40-kdinit-dr-dl5", "fg-40-kdinit-dr-dl5-w45"):
    _base, _, _variant = _name.rpartition("-")
    CONFIGS[_name] = [*CONFIGS[_base], *_VARIANT_FLAGS[_variant]]
# today's 40% defaults with LoRA and the head at lr 3e-4 instead of 1e-3 (the flag given last wins): a student that
# starts from its teacher already knows the task (session 25, on CoLA)
CONFIGS["fgl-40-kdinit-dr-dl5-w45-lr3e-4"] = [*CONFIGS["fgl-40-kdinit-dr-dl5-w45"], "--lr", "3e-4"]

# Since session 13 a distilled student starts from its teacher (--teacher-init, the default): the configs that
# do not say -kdinit start from the pretrained model, as they did when their rows were measured.
for _flags in CONFIGS.values():
    if "--teacher" in _flags and _flags[_flags.index("--teacher") + 1] != "none" and "--teacher-init" not in _flags:
        _flags.append("--no-teacher-init")

# Controller defaults that changed after rows were measured: the FineGates configs that do not set the flag run at the
# value before, as they did when their rows were measured. Since session 16 the linear multiplier restarts when the
# expected sparsity crosses the target (--dual-reset crossing; configs without -dr: none); since session 17 the
# multipliers learn at 0.5 (--dual-lr; configs without -dl<x>: 0.15); since session 20 the recovery starts once the
# gates are done (--max-recovery-frac 0.45; configs without -w45: none, at --recovery-frac).
_CONTROLLER_BEFORE = (("--dual-reset", "none"), ("--dual-lr", "0.15"), ("--max-recovery-frac", "none"))
for _flags in CONFIGS.values():
    if "--method" not in _flags or _flags[_flags.index("--method") + 1].startswith("finegates"):
        for _flag, _before in _CONTROLLER_BEFORE:
            if _flag not in _flags:
                _flags += [_flag, _before]

TEACHER_LABEL = {"lora": "LoRA r8, lr 1e-3", "full": "full finetuning, lr 5e-5"}
# dense configs whose run is exactly the task's teacher of that kind (same data, seed, method, lr, rank): given the
# teacher cache, it puts its model there, and the distilled rows reuse it (tests check the flags still match)
PUBLISHES = {"lora": "lora", "full": "full"}


def teacher_kind(config: str) -> str | None:
    """The teacher a config's FineGates runs distil from (``--teacher``, else the default), or None. Dense
    methods never distil; their rows carry no teacher fields, so this is not asked of them."""
    from finegates.config import TrainConfig

    flags = CONFIGS[config]
    kind = flags[flags.index("--teacher") + 1] if "--teacher" in flags else TrainConfig.teacher
    return None if kind == "none" else kind


def _reference_flags(method: str) -> list[str]:
    """finegates.train flags of a method's reference configuration (tune/space.py's first trial)."""
    import dataclasses

    from finegates.config import TrainConfig
    from finegates.methods import get_method_class

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = ["--method", method]
    for k, v in get_method_class(method).reference.items():
        flags += [f"--{k.replace('_', '-')}", str(v)] if k in fields else ["--option", f"{k}={json.dumps(v)}"]
    return flags


# the other dense baselines of the sweep, each at its reference configuration (issue 11's fair field)
for _m in ("gift-sw", "sparta", "propulsion", "bitfit"):
    CONFIGS[_m] = _reference_flags(_m)

PROTOCOLS = {
    "gpu": dict(tasks="sst2,mrpc,rte,stsb,cola,qnli,mnli", max_train=10000, epochs=3, batch_size=32, max_length=128,
                jobs=6, threads=2, configs="full,lora,fg-0-kdinit,fg-40-kdinit,fg-60-kdinit,fgl-40-kdinit-dr-dl5-w45"),
    "cpu": dict(tasks="sst2,mrpc,stsb,qnli", max_train=2000, epochs=3, batch_size=32, max_length=128,
                jobs=2, threads=1, configs="lora,fg-0-kdinit,fg-40-kdinit,fgl-40-kdinit-dr-dl5-w45,fg-60-kdinit,full"),
    "smoke": dict(tasks="sst2,stsb", max_train=64, epochs=1, batch_size=16, max_length=48,
                  jobs=2, threads=1, configs="lora,fg-0,fg-40-kdinit"),
}


def settings(a: argparse.Namespace) -> dict:
    """What makes rows comparable; ``head_lr`` (one head learning rate for every method) only when given."""
    out = {"max_train": a.max_train, "max_eval": a.max_eval, "epochs": a.epochs, "batch_size": a.batch_size,
           "max_length": a.max_length}
    if getattr(a, "head_lr", None) is not None:
        out["head_lr"] = a.head_lr
    return out


def load(path: Path, setting: dict) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return [r for r in rows if all(r.get(k) == v for k, v in setting.items())
            and r.get("head_lr") == setting.get("head_lr")]


def train_command(a: argparse.Namespace, task: str, name: str, seed: int, cache: str, out: str) -> list[str]:
    """The finegates.train command line of one row (the protocol's sizes, then the config's flags)."""
    cmd = [sys.executable, "-m", "finegates.train", "--task", task, "--seed", str(seed), "--no-progress",
           "--max-train", str(a.max_train), "--max-eval", str(a.max_eval or "all"), "--epochs", str(a.epochs),
           "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--threads", str(a.threads),
           "--latency-repeats", "3", "--teacher-cache", cache, "--output-dir", out, "--history", *CONFIGS[name]]
    if "--epochs" in CONFIGS[name]:  # a student trained shorter than the protocol: its teacher is the protocol's
        cmd += ["--teacher-epochs", str(a.epochs)]
    cmd += ["--head-lr", str(a.head_lr)] if getattr(a, "head_lr", None) is not None else []
    cmd += ["--model", a.model] if a.model else []
    cmd += ["--data-dir", a.data_dir] if a.data_dir else []
    return cmd


def one_run(a: argparse.Namespace, task: str, name: str, seed: int, cache: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = train_command(a, task, name, seed, cache, out)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            return {"task": task, "config": name, "seed": seed, "error": p.stderr.strip().splitlines()[-1:]}
        r = json.loads(p.stdout)
        if a.predictions_dir:  # the exported model's predictions on the whole evaluation set, for post-hoc analyses
            dest = Path(a.predictions_dir) / f"{task}-{name}-{seed}.npz"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(out) / "eval_predictions.npz", dest)
    keep = ("score", "sparsity", "speedup", "params_trainable", "train_time_s", "steps", "epochs_completed", "n_train",
            "n_eval", "device", "precision", "teacher_score", "teacher_train_time_s", "teacher_reused", "gate_sparsity",
            "trivial_score")
    row = {"task": task, "config": name, "seed": seed, "wall_s": wall, **{k: r.get(k) for k in keep}}
    # per epoch: the evaluation score and the sparsity reached (gate, expected), for how a run got where it ended
    row["history"] = [{k: h.get(k) for k in ("epoch", "step", "score", "gate_sparsity", "expected_sparsity")}
                      for h in r.get("history") or []]
    last = (r.get("history") or [{}])[-1]  # where the recovery started, and how far the gates had got by then
    row.update({k: last[k] for k in ("pinned_at_step", "expected_sparsity_at_pin") if k in last})
    if r.get("published_teacher_path"):
        row["teacher_published"] = True  # this row's model is its task's teacher (its training time is the teacher's)
    return row


def publishes(config: str, a: argparse.Namespace) -> str | None:
    """The teacher kind that a dense config's run is, exactly, and puts into the teacher cache when it ends
    (``finegates.distill.publish_teacher``); None for any other config. A common ``--head-lr`` makes the rows
    other than a teacher (a teacher's head trains at the method's lr)."""
    return PUBLISHES.get(config) if getattr(a, "head_lr", None) is None else None


def schedule(jobs: list[tuple[str, str, int]], a: argparse.Namespace) -> tuple[list, dict]:
    """The order to start ``jobs`` (task, config, seed) in, and the job each one waits for. A task's teacher (per
    seed and teacher kind) is made once: by the dense row that is that teacher (``publishes``), else by the first
    distilled row that needs it. That job starts first; the task's other distilled rows start once it has
    finished, and reuse the teacher instead of waiting on its lock."""
    def needs(j) -> tuple | None:  # the teacher a distilled row uses (every FineGates config names its --teacher)
        kind = teacher_kind(j[1]) if "--teacher" in CONFIGS[j[1]] else None
        return None if kind is None else (j[0], j[2], kind)

    maker: dict[tuple, tuple] = {}
    for j in jobs:
        if (kind := publishes(j[1], a)) is not None:
            maker.setdefault((j[0], j[2], kind), j)
    for j in jobs:
        if (key := needs(j)) is not None:
            maker.setdefault(key, j)
    first = list(dict.fromkeys(maker.values()))
    deps = {j: maker[needs(j)] for j in jobs if needs(j) is not None and maker[needs(j)] != j}
    return first + [j for j in jobs if j not in first], deps


def run_jobs(jobs: list, deps: dict, fn, workers: int) -> None:
    """``fn(job)`` for every job, ``workers`` at a time, in order; a job starts only once ``deps[job]`` (when it
    has one) has finished. A worker with nothing ready waits."""
    pending, done, errors = list(jobs), set(), []
    cond = threading.Condition()

    def worker() -> None:
        while True:
            with cond:
                while True:
                    job = next((j for j in pending if deps.get(j) is None or deps[j] in done), None)
                    if job is not None or not pending:
                        break
                    cond.wait()
                if job is None:
                    return
                pending.remove(job)
            try:
                fn(job)
            except BaseException as e:  # noqa: BLE001 - raised again below, after the other workers end
                errors.append(e)
            finally:
                with cond:
                    done.add(job)
                    cond.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def run_all(a: argparse.Namespace, out: Path) -> None:
    setting = settings(a)
    done = {(r["task"], r["config"], r["seed"]) for r in load(out, setting) if "error" not in r}
    configs = [c for c in a.configs.split(",") if c]
    jobs = [(t, c, s) for s in a.seeds for c in configs for t in a.tasks.split(",") if (t, c, s) not in done]
    jobs, deps = schedule(jobs, a)
    cache = str(Path(a.teacher_cache).resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(jobs)} runs, {a.jobs} at a time -> {out}", flush=True)
    lock = threading.Lock()

    def go(job):
        row = one_run(a, *job, cache) | setting
        with lock, out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row.get(k) for k in ("task", "config", "seed", "score", "sparsity", "wall_s", "error")}),
              flush=True)

    run_jobs(jobs, deps, go, a.jobs)


def _fmt(xs: list[float], pct: bool = False) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs)
    s = f"{100 * m:.0f}%" if pct else f"{m:.3f}"
    if len(xs) > 1 and not pct:
        s += f" ± {statistics.stdev(xs):.3f}"
    return s


def table(rows: list[dict], configs: list[str], tasks: list[str]) -> str:
    ok = [r for r in rows if "error" not in r]
    by = defaultdict(list)
    for r in ok:
        by[(r["config"], r["task"])].append(r)
    # teacher cost per task and teacher kind: the runs that trained one (one per training subset, i.e. per seed),
    # amortised over the rows that used that kind of teacher on that task
    trained = defaultdict(list)  # (task, kind) -> [(teacher score, teacher training s)]
    for r in ok:
        if r.get("teacher_reused") is False:
            trained[(r["task"], teacher_kind(r["config"]))].append((r["teacher_score"], r["teacher_train_time_s"]))
        elif r.get("teacher_published"):  # a dense row that is the teacher: its own run, charged to it and shared
            trained[(r["task"], PUBLISHES[r["config"]])].append((r["score"], r["train_time_s"]))
    teacher_time = {tk: sum(s for _, s in v) for tk, v in trained.items()}
    kd_rows = defaultdict(int)
    for r in ok:
        if r.get("teacher_train_time_s") is not None:
            kd_rows[(r["task"], teacher_kind(r["config"]))] += 1
    head = "| config | " + " | ".join(tasks) + " | mean score | mean sparsity | train s / run (+ teacher share) |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for c in configs:
        cells, means, sps, times = [], [], [], []
        for t in tasks:
            rs = by.get((c, t), [])
            cells.append(f"{_fmt([r['score'] for r in rs])} / {_fmt([r['sparsity'] for r in rs], pct=True)}"
                         if rs else "-")
            if rs:
                means.append(statistics.mean(r["score"] for r in rs))
                sps.append(statistics.mean(r["sparsity"] for r in rs))
                tk = (t, teacher_kind(c))
                share = teacher_time.get(tk, 0.0) / kd_rows[tk] if rs[0].get("teacher_train_time_s") else 0.0
                times += [r["train_time_s"] + share for r in rs]
        complete = len(means) == len(tasks)
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {statistics.mean(means):.3f}{'' if complete else ' (partial)'}"
                     f" | {100 * statistics.mean(sps):.0f}% | {statistics.mean(times):.0f} |" if means else
                     f"| {c} | " + " | ".join(cells) + " | - | - | - |")
    for kind in sorted({k for _, k in trained}):
        lines.append("")
        lines.append(f"Teachers ({TEACHER_LABEL[kind]}, same data; one per seed's training subset): " + ", ".join(
            f"{t} " + " / ".join(f"{sc:.3f}" for sc, _ in v) + " in " + " + ".join(f"{s:.0f}" for _, s in v)
            + f" s (shared by {kd_rows[(t, k)]} runs)" for (t, k), v in sorted(trained.items()) if k == kind))
    devices = sorted({f"{r.get('device')} {r.get('precision')}" for r in ok})
    lines.append(f"\nscore / exported sparsity; mean ± std over seeds where there are several; devices: {', '.join(devices)}")
    return "\n".join(lines)


def per_seed_table(rows: list[dict], configs: list[str], tasks: list[str], predictions_dir: Path | None = None) -> str:
    """One row per config and seed, each cell one trained model (no averages of different models). A cell
    whose score is not clearly above its task's trivial predictor (majority class or constant mean, on the
    same examples) is marked "(chance)". With the run's predictions in ``predictions_dir`` the cell shows its
    95% bootstrap interval over the evaluation examples and the mark is the sweep's guard (tune.stats: more
    than 2 bootstrap SEs above the trivial predictor); without them, the selector's fallback guard (more than
    2 x 1/sqrt(n) above it)."""
    import numpy as np

    from tasks import get_task
    from tune.stats import Bootstrap, fallback_guard, percentile_interval

    ok = {(r["config"], r["task"], r["seed"]): r for r in rows if "error" not in r}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| config | seed | " + " | ".join(tasks) + " | mean score |", "|" + "---|" * (len(tasks) + 3)]
    trivial = {}
    for c in configs:
        for seed in seeds:
            cells, scores = [], []
            for t in tasks:
                r = ok.get((c, t, seed))
                if r is None:
                    cells.append("-")
                    continue
                if trivial.get((t, seed)) is None:  # the same examples for every config: any row's will do
                    trivial[(t, seed)] = r.get("trivial_score")
                f = predictions_dir / f"{t}-{c}-{seed}.npz" if predictions_dir else None
                interval = ""
                if f is not None and f.is_file():
                    with np.load(f) as z:
                        p, y = z["predictions"], z["labels"]
                    bs = Bootstrap(get_task(t), y)
                    scores_b = bs.scores(p)  # once, for the interval and the guard
                    ci = percentile_interval(scores_b, bs.point(p))
                    interval = f" [{ci.low:.3f}, {ci.high:.3f}]"
                    learned = bs.guard(p, scores=scores_b).learned
                else:
                    learned = fallback_guard(r["score"], r.get("trivial_score"), r.get("n_eval"), get_task(t)).learned
                mark = " (chance)" if learned is False else ""
                sparsity = f" / {100 * r['sparsity']:.0f}%" if r.get("sparsity") else ""
                cells.append(f"{r['score']:.3f}{interval}{sparsity}{mark}")
                scores.append(r["score"])
            if scores:
                mean = f"{statistics.mean(scores):.3f}" + ("" if len(scores) == len(tasks) else " (partial)")
                lines.append(f"| {c} | {seed} | " + " | ".join(cells) + f" | {mean} |")
    for seed in seeds:
        cells = [f"{trivial[(t, seed)]:.3f}" if trivial.get((t, seed)) is not None else "-" for t in tasks]
        lines.append(f"| trivial predictor | {seed} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def difference_table(rows: list[dict], configs: list[str], tasks: list[str], predictions_dir: Path, ref: str) -> str:
    """Each config minus ``ref``, in points, on the same evaluation examples: per task the difference of the
    seeds' mean scores and its 95% paired bootstrap interval over the evaluation examples (tune.stats: the same
    resamples for both models), and the mean over tasks with its interval (the tasks' resampled differences
    averaged). Only (task, seed) pairs where both runs left their predictions count. The interval is the
    evaluation set's noise only: another seed (another training subset and teacher) moves a score more."""
    import numpy as np

    from tasks import get_task
    from tune.stats import Bootstrap, percentile_interval

    ok = {(r["config"], r["task"], r["seed"]) for r in rows if "error" not in r}
    seeds = sorted({r["seed"] for r in rows})

    def preds(c: str, t: str, seed: int):
        f = predictions_dir / f"{t}-{c}-{seed}.npz"
        if (c, t, seed) not in ok or not f.is_file():
            return None
        with np.load(f) as z:
            return z["predictions"], z["labels"]

    def cell(d: float, lo: float, hi: float) -> str:
        return f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"

    lines = ["| config | " + " | ".join(tasks) + " | mean | worst task |", "|" + "---|" * (len(tasks) + 3)]
    for c in [c for c in configs if c != ref]:
        cells, est, reps = [], [], []
        for t in tasks:
            ds, rs = [], []
            for seed in seeds:
                a, b = preds(c, t, seed), preds(ref, t, seed)
                if a is None or b is None or not np.array_equal(a[1], b[1]):
                    continue
                bs = Bootstrap(get_task(t), a[1])
                ds.append(bs.point(a[0]) - bs.point(b[0]))
                rs.append(bs.scores(a[0]) - bs.scores(b[0]))
            if not ds:
                cells.append("-")
                continue
            d, r = statistics.mean(ds), np.mean(rs, axis=0)
            ci = percentile_interval(r, d)
            cells.append(cell(d, ci.low, ci.high) + (f" ({len(ds)} seeds)" if len(ds) > 1 else ""))
            est.append(d)
            reps.append(r)
        if not est:
            continue
        n = min(len(r) for r in reps)
        mean_ci = percentile_interval(np.mean([r[:n] for r in reps], axis=0), statistics.mean(est))
        done = [t for t, x in zip(tasks, cells) if x != "-"]
        low_task, low = min(zip(done, est), key=lambda te: te[1])
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {cell(mean_ci.estimate, mean_ci.low, mean_ci.high)}"
                     + ("" if len(est) == len(tasks) else " (partial)") + f" | {low_task} {100 * low:+.1f} |")
    return "\n".join(lines)


def prunes(config: str) -> bool:
    """The config's method prunes (the registry's ``Method.prunes``: FineGates and FineGates-LoRA)."""
    from finegates.config import TrainConfig
    from finegates.methods import get_method_class

    flags = CONFIGS[config]
    method = flags[flags.index("--method") + 1] if "--method" in flags else TrainConfig.method
    return get_method_class(method).prunes


def _heldout_coverage():
    """benchmarks/heldout_coverage.py, the trusted selector over saved predictions."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # benchmarks/ is on it when this runs as a script, not when a test imports it
        sys.path.insert(0, here)
    import heldout_coverage

    return heldout_coverage


def selector_table(rows: list[dict], configs: list[str], tasks: list[str], predictions_dir: Path,
                   budgets: list[float], report_frac: float = 0.5) -> str:
    """FineGates as the sweep would hand it to a user: per task and seed, the trusted selector
    (benchmarks/heldout_coverage.py: split, guard, paired rule) over the FineGates configs' runs, each budget's
    pick reported with its report-part score, its selection-part score and interval, its exported sparsity."""
    import numpy as np

    trusted_picks = _heldout_coverage().trusted_picks

    ok = {(r["config"], r["task"], r["seed"]): r for r in rows if "error" not in r}
    fg = [c for c in configs if prunes(c)]
    seeds = sorted({r["seed"] for r in rows})
    picks, sparsity = {}, {}  # (task, seed) -> trusted_picks over all budgets at once; config -> sparsity
    for seed in seeds:
        for t in tasks:
            runs = {}
            for c in fg:
                f = predictions_dir / f"{t}-{c}-{seed}.npz"
                if (c, t, seed) in ok and f.is_file():
                    with np.load(f) as z:
                        runs[c] = {"predictions": z["predictions"], "labels": z["labels"]}
                    sparsity[(t, seed, c)] = ok[(c, t, seed)]["sparsity"]
            if runs:
                picks[(t, seed)] = trusted_picks(runs, t, seed, report_frac, budgets,
                                                 sparsity={c: sparsity[(t, seed, c)] for c in runs})
    lines = ["| FineGates, trusted selector | seed | " + " | ".join(tasks) + " | mean report score |",
             "|" + "---|" * (len(tasks) + 3)]
    for b in budgets:
        for seed in seeds:
            cells, reports = [], []
            for t in tasks:
                pick = picks.get((t, seed))
                if pick is None:
                    cells.append("-")
                    continue
                c = pick["picks"].get(b)
                if not pick["learned"]:
                    cells.append("not learned")
                elif c is None:
                    cells.append("none eligible")
                elif pick["report"][c] <= pick["report_trivial"]:  # the sweep does not register it
                    cells.append(f"not confirmed: `{c}` {pick['report'][c]:.3f} on the held-out part, trivial "
                                 f"{pick['report_trivial']:.3f}")
                else:
                    i = pick["interval"][c]
                    cells.append(f"{pick['report'][c]:.3f} (selection {i.estimate:.3f} [{i.low:.3f}, {i.high:.3f}])"
                                 f" / {100 * sparsity[(t, seed, c)]:.0f}% `{c}`")
                    reports.append(pick["report"][c])
            mean = f"{statistics.mean(reports):.3f}" + ("" if len(reports) == len(tasks) else " (partial)") \
                if reports else "-"
            lines.append(f"| budget {b:g} | {seed} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="cpu")
    p.add_argument("--jsonl", default=None, help="results file (appended, resumable); default runs/frontier-<protocol>.jsonl")
    p.add_argument("--tasks", default=None)
    p.add_argument("--configs", default=None, help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--seeds", default="1948")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None, help="default: whole validation sets")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None, help="runs at once")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run")
    p.add_argument("--teacher-cache", default="runs/teachers")
    p.add_argument("--model", default=None, help="model dir (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--data-dir", default=None, help="GLUE Parquet dir (default: $FINEGATES_GLUE_DIR)")
    p.add_argument("--predictions-dir", default=None,
                   help="keep each run's eval predictions there as <task>-<config>-<seed>.npz "
                        "(benchmarks/heldout_coverage.py reads them)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="one classification-head learning rate for every config (rows made with it are kept apart)")
    p.add_argument("--per-seed", action="store_true", help="also print one row per config and seed, cells at "
                   "chance level marked; with --predictions-dir, also FineGates as the trusted selector picks it")
    p.add_argument("--budgets", default="0.02", help="budgets of the trusted-selector rows (default: 0.02)")
    p.add_argument("--vs", default=None, metavar="CONFIG", help="with --predictions-dir: also every config minus "
                   "CONFIG, in points, with 95%% paired bootstrap intervals over the evaluation examples")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="the whole pipeline at tiny sizes (~2 min)")
    a = p.parse_args(argv)
    if a.smoke_test:
        a.protocol = "smoke"
        if a.max_eval is None:
            a.max_eval = 64
    for k, v in PROTOCOLS[a.protocol].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    bad = [c for c in a.configs.split(",") if c and c not in CONFIGS]
    if bad:
        print(f"error: unknown config(s) {', '.join(bad)}; accepted: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if a.vs is not None and (a.vs not in CONFIGS or not a.predictions_dir):
        print(f"error: --vs {a.vs!r} is invalid; accepted: one of the configs ({', '.join(CONFIGS)}), "
              "with --predictions-dir", file=sys.stderr)
        return 2
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds {a.seeds!r} is invalid; accepted: comma-separated integers", file=sys.stderr)
        return 2
    if a.head_lr is not None and not (math.isfinite(a.head_lr) and a.head_lr > 0):
        print(f"error: --head-lr {a.head_lr!r} is invalid; accepted: a finite number > 0", file=sys.stderr)
        return 2
    budgets = _heldout_coverage().parse_budgets(a.budgets)
    if budgets is None:
        return 2
    out = Path(a.jsonl or (tempfile.mkdtemp() + "/smoke.jsonl" if a.smoke_test else f"runs/frontier-{a.protocol}.jsonl"))
    if a.smoke_test:
        a.teacher_cache = str(out.parent / "teachers")
    if not a.table_only:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        run_all(a, out)
    rows = [r for r in load(out, settings(a)) if r["seed"] in a.seeds]
    if not rows:
        print(f"error: no rows with these settings in {out}", file=sys.stderr)
        return 1
    print(table(rows, [c for c in a.configs.split(",") if c], a.tasks.split(",")))
    if a.per_seed:
        preds = Path(a.predictions_dir) if a.predictions_dir and Path(a.predictions_dir).is_dir() else None
        print("\nPer seed (score" + (" [95% bootstrap interval over the evaluation examples]" if preds else "")
              + " / exported sparsity; \"(chance)\": not clearly above the trivial predictor):\n")
        print(per_seed_table(rows, [c for c in a.configs.split(",") if c], a.tasks.split(","), preds))
        if preds is not None:
            print("\nFineGates through the trusted selector (each task's validation set split as a sweep splits it, "
                  "seeded by the run's seed; report-part score (selection-part score [95% interval]) / exported "
                  "sparsity, picked config):\n")
            print(selector_table(rows, [c for c in a.configs.split(",") if c], a.tasks.split(","), preds, budgets))
    if a.vs is not None:
        print(f"\nDifference from {a.vs} in points (the seeds' mean; [95% paired bootstrap interval over the "
              "evaluation examples: the evaluation set's noise, not the seeds']):\n")
        print(difference_table(rows, [c for c in a.configs.split(",") if c], a.tasks.split(","),
                               Path(a.predictions_dir), a.vs))
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"failed: {r['task']} {r['config']} seed {r['seed']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
