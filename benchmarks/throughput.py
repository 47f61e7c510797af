"""Training throughput: samples/s of FineGates beside peft LoRA (and full finetuning), same model,
same data, same batch size, on the CPU or a GPU (bf16 autocast there, as `finegates.train` trains).
Methods run in interleaved rounds; we report the median and the min-max over rounds.

    python benchmarks/throughput.py --threads 2 --batch 16 --steps 8 --rounds 5
    python benchmarks/throughput.py --device cuda --batch 32 --steps 30 --rounds 7
    python benchmarks/throughput.py --threads 2 --batch 16 --steps 8 --rounds 1 --profile   # where the time goes
    python benchmarks/throughput.py --count-ops      # ATen ops one train step dispatches, per phase (exact)
    python benchmarks/throughput.py --count-ops --autocast bf16   # the same under autocast, as a GPU step runs
    python benchmarks/throughput.py --compile --only "gates only"   # every model under torch.compile
    python benchmarks/throughput.py --malloc hold    # glibc keeps freed memory: no page faults in a step (session 22)

A GPU step of this small model is bound by how many ops it launches more than by FLOPs, so ``--count-ops``
counts, for one train step of each variant, the ATen ops that do work (view-like ops, which launch no
kernel, left out): forward, penalty, backward, optimiser. The counts are exact and the same on every
machine (the optimiser is fused AdamW, ``finegates.methods.base.adamw``: one multi-tensor op per group on every
device, since session 23).

    python benchmarks/throughput.py --batch 1 --max-length 8 --steps 16 --rounds 7 --phases   # a step's fixed costs
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch
from torch.utils.data import DataLoader

from finegates.config import TrainConfig
from finegates import gated_model as gm
from finegates.export import DEFAULT_ALIGN
from finegates.gated_model import count_parameters
from finegates.latency import gpu_half_precision
from finegates.methods import get_method
from finegates.methods.base import adamw
from finegates.train import _collator, load_base, resolve_model
from tasks import get_task, load_task_data

VARIANTS = {
    "finegates (coupled, gates only)": dict(method="finegates", layout="coupled"),
    # K's row gate on K's output, as before session 22 (the same function; today it scales Q's output with Q's gate)
    "finegates (coupled, gates only), K's gate on K": dict(method="finegates", layout="coupled", separate=True),
    "finegates (independent, paper)": dict(method="finegates", layout="independent"),
    "finegates-lora (coupled, r=8)": dict(method="finegates", layout="coupled", rank=8),
    "finegates-lora (coupled, r=8 on q, v)": dict(method="finegates", layout="coupled", rank=8,
                                                 extra={"lora_slots": ["q", "v"]}),
    "peft LoRA r=8 (q, v)": dict(method="lora", rank=8, lr=1e-3),
    "full finetuning": dict(method="full", lr=5e-5),
    # the recovery phase (after the pin, the last 30% of a run by default): 40% of the gated weights removed
    "finegates (coupled, gates only), recovery at 40% removed, full widths":
        dict(method="finegates", layout="coupled", recovery=0.4, extra={"compact_recovery": False}),
    "finegates (coupled, gates only), recovery at 40% removed, compacted":
        dict(method="finegates", layout="coupled", recovery=0.4),
    "finegates-lora (coupled, r=8), recovery at 40% removed, compacted":
        dict(method="finegates", layout="coupled", rank=8, recovery=0.4),
}
LORA = "peft LoRA r=8 (q, v)"

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def hold_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a step frees for the next step, for the rest of the process; True if set.

    By default glibc hands freed memory back to the OS (it trims its heap's top past a threshold and unmaps large
    blocks), with thresholds that move with what the process frees, and memory handed back is faulted in and zeroed
    again when the next step touches it. A FineGates step did that (hundreds of minor page faults per step, a LoRA
    step fewer; the count is a column of the table). Here the trim threshold is 1 GiB and blocks below 32 MiB come
    from the heap. Measured no faster, within this machine's noise (docs/BENCHMARKS.md, session 22), so
    finegates.train does not set it."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1


def put_in_recovery(model, method, removed: float) -> None:
    """The state of a FineGates run after its pin, made directly: seeded random gates, pinned to ``removed``
    of the gated weights in the aligned layout the exporter writes (``pin_to_target``, the least open units
    closed), the penalty off; the open units alone are computed unless the variant sets
    ``compact_recovery`` false (``gated_model.compact``, what a run does at its pin)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in gm.all_gates(model):
            gate.theta.add_(torch.randn(gate.theta.shape, generator=g) * 0.3)
    gm.pin_to_target(model, removed, align=DEFAULT_ALIGN)
    method.recovery_start = method.pinned_at = 0  # in recovery from step 0, already pinned
    if method.parse_options(method.cfg.extra).compact_recovery:
        method.compacted = gm.compact(model)


