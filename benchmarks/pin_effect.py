"""What the pin does to a run: the gated model just before recovery, scored as it is and after each pin.

    python benchmarks/pin_effect.py --task stsb --dual-lrs 0.05,0.5,2.0      # ~15 min per lr on 2 cores

For each controller multiplier learning rate, trains FineGates (the given target, distilled by default)
until the end of the epoch before the pin (epoch 2 of 3 with the default 30% recovery), snapshots the
gated model, and prints: its expected sparsity, its score, and its score and exported sparsity after
the unit pin (``align=None``: the least open units closed) and after the aligned pin (``align=8``: the
structure the exporter writes; and with Q/K and V/O widths chosen apart, which the exporter pads to one
head dim). Scores are on the whole validation set.

    python benchmarks/pin_effect.py --task stsb --method finegates-lora --distill-alpha 1 --max-train 2000 \
        --batch-size 32 --dual-lrs 0.15 --threads 1 --teacher-cache <the CPU proxy's teachers>   # the CPU proxy's run
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.data import DataLoader


class _Stop(Exception):
    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="stsb")
    p.add_argument("--dual-lrs", default="0.05,0.5")
    p.add_argument("--target", type=float, default=0.4)
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--teacher", default="lora")
    p.add_argument("--teacher-cache", default="runs/teachers")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--method", default="finegates", help="finegates or finegates-lora")
    p.add_argument("--lr", type=float, default=None, help="default: the method's reference lr (finegates 2e-3, finegates-lora 1e-3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--distill-alpha", type=float, default=None, help="default: TrainConfig's")
    p.add_argument("--seed", type=int, default=1948)
    p.add_argument("--no-teacher-init", action="store_true", help="start from the pretrained model, not the teacher")
    a = p.parse_args()

    from finegates import gated_model as gm
    from finegates.config import TrainConfig
    from finegates.export import build_compressed
    from finegates.methods import get_method_class
    from finegates.train import _collator, load_base, predict, resolve_model, run
    from tasks import compute_metrics, get_task, load_task_data

    task = get_task(a.task)
    tok, _ = load_base(resolve_model(None), task.num_labels, task.label_names)
    rows = []
    for lr in [float(x) for x in a.dual_lrs.split(",")]:
        extra = {"distill_alpha": a.distill_alpha} if a.distill_alpha is not None else {}
        # the pin at the fixed 30% (no early recovery): the snapshot at the end of epoch 2 must come before it
        cfg = TrainConfig(task=a.task, dual_lr=lr, target_sparsity=a.target, max_train=a.max_train,
                          max_recovery_frac=None,
                          batch_size=a.batch_size, epochs=a.epochs, teacher=a.teacher, teacher_cache=a.teacher_cache,
                          data_dir=a.data_dir, threads=a.threads, method=a.method, seed=a.seed,
                          teacher_init=a.teacher != "none" and not a.no_teacher_init,
                          lr=a.lr if a.lr is not None else get_method_class(a.method).reference["lr"], **extra)
        data = load_task_data(task, tok, data_dir=cfg.data_dir, max_train=cfg.max_train, max_eval=None,
                              seed=cfg.subset_seed, max_length=cfg.max_length, tokenize_train=False)
        loader = DataLoader(data.eval, batch_size=64, collate_fn=_collator(tok))

        def score(m) -> float:
            with torch.no_grad():
                preds, labels = predict(m, loader, torch.device("cpu"), task.is_regression)
            return compute_metrics(task, preds, labels)["score"]

        snap = {}

        def on_epoch(rep, snap=snap) -> None:
            if rep.metrics["epoch"] == a.epochs - 1:
                snap["model"] = copy.deepcopy(rep.model).cpu().eval()
                raise _Stop()

        try:
            run(cfg, on_epoch=on_epoch)
        except _Stop:
            pass
        m0 = snap["model"]
        row = {"dual_lr": lr, "expected": float(gm.expected_sparsity(m0)), "before": score(m0)}
        for name, kw in (("unit", {}), ("aligned", {"align": 8}), ("apart", {"align": 8, "same_head_dim": False})):
            m = copy.deepcopy(m0)
            gm.pin_to_target(m, a.target, **kw)
            _, st = build_compressed(m, align=8)
            row[name] = (score(m), st.sparsity)
        rows.append(row)
        print(row, flush=True)
    print(f"\n{a.task}, {a.method}, target {a.target}, {a.max_train} examples, {a.epochs} epochs, batch {a.batch_size}, "
          f"seed {a.seed}, snapshot at the end of epoch {a.epochs - 1} (before the pin)\n")
    print("| dual lr | expected sparsity at the pin | score before | unit pin: score (exported) | aligned pin: score "
          "(exported) | aligned, Q/K and V/O widths apart: score (exported) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dual_lr']:g} | {r['expected']:.3f} | {r['before']:.3f} | {r['unit'][0]:.3f} ({r['unit'][1]:.0%}) "
              f"| {r['aligned'][0]:.3f} ({r['aligned'][1]:.0%}) | {r['apart'][0]:.3f} ({r['apart'][1]:.0%}) |")


if __name__ == "__main__":
    main()
