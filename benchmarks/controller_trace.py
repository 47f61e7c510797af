"""How the controller drives a run: its target, the gates' expected and closed fractions and its two multipliers,
step by step, for each ``--dual-reset`` given, on the same run otherwise.

    python benchmarks/controller_trace.py --resets none,crossing --every 6 -- --task sst2 --seed 7 \\
        --method finegates-lora --lr 1e-3 --max-train 2000 --epochs 3 --batch-size 32 --threads 2 \\
        --teacher-cache <the CPU proxy's teachers>        # ~2.5 min per reset on 2 cores

Everything after ``--`` goes to ``finegates.train`` as it is (``--dual-reset`` excepted: this script sets it). For
each reset the script runs ``finegates.train`` in this process with a hook after every optimiser step, and prints
one table row every ``--every`` steps until the pin (the multipliers stop there), then the run's score, exported
sparsity, the largest expected and closed fractions before the pin, and the number of restarts. ``--jsonl`` keeps
every step's record.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys

import torch


def trace(train_args: list[str], reset: str) -> tuple[dict, list[dict]]:
    """One ``finegates.train`` run with ``--dual-reset reset``; its result and the controller's state per step."""
    from finegates import gated_model as gm
    from finegates import train
    from finegates.methods.finegates import FineGates

    steps: list[dict] = []
    original = FineGates.after_step

    def after_step(self: FineGates) -> None:
        original(self)
        if self.controller is None or self.pinned_at is not None or self.model is None:
            return
        with torch.no_grad():
            steps.append({"step": self.step, "target": self.controller.current_target(self.step),
                          "expected": float(gm.expected_sparsity(self.model)),
                          "closed": gm.closure_sparsity(self.model, -0.5),
                          "l1": float(self.controller.l1.detach()), "l2": float(self.controller.l2.detach()),
                          "resets": self.dual_resets})

    FineGates.after_step = after_step
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = train.main([*train_args, "--dual-reset", reset])
    finally:
        FineGates.after_step = original
    if rc:
        raise SystemExit(rc)
    return json.loads(out.getvalue()), steps


def main() -> None:
    argv = sys.argv[1:]
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resets", default="none,crossing", help="comma list of --dual-reset values to trace")
    p.add_argument("--every", type=int, default=6, help="print one row every this many steps")
    p.add_argument("--jsonl", default=None, help="also write every step's record here")
    a = p.parse_args(ours)
    if "--dual-reset" in train_args:
        p.error("--dual-reset is set by --resets; leave it out of the training arguments")
    from finegates.gated_model import DUAL_RESETS

    resets = [r.strip() for r in a.resets.split(",") if r.strip()]
    if not resets or any(r not in DUAL_RESETS for r in resets):
        p.error(f"--resets {a.resets!r} is invalid; accepted: a comma list of {', '.join(DUAL_RESETS)}")
    if a.every < 1:
        p.error(f"--every {a.every} is invalid; accepted: an integer >= 1")
    results = {}
    sink = open(a.jsonl, "w") if a.jsonl else None
    try:
        for reset in resets:
            result, steps = trace([*train_args, "--no-progress"], reset)
            results[reset] = (result, steps)
            for s in steps if sink else ():
                sink.write(json.dumps({"dual_reset": reset, **s}) + "\n")
    finally:
        if sink:
            sink.close()
    print("| step | target | " + " | ".join(f"{r}: expected, closed, l1, l2" for r in resets) + " |")
    print("|---|---|" + "---|" * len(resets))
    longest = max(len(s) for _, s in results.values())
    for i in range(0, longest, a.every):
        row = [results[r][1][i] if i < len(results[r][1]) else None for r in resets]
        first = next(x for x in row if x is not None)
        cells = ["" if x is None else f"{x['expected']:.3f}, {x['closed']:.3f}, {x['l1']:+.2f}, {x['l2']:.2f}"
                 for x in row]
        print(f"| {first['step']} | {first['target']:.3f} | " + " | ".join(cells) + " |")
    print()
    print("| --dual-reset | score | exported sparsity | max expected before the pin | max closed before the pin | "
          "restarts |")
    print("|---|---|---|---|---|---|")
    for r in resets:
        result, steps = results[r]
        print(f"| {r} | {result['score']:.4f} | {result['sparsity']:.3f} | "
              f"{max((s['expected'] for s in steps), default=0):.3f} | "
              f"{max((s['closed'] for s in steps), default=0):.3f} | {steps[-1]['resets'] if steps else 0} |")


if __name__ == "__main__":
    main()