PHASES = ("forward", "penalty", "backward", "optimiser", "after step")


def train_round(model, method, opt, batches, amp=contextlib.nullcontext(), phases: dict | None = None,
                sync=lambda: None) -> None:
    """Train steps over ``batches`` as ``finegates.train`` takes them: forward and the method's penalty (under
    ``amp``), backward, optimiser, the method's after-step. ``phases``: each phase's seconds are appended to
    ``phases[name]`` (``sync`` called before each reading: a GPU's queue drained, so its phases are its own)."""
    last = 0.0

    def mark(name=None):
        nonlocal last
        if phases is not None:
            sync()
            now = time.perf_counter()
            if name is not None:
                phases.setdefault(name, []).append(now - last)
            last = now

    for step, b in enumerate(batches):
        mark()
        with amp:
            loss = model(**b).loss
            mark("forward")
            reg = method.regularizer(model, step)
            mark("penalty")
        (loss if reg is None else loss + reg).backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimiser")
        method.after_step()
        mark("after step")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--model", default=None, help="model dir (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--profile", action="store_true", help="then profile one round of FineGates (gates only) and "
                   "of LoRA with torch.profiler: the top operators by self time")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast, fp16 where bf16 is missing)")
    p.add_argument("--count-ops", action="store_true", help="only count the ATen ops of one train step per variant")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="on the CPU: train under CPU bf16 autocast (with --count-ops: "
                   "the casts a GPU step makes; a GPU always trains under autocast)")
    p.add_argument("--compile", action="store_true", help="wrap every model in torch.compile (default backend); "
                   "the warm-up round compiles, for each batch shape, and its time is printed apart")
    p.add_argument("--malloc", choices=("default", "hold"), default="default",
                   help="default: glibc's own thresholds, as finegates.train runs; hold: glibc keeps the memory a step "
                   "frees for the next one (hold_freed_memory; process-wide, set before anything is built)")
    p.add_argument("--phases", action="store_true", help="also the median time of each phase of a step (forward, "
                   "penalty, backward, optimiser, after step) over the counted rounds; on a GPU each reading waits for "
                   "its queue. At --batch 1 --max-length 8 a step's arithmetic is next to nothing: what is left is what "
                   "the host does per step, the CPU's stand-in for a GPU step bound by its launches")
    p.add_argument("--only", action="append", default=None, metavar="TEXT", help="only the variant named TEXT, or "
                   "else those whose name contains TEXT; repeatable (peft LoRA, the reference, always runs)")
    a = p.parse_args()
    if a.device not in ("cpu", "cuda"):
        p.error(f"--device: {a.device!r} is not valid; accepted: cpu, cuda")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; accepted: cpu")
    if a.compile and a.count_ops:
        p.error("--compile with --count-ops: not valid; accepted: one of them (ops are counted in eager mode)")
    if a.malloc == "hold" and not hold_freed_memory():
        p.error("--malloc hold: this C library has no glibc mallopt; accepted here: --malloc default")
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    half_name, half = gpu_half_precision(torch.cuda.is_bf16_supported()) if cuda else (None, None)
    torch.set_num_threads(a.threads)
    model_dir = resolve_model(a.model)
    task = get_task("sst2")
    tok, _ = load_base(model_dir, 2, task.label_names)
    data = load_task_data(task, tok, max_train=a.batch * a.steps, max_eval=8, seed=0, max_length=a.max_length)
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in DataLoader(data.train, batch_size=a.batch, collate_fn=_collator(tok))]
    setups = {}
    for text in a.only or []:
        if not any(text in n for n in VARIANTS):
            p.error(f"--only {text!r} names no variant; accepted: a part of one of {', '.join(VARIANTS)}")
    # a whole variant name selects that variant alone; any other text, every variant whose name contains it
    variants = {n: kw for n, kw in VARIANTS.items()
                if not a.only or n == LORA or any(n == t if t in VARIANTS else t in n for t in a.only)}
    for name, kw in variants.items():
        kw = dict(kw)
        recovery = kw.pop("recovery", None)
        separate = kw.pop("separate", False)
        cfg = TrainConfig(task="sst2", lam=1.0, **kw)
        _, model = load_base(model_dir, 2, task.label_names)
        method = get_method(cfg.method)
        model = method.prepare(model, cfg, 100).to(device)
        if separate:
            gm.separate_row_gates(model)
        if recovery is not None:
            put_in_recovery(model, method, recovery)
        opt = adamw(method.param_groups(model, cfg))
        setups[name] = (model.train() if not a.compile else torch.compile(model.train()), method, opt,
                        count_parameters(model)[1])
    rates: dict[str, list[float]] = {n: [] for n in setups}
    faults: dict[str, list[int]] = {n: [] for n in setups}  # minor page faults of the process during each round
    amp = torch.autocast("cuda", dtype=half) if cuda else contextlib.nullcontext()
    if a.autocast == "bf16" and not cuda:
        amp = torch.autocast("cpu", dtype=torch.bfloat16)

    phases: dict[str, dict[str, list[float]]] = {n: {} for n in setups}

    def one_round(model, method, opt, times=None) -> None:
        train_round(model, method, opt, batches, amp, times, torch.cuda.synchronize if cuda else lambda: None)
        if cuda:
            torch.cuda.synchronize()

    if a.count_ops:
        print(f"ATen ops of one train step (after one warm-up step), batch {a.batch} x {a.max_length}, view-like ops "
              f"left out; optimiser counted on {a.device}" + (", CPU bf16 autocast" if a.autocast == "bf16" else ""))
        print("| method | forward | penalty | backward | forward + penalty + backward | optimiser |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, (model, method, opt, _) in setups.items():
            n = count_ops(model, method, opt, batches[0], amp)
            print(f"| {name} | {n[0]} | {n[1]} | {n[2]} | {sum(n[:3])} | {n[3]} |")
        return

    for rnd in range(a.rounds + 1):  # round 0 warms up (kernels, allocator; with --compile, compiles) uncounted
        for name, (model, method, opt, _) in setups.items():
            if cuda:
                torch.cuda.synchronize()
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            one_round(model, method, opt, phases[name] if a.phases and rnd else None)
            if rnd:
                rates[name].append(a.batch * len(batches) / (time.perf_counter() - t0))
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            elif a.compile:  # as it goes: a run stopped by a time limit still says how long compiling took
                print(f"warm-up round (compiling): {name} {time.perf_counter() - t0:.0f} s", flush=True)
    lora = rates[LORA]
    where = (f"{torch.cuda.get_device_name(device)}, {half_name} autocast" if cuda
             else f"CPU {a.threads} threads")
    print(f"SST-2, MiniLM, {where}, torch {torch.__version__}, batch {a.batch} x {a.max_length} tokens, "
          f"{len(batches)} steps/round, median (min-max) of {a.rounds} interleaved rounds after one warm-up round"
          + (", every model under torch.compile" if a.compile else "") + f", malloc {a.malloc}")
    print("| method | trainable params | samples/s | vs LoRA (per-round ratios) | minor page faults per step |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rates.items():
        ratios = [x / y for x, y in zip(r, lora)]
        f = [n / len(batches) for n in faults[name]]
        print(f"| {name} | {setups[name][3]:,} | {statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f}) | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{statistics.median(f):,.0f} ({min(f):,.0f}-{max(f):,.0f}) |")
    if a.phases:
        print("\nper phase of a step, ms (median over the counted rounds' steps)")
        print("| method | " + " | ".join(PHASES) + " | sum |")
        print("|---|" + "---:|" * (len(PHASES) + 1))
        for name, ph in phases.items():
            med = [1e3 * statistics.median(ph[k]) for k in PHASES]
            print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {sum(med):.2f} |")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for name in [n for n in ("finegates (coupled, gates only)", LORA) if n in setups]:
            with profile(activities=activities) as prof:
                one_round(*setups[name][:3])
            print(f"\n{name}: one round of {len(batches)} steps")
            print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                            row_limit=12))


VIEW_OPS = {"view", "t", "transpose", "detach", "_unsafe_view", "expand", "as_strided", "split", "split_with_sizes",
            "unsqueeze", "squeeze", "slice", "select", "permute", "alias", "unbind", "narrow"}


def count_ops(model, method, opt, batch, amp) -> list[int]:
    """ATen ops that do work in one train step: [forward, penalty, backward, optimiser] (after a warm-up step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ not in VIEW_OPS
            return func(*args, **(kwargs or {}))

    counts = []
    for step in range(2):
        c = [Count() for _ in range(4)]
        with c[0], amp:
            loss = model(**batch).loss
        with c[1], amp:
            reg = method.regularizer(model, step)
        with c[2]:
            (loss if reg is None else loss + reg).backward()
        with c[3]:
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.after_step()
        counts = [x.n for x in c]
    return counts


if __name__ == "__main__":
    main()
