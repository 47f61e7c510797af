"""The optimiser's share of a train step: AdamW as torch builds it by default against fused AdamW (what
``finegates.methods.base.adamw`` builds since session 23), on each method's real trainable tensors (MiniLM, SST-2's
head), with gradients of the same shapes. Median of ``--repeats`` steps after 10 uncounted, per method and form.

    python benchmarks/optimiser_step.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from finegates.config import TrainConfig
from finegates.methods import get_method
from finegates.methods.base import adamw
from finegates.train import load_base, resolve_model
from tasks import get_task

METHODS = {"finegates (coupled, gates only)": dict(method="finegates"),
           "finegates-lora (coupled, r=8)": dict(method="finegates-lora"),
           "peft LoRA r=8 (q, v)": dict(method="lora", rank=8, lr=1e-3)}


def step_ms(opt: torch.optim.Optimizer, params: list[torch.Tensor], repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    times = []
    for i in range(10 + repeats):
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        t0 = time.perf_counter()
        opt.step()
        if i >= 10:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model_dir, task = resolve_model(None), get_task("sst2")
    print(f"CPU {a.threads} threads, torch {torch.__version__}; ms per optimiser step (median of {a.repeats})")
    print("| method | trainable tensors | AdamW, torch's default | AdamW fused (adamw) | fused / default |")
    print("|---|---:|---:|---:|---:|")
    for name, kw in METHODS.items():
        cfg = TrainConfig(task="sst2", **kw)
        _, model = load_base(model_dir, 2, task.label_names)
        method = get_method(cfg.method)
        model = method.prepare(model, cfg, 100)
        groups = method.param_groups(model, cfg)
        params = [t for g in groups for t in g["params"]]
        plain = step_ms(torch.optim.AdamW([dict(g) for g in groups]), params, a.repeats)
        fused = step_ms(adamw([dict(g) for g in groups]), params, a.repeats)
        print(f"| {name} | {len(params)} | {plain:.2f} | {fused:.2f} | {fused / plain:.2f}x |")


if __name__ == "__main__":
    main()
