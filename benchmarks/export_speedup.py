"""Export speedup against its physical limit (FLOP count): the dense Hugging Face model and exported
models, aligned (``align=8``, one head dim for Q/K and V/O) and exact minimal (``align=1``), all timed in
one process on the same batch, interleaved, median of ``--repeats`` forward passes.

Models: for each fraction in ``--fractions``, the same fraction of FFN neurons, Q/K dimensions and V/O
dimensions in every head of every layer of the embedded MiniLM is closed at random (``--closure
scattered``: that fraction of each layer's dims, anywhere, so heads keep different widths), then exported
with each ``--aligns`` value; with ``--checkpoints`` exported FineGates checkpoints (e.g. ``runs/sst2/model``)
are re-exported with each alignment instead. The ideal speedup is the ratio of matmul FLOPs (projections,
FFN, attention scores and context) of the exact minimal layout; "layout FLOPs" is the same ratio for the
exported layout itself (padding included).

    # GPU (defaults there: batch 32 and 256 x 128 tokens, fp32 and bf16 autocast, 20 repeats)
    python benchmarks/export_speedup.py --device cuda
    # CPU
    python benchmarks/export_speedup.py --device cpu --threads 2 --batches 32 --repeats 15
    # a check that everything runs (CPU, tiny inputs, < 1 minute)
    python benchmarks/export_speedup.py --smoke-test
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch

from finegates.export import build_compressed, check_align, load_compressed
from finegates.gated_model import apply_gates
from finegates.latency import make_inputs, speedup_stats, time_samples, torch_threads
from finegates.train import load_base, resolve_model

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "other", -1: "error"}


def flops(layers: list[dict], hidden: int, tokens: int, length: int, batch: int) -> float:
    f = 0.0
    for s in layers:
        H, dqk, dv, inter = s["num_heads"], s["qk_dim"], s["v_dim"], s["intermediate_size"]
        f += 2 * tokens * hidden * (2 * H * dqk + 2 * H * dv + 2 * inter)  # Q, K, V, O, up, down
        f += 2 * batch * H * length * length * (dqk + dv)  # scores and context
    return f


def gated_at(base: torch.nn.Module, fraction: float, seed: int = 0, closure: str = "equal") -> torch.nn.Module:
    """A gated copy of ``base`` with ``fraction`` of its FFN neurons and of its Q/K and V/O dims closed at
    random: the same number in every head (``equal``: no head padding), or anywhere in the layer
    (``scattered``: heads of one layer keep different widths, as after training)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    layers = apply_gates(model, layout="coupled")
    H = model.config.num_attention_heads
    dh = model.config.hidden_size // H
    with torch.no_grad():
        for lg in layers:
            for gate, unit in ((lg.up.row_gate, None), (lg.q.row_gate, dh), (lg.v.row_gate, dh)):
                n = gate.theta.numel()
                if unit is None or closure == "scattered":
                    idx = torch.randperm(n)[: round(fraction * n)]
                else:  # the same number of dims in every head: no head padding
                    k = round(fraction * unit)
                    idx = torch.cat([h * unit + torch.randperm(unit)[:k] for h in range(n // unit)])
                gate.theta[idx] = -3.0
    return model.eval()


def sdpa_kernels(layers: list[dict], head_dim: int, length: int, device: torch.device,
                 dtype: torch.dtype) -> str:
    """The SDPA backends torch picks for these layers' shapes (no mask: the benchmark has no padding)."""
    seen: list[str] = []
    for s in layers:
        if s["num_heads"] == 0:
            continue
        q = torch.zeros(1, s["num_heads"], length, s["qk_dim"], device=device, dtype=dtype)
        v = torch.zeros(1, s["num_heads"], length, s["v_dim"], device=device, dtype=dtype)
        try:
            name = KERNELS.get(int(torch._fused_sdp_choice(q, q, v, None, 0.0, False, scale=head_dim ** -0.5)), "?")
        except Exception:  # noqa: BLE001 - a private API; the column is informative only
            name = "?"
        if name not in seen:
            seen.append(name)
    return "/".join(seen) or "-"


def build_models(a: argparse.Namespace, dense: torch.nn.Module, aligns: list[int]) -> list[dict]:
    """One record per exported model: name, model, align, stats, minimal layers, max |logit diff|."""
    probe = make_inputs(4, min(a.length, 32), dense.config.vocab_size, seed=1)
    probe["attention_mask"][1, probe["input_ids"].shape[1] // 2:] = 0  # one padded row: the mask path too
    out = []
    if a.checkpoints:
        paths = [Path(c) for c in a.checkpoints.split(",")]
        sources = [(c.parent.name if c.name == "model" else c.name, load_compressed(c, dtype="fp32")) for c in paths]
    else:
        sources = ((f"{float(fr):.0%}", gated_at(dense, float(fr), closure=a.closure))  # one at a time
                   for fr in a.fractions.split(","))
    for label, src in sources:
        with torch.no_grad():
            ref = src(**probe).logits
        minimal, _ = build_compressed(src, align=1, same_head_dim=False)
        for al in aligns:
            small, st = build_compressed(src, align=al)
            with torch.no_grad():
                diff = float((small(**probe).logits - ref).abs().max())
            out.append({"name": f"exported {label} align={al}", "label": label, "model": small, "align": al,
                        "stats": st, "minimal": minimal.config.layers, "diff": diff})
        del src
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--fractions", default="0.1,0.3,0.5", help="closed fraction of every unit type, per model")
    p.add_argument("--closure", choices=("equal", "scattered"), default="equal",
                   help="equal: the same number of dims closed in every head; scattered: anywhere in the layer")
    p.add_argument("--checkpoints", default=None, help="exported FineGates checkpoints to re-export instead")
    p.add_argument("--aligns", default="1,8")
    p.add_argument("--batches", "--batch", default=None, help="default: 32,256 on cuda, 32 on cpu")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--precisions", default=None, help="fp32, bf16 and/or fp16 autocast; default: fp32,bf16 on "
                   "cuda, fp32 on cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--model", default=None, help="model dir (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--smoke-test", action="store_true", help="tiny CPU run that checks everything works")
    a = p.parse_args(argv)
    if a.smoke_test:
        a.device, a.fractions, a.batches, a.length, a.precisions = "cpu", "0.3", "2", 16, "fp32,bf16"
        a.repeats, a.warmup, a.threads = 3, 1, 1
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; accepted: auto, cpu")
    batches = [int(b) for b in (a.batches or ("32,256" if cuda else "32")).split(",")]
    precisions = (a.precisions or ("fp32,bf16" if cuda else "fp32")).split(",")
    for pr in precisions:
        if pr not in PRECISIONS:
            p.error(f"--precisions: {pr!r} is not valid; accepted: {', '.join(PRECISIONS)}")
    try:
        aligns = [check_align(int(x)) for x in a.aligns.split(",")]
    except ValueError as e:
        p.error(f"--aligns: {e}")
    t0 = time.perf_counter()
    with torch_threads(a.threads if not cuda else None):
        _, dense = load_base(resolve_model(a.model), 2, ("negative", "positive"))
        dense = dense.float().eval()
        records = build_models(a, dense, aligns)
    cfg = dense.config
    H, dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    full = [{"num_heads": H, "qk_dim": dh, "v_dim": dh,
             "intermediate_size": cfg.intermediate_size}] * cfg.num_hidden_layers
    dense_gated = cfg.num_hidden_layers * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size)
    models = {"dense (HF)": dense.to(device)}
    for r in records:
        models[r["name"]] = r["model"].to(device)
    where = (torch.cuda.get_device_name(device) if cuda else f"CPU, {a.threads} threads")
    what = f"checkpoints {a.checkpoints}" if a.checkpoints else f"MiniLM, {a.closure} random closures"
    print(f"{what}, {where}, torch {torch.__version__}, {cfg.num_hidden_layers} layers x {H} heads of {dh}; "
          f"{a.length} tokens; median of {a.repeats} interleaved forward passes ({a.warmup} warm-up)")
    print("max |logit diff| of each export vs its source model (fp32, batch with padding): "
          + ", ".join(f"{r['name']}: {r['diff']:.1e}" for r in records))
    print()
    print("| precision | batch | model | align | removed | latency ms | speedup (q25-q75) | ideal (FLOPs) "
          "| measured / ideal | layout FLOPs | SDPA kernel |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for pr in precisions:
        amp = PRECISIONS[pr]
        kdtype = amp or torch.float32  # under autocast the projections, hence q, k, v, are in this dtype
        for B in batches:
            inputs = make_inputs(B, a.length, cfg.vocab_size, device=device)
            T = B * a.length
            f_dense = flops(full, cfg.hidden_size, T, a.length, B)
            samples = time_samples(models, inputs, repeats=a.repeats, warmup=a.warmup,
                                   threads=None if cuda else a.threads, autocast=amp)
            dense_ms = samples["dense (HF)"]
            print(f"| {pr} | {B} | dense (HF) | - | 0.0% | {statistics.median(dense_ms):.2f} | 1.00 | 1.00 | - | 1.00 | "
                  f"{sdpa_kernels(full, dh, a.length, device, kdtype)} |")
            for r in records:
                ideal = f_dense / flops(r["minimal"], cfg.hidden_size, T, a.length, B)
                layout = f_dense / flops(r["model"].config.layers, cfg.hidden_size, T, a.length, B)
                st = speedup_stats(dense_ms, samples[r["name"]])  # per-round ratios: median and quartiles
                s = st["speedup"]
                kern = sdpa_kernels(r["model"].config.layers, dh, a.length, device, kdtype)
                print(f"| {pr} | {B} | exported {r['label']} | {r['align']} | "
                      f"{1 - r['stats'].gated_params_after / dense_gated:.1%} | {st['latency_ms']:.2f} | "
                      f"{s:.2f} ({st['speedup_q25']:.2f}-{st['speedup_q75']:.2f}) | {ideal:.2f} | {s / ideal:.2f} | "
                      f"{layout:.2f} | {kern} |")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if not all(math.isfinite(r["diff"]) and r["diff"] <= 1e-3 for r in records):
        raise SystemExit("an export does not reproduce its source model's logits")


if __name__ == "__main__":
    main()
