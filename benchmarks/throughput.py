"""Training throughput: samples/s of FineGates beside peft LoRA (and full finetuning), same model,
same data, same batch size, CPU. Methods run in interleaved rounds; we report the median.

    python benchmarks/throughput.py --threads 2 --batch 16 --steps 8 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader

from finegates.config import TrainConfig
from finegates.gated_model import count_parameters
from finegates.methods import get_method
from finegates.train import _collator, embedded_model_dir, load_base
from tasks import get_task, load_task_data

VARIANTS = {
    "finegates (coupled, gates only)": dict(method="finegates", layout="coupled"),
    "finegates (independent, paper)": dict(method="finegates", layout="independent"),
    "finegates-lora (coupled, r=8)": dict(method="finegates", layout="coupled", rank=8),
    "peft LoRA r=8 (q, v)": dict(method="lora", rank=8, lr=1e-3),
    "full finetuning": dict(method="full", lr=5e-5),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-length", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    task = get_task("sst2")
    tok, _ = load_base(embedded_model_dir(), 2, task.label_names)
    data = load_task_data(task, tok, max_train=a.batch * a.steps, max_eval=8, seed=0, max_length=a.max_length)
    batches = list(DataLoader(data.train, batch_size=a.batch, collate_fn=_collator(tok)))
    setups = {}
    for name, kw in VARIANTS.items():
        cfg = TrainConfig(task="sst2", lam=1.0, **kw)
        _, model = load_base(embedded_model_dir(), 2, task.label_names)
        method = get_method(cfg.method)
        model = method.prepare(model, cfg, 100)
        opt = torch.optim.AdamW(method.param_groups(model, cfg))
        setups[name] = (model.train(), method, opt, count_parameters(model)[1])
    rates: dict[str, list[float]] = {n: [] for n in setups}
    for _ in range(a.rounds):
        for name, (model, method, opt, _) in setups.items():
            t0 = time.perf_counter()
            for step, b in enumerate(batches):
                loss = model(**b).loss
                reg = method.regularizer(model, step)
                (loss if reg is None else loss + reg).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                method.after_step()
            rates[name].append(a.batch * len(batches) / (time.perf_counter() - t0))
    lora = statistics.median(rates["peft LoRA r=8 (q, v)"])
    print(f"SST-2, MiniLM, CPU {a.threads} threads, batch {a.batch}, {len(batches)} steps/round, "
          f"median of {a.rounds} interleaved rounds")
    print("| method | trainable params | samples/s | vs LoRA |")
    print("|---|---:|---:|---:|")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"| {name} | {setups[name][3]:,} | {m:.1f} | {m / lora:.2f}x |")


if __name__ == "__main__":
    main()
