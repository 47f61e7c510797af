"""A fused row gate, tried in session 9 and not kept (docs/BENCHMARKS.md, "Tried and dropped").

GatedLinear scales its output (tokens x m) by the row gate. The fused form folds the gate into the weight,
``x (z W)^T + z b``, in a custom autograd function whose backward takes the ungated output as ``y / z``
(where ``z = 0`` the gate is clamped or pinned and gets no gradient). This script times it against
GatedLinear's forward on the real MiniLM, two ways, on the CPU:

* one layer, forward and backward, on a full batch (16 x 128 tokens): median of 30 interleaved calls;
* a real train step (SST-2, FineGates gates only, batches padded to their longest sentence), interleaved
  rounds as in benchmarks/throughput.py, and the ATen ops of one step (``throughput.count_ops``).

    python benchmarks/fused_row_gate.py --threads 2 --rounds 9
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import count_ops, train_round  # noqa: E402

from finegates.config import TrainConfig  # noqa: E402
from finegates.gates import GatedLinear  # noqa: E402
from finegates.gated_model import separate_row_gates  # noqa: E402
from finegates.methods import get_method  # noqa: E402
from finegates.methods.base import adamw  # noqa: E402
from finegates.train import _collator, load_base, resolve_model  # noqa: E402
from tasks import get_task, load_task_data  # noqa: E402


class RowGatedLinear(torch.autograd.Function):
    """``F.linear(x, w, b) * z`` for a frozen ``w``, computed as ``F.linear(x, z w, z b)`` (fp32, no autocast)."""

    @staticmethod
    def forward(ctx, x, w, b, z):
        wz = w * z[:, None]
        y = F.linear(x, wz, None if b is None else b * z)
        ctx.save_for_backward(y, wz, z)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, wz, z = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = gy @ wz if ctx.needs_input_grad[0] else None
        gb = g2.sum(0).mul_(z) if ctx.needs_input_grad[2] else None
        gz = (g2 * y.reshape(-1, y.shape[-1])).sum(0).div_(z).nan_to_num_(0.0)  # z = 0: y = 0 there, 0 / 0
        return gx, None, gb, gz


def fused_forward(self: GatedLinear, x: torch.Tensor) -> torch.Tensor:
    """GatedLinear.forward with the row gate fused into the weight (no LoRA, no column gate: the coupled
    gates-only layout this script times)."""
    if self.row_gate is None:
        return F.linear(x, self.weight, self.bias)
    return RowGatedLinear.apply(x, self.weight, self.bias, self.row_gate.value(self.weight.dtype))


def layer_times(repeats: int) -> list[str]:
    out = []
    for m in (384, 1536):
        x = torch.randn(16, 128, 384, requires_grad=True)
        w, b = torch.randn(m, 384) * 0.05, torch.randn(m, requires_grad=True)
        theta = torch.randn(m, requires_grad=True)

        def plain(z):
            return F.linear(x, w, b) * z

        def fused(z):
            return RowGatedLinear.apply(x, w, b, z)

        z0 = torch.clamp(torch.tanh(theta) + 0.5 + 0.1 * torch.randn(m), 0, 1).detach().requires_grad_()
        got = []
        for fn in (plain, fused):  # same output and gradients (x, bias, gate), up to fp32 rounding
            x.grad = b.grad = z0.grad = None
            y = fn(z0)
            y.backward(torch.sin(torch.arange(y.numel(), dtype=torch.float32)).view_as(y))
            got.append([y.detach(), x.grad, b.grad, z0.grad])
        live = z0.detach() > 0  # at z = 0 the clamp before it passes no gradient: the fused form gives 0 there
        got[0][3], got[1][3] = got[0][3][live], got[1][3][live]
        diff = max(float((u - v).abs().max() / v.abs().max()) for u, v in zip(*got))
        times = {plain: [], fused: []}
        for _ in range(repeats):
            for fn in times:
                t0 = time.perf_counter()
                z = torch.clamp(torch.tanh(theta) + 0.5 + 0.1 * torch.randn(m), 0, 1)
                fn(z).backward(torch.full((16, 128, m), 0.01))
                times[fn].append(time.perf_counter() - t0)
        out.append(f"| 384 -> {m}, 16 x 128 tokens | {1e3 * statistics.median(times[plain]):.1f} ms | "
                   f"{1e3 * statistics.median(times[fused]):.1f} ms | {diff:.1e} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="steps per round")
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU {a.threads} threads, torch {torch.__version__}")
    print("| one gated linear, forward + backward | today (scale the output) | fused (scale the weight) | "
          "largest relative difference (output, gradients; the gate's where z > 0) |")
    print("|---|---:|---:|---:|")
    print("\n".join(layer_times(30)))

    model_dir = resolve_model(None)
    task = get_task("sst2")
    tok, _ = load_base(model_dir, 2, task.label_names)
    data = load_task_data(task, tok, max_train=a.batch * a.steps, max_eval=8, seed=0, max_length=128)
    batches = list(DataLoader(data.train, batch_size=a.batch, collate_fn=_collator(tok)))
    setups = {}
    for name in ("today", "fused"):
        # the fused forward knows nothing of compaction: keep full widths should a long run pass its pin
        cfg = TrainConfig(task="sst2", method="finegates", layout="coupled", extra={"compact_recovery": False})
        _, model = load_base(model_dir, 2, task.label_names)
        method = get_method(cfg.method)
        model = method.prepare(model, cfg, 100).train()
        separate_row_gates(model)  # the fused forward knows no pairs (K's gate on Q's output): both forms without them
        if name == "fused":
            for mod in model.modules():
                if isinstance(mod, GatedLinear):
                    mod.forward = types.MethodType(fused_forward, mod)
        setups[name] = (model, method, adamw(method.param_groups(model, cfg)))
    rates = {n: [] for n in setups}
    for rnd in range(a.rounds + 1):  # round 0 warms up
        for name, (model, method, opt) in setups.items():
            t0 = time.perf_counter()
            train_round(model, method, opt, batches)
            if rnd:
                rates[name].append(a.batch * len(batches) / (time.perf_counter() - t0))
    ops = {n: sum(count_ops(*s, batches[0], contextlib.nullcontext())[:3]) for n, s in setups.items()}
    print(f"\nSST-2 train step, FineGates gates only, batch {a.batch} (padded to the longest sentence), median "
          f"(min-max) of {a.rounds} interleaved rounds of {len(batches)} steps")
    print("| forward | samples/s | fused / today (per-round ratios) | ATen ops, forward + penalty + backward |")
    print("|---|---:|---:|---:|")
    for name, r in rates.items():
        ratios = [x / y for x, y in zip(r, rates["today"])]
        print(f"| {name} | {statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f}) | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {ops[name]} |")


if __name__ == "__main__":
    main()
