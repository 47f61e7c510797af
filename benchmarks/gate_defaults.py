"""Which gate settings close gates within a few epochs on small data, and at what accuracy?

Runs named configurations of ``finegates.train.run`` on one task (default: SST-2, 1000 train
examples, 3 epochs, full validation) and prints a table. Evidence for the defaults in
docs/GATE_DEFAULTS.md.

    python benchmarks/gate_defaults.py --configs official,paper-l1,controller-40 --seeds 1948
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from finegates.config import TrainConfig
from finegates.train import run

CONFIGS: dict[str, dict] = {
    # the official code's settings: code-form penalty, lambda 50, target 0.4, lr 1e-3 everywhere
    "official": dict(penalty="code", lam=50.0, target_sparsity=0.4, lr=1e-3, gate_lr=1e-3, layout="independent"),
    "official-glr5e-2": dict(penalty="code", lam=50.0, target_sparsity=0.4, lr=1e-3, gate_lr=5e-2, layout="independent"),
    "dense-ref": dict(penalty="paper", lam=0.0),
    "paper-l0.1": dict(penalty="paper", lam=0.1),
    "paper-l1": dict(penalty="paper", lam=1.0),
    "paper-l3": dict(penalty="paper", lam=3.0),
    "paper-l10": dict(penalty="paper", lam=10.0),
    "paper-l1-glr1e-2": dict(penalty="paper", lam=1.0, gate_lr=1e-2),
    "paper-l1-independent": dict(penalty="paper", lam=1.0, layout="independent"),
    "controller-40": dict(penalty="controller", lam=1.0, target_sparsity=0.4, warmup_frac=0.5),
    "controller-40-independent": dict(penalty="controller", lam=1.0, target_sparsity=0.4, warmup_frac=0.5,
                                      layout="independent"),
    "lora-r8": dict(method="lora", rank=8, lr=1e-3),
    "dense-ref-r8": dict(penalty="paper", lam=0.0, rank=8),
    "paper-l3-r8": dict(penalty="paper", lam=3.0, rank=8),
    "controller-40-r8": dict(penalty="controller", lam=1.0, target_sparsity=0.4, warmup_frac=0.5, rank=8),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--task", default="sst2")
    p.add_argument("--seeds", default="1948")
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jsonl", default=None, help="append each result as a JSON line")
    a = p.parse_args()
    rows = []
    for name in a.configs.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            # the defaults these rounds were measured with (before issue 9); each config overrides them
            before = dict(gate_init="saturated", penalty="paper", lam=3.0, warmup_frac=0.0, recovery_frac=0.0,
                          teacher="none")
            kw = dict(task=a.task, max_train=a.max_train, epochs=a.epochs, seed=seed, threads=a.threads,
                      latency_repeats=5) | before | CONFIGS[name]
            t0 = time.perf_counter()
            r = run(TrainConfig(**kw))
            first_closed = next((h["epoch"] for h in r["history"] if h.get("gate_sparsity", 0) > 0), None)
            row = dict(config=name, seed=seed, score=r["score"], sparsity=r["sparsity"],
                       gate_sparsity=r.get("gate_sparsity", 0.0), first_epoch_closed=first_closed,
                       speedup=r["speedup"], trainable=r["params_trainable"], wall_s=time.perf_counter() - t0,
                       per_epoch=[(round(h["score"], 3), round(h.get("gate_sparsity", 0), 3)) for h in r["history"]])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print("| config | seed | score | sparsity | gate sparsity | first epoch with a closed gate | speedup | trainable | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['seed']} | {r['score']:.3f} | {r['sparsity']:.3f} | {r['gate_sparsity']:.3f} | "
              f"{r['first_epoch_closed'] or '-'} | {r['speedup']:.2f} | {r['trainable']} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
