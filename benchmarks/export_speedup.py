"""Export speedup against its physical limit (FLOP count), MiniLM on CPU.

For each target sparsity, close the same fraction of FFN neurons, Q/K dimensions and V/O dimensions in
every head of every layer (chosen at random), export, and time the exported model against the dense
Hugging Face model in the same process on the same batch (interleaved, median of repeats). The ideal
speedup is the ratio of matmul FLOPs (projections, FFN, attention scores and context).

    python benchmarks/export_speedup.py --threads 2 --batch 32 --length 128 --repeats 15
"""
from __future__ import annotations

import argparse

import torch

from finegates.export import build_compressed
from finegates.gated_model import apply_gates
from finegates.latency import make_inputs, time_models, torch_threads
from finegates.train import embedded_model_dir, load_base


def flops(layers: list[dict], hidden: int, tokens: int, length: int, batch: int) -> float:
    f = 0.0
    for s in layers:
        H, dqk, dv, inter = s["num_heads"], s["qk_dim"], s["v_dim"], s["intermediate_size"]
        f += 2 * tokens * hidden * (2 * H * dqk + 2 * H * dv + 2 * inter)  # Q, K, V, O, up, down
        f += 2 * batch * H * length * length * (dqk + dv)  # scores and context
    return f


def gated_at(fraction: float, seed: int = 0):
    torch.manual_seed(seed)
    _, model = load_base(embedded_model_dir(), 2, ("negative", "positive"))
    layers = apply_gates(model, layout="coupled")
    H = model.config.num_attention_heads
    dh = model.config.hidden_size // H
    with torch.no_grad():
        for lg in layers:
            for gate, unit in ((lg.up.row_gate, None), (lg.q.row_gate, dh), (lg.v.row_gate, dh)):
                n = gate.theta.numel()
                if unit is None:
                    idx = torch.randperm(n)[: round(fraction * n)]
                else:  # the same number of dims in every head: no padding
                    k = round(fraction * unit)
                    idx = torch.cat([h * unit + torch.randperm(unit)[:k] for h in range(n // unit)])
                gate.theta[idx] = -3.0
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fractions", default="0,0.2,0.4,0.6")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    _, dense = load_base(embedded_model_dir(), 2, ("negative", "positive"))
    dense.eval()
    cfg = dense.config
    H, dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    full = [{"num_heads": H, "qk_dim": dh, "v_dim": dh, "intermediate_size": cfg.intermediate_size}] * cfg.num_hidden_layers
    T = a.batch * a.length
    f_dense = flops(full, cfg.hidden_size, T, a.length, a.batch)
    inputs = make_inputs(a.batch, a.length, cfg.vocab_size)
    models = {"dense (HF)": dense}
    stats = {}
    for fr in [float(x) for x in a.fractions.split(",")]:
        small, st = build_compressed(gated_at(fr))
        name = f"exported {fr:.0%}"
        models[name] = small
        stats[name] = (st.sparsity, f_dense / flops(small.config.layers, cfg.hidden_size, T, a.length, a.batch))
    with torch_threads(a.threads):
        lat = time_models(models, inputs, repeats=a.repeats, warmup=2, threads=a.threads)
    print(f"MiniLM, CPU, {a.threads} threads, batch {a.batch} x {a.length} tokens, median of {a.repeats} "
          "interleaved repeats")
    print("| model | sparsity | latency ms | measured speedup | ideal (FLOPs) | measured / ideal |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| dense (HF) | 0.0% | {lat['dense (HF)']:.1f} | 1.00 | 1.00 | - |")
    for name, (sp, ideal) in stats.items():
        s = lat["dense (HF)"] / lat[name]
        print(f"| {name} | {sp:.1%} | {lat[name]:.1f} | {s:.2f} | {ideal:.2f} | {s / ideal:.2f} |")


if __name__ == "__main__":
    main()
