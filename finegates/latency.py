"""Latency of a forward pass: several models timed in the same process, on the same inputs, interleaved.

Each model gets ``warmup`` untimed passes, then the models run in turn (A B A B ...) ``repeats`` times;
we report the median per model, so drifts of a shared machine hit every model alike. On CUDA every pass
is bracketed by ``torch.cuda.synchronize()``; ``autocast`` (e.g. ``torch.bfloat16``) runs the passes
under ``torch.autocast`` on the inputs' device.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from finegates.locking import file_lock


@contextmanager
def torch_threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_inputs(batch: int, length: int, vocab_size: int, seed: int = 0,
                device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab_size, 20000), (batch, length), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


@torch.inference_mode()
def time_samples(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], repeats: int = 10,
                 warmup: int = 2, threads: int | None = None, autocast: torch.dtype | None = None
                 ) -> dict[str, list[float]]:
    """Milliseconds of each timed forward pass per model (round ``i`` of every model is interleaved)."""
    cuda = inputs["input_ids"].is_cuda
    times: dict[str, list[float]] = {k: [] for k in models}
    amp = (torch.autocast(inputs["input_ids"].device.type, dtype=autocast) if autocast is not None
           else nullcontext())
    with torch_threads(threads), amp:
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                m(**inputs)
        for _ in range(repeats):
            for name, m in models.items():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(**inputs)
                if cuda:
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def speedup_stats(dense: list[float], exported: list[float]) -> dict[str, float]:
    """Median latencies and the speedup (dense / exported) with its spread: the median and the quartiles
    of the per-round ratios (each round times both models back to back)."""
    ratios = sorted(d / e for d, e in zip(dense, exported))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
    return {"latency_ms": statistics.median(exported), "dense_latency_ms": statistics.median(dense),
            "speedup": statistics.median(ratios), "speedup_q25": q[0], "speedup_q75": q[2]}


GPU_TIMING_LOCK = os.path.join(tempfile.gettempdir(), "finegates-gpu-timing.lock")


@contextmanager
def gpu_timing_lock(path: str = GPU_TIMING_LOCK):
    """Trials that share a GPU (fractional ``--gpus-per-trial``) take turns to time: one timing phase at a
    time per machine, so no timing runs beside another one (training may still run beside it)."""
    with file_lock(path):
        yield


def gpu_half_precision(bf16_supported: bool) -> tuple[str, torch.dtype]:
    """The half-precision autocast a GPU is timed in: bf16 where the GPU supports it, else fp16 (e.g. a V100
    or a T4), with the name its metrics and ``latency_device`` carry."""
    return ("bf16", torch.bfloat16) if bf16_supported else ("fp16", torch.float16)


def measure_latency(dense: nn.Module, exported: nn.Module, *, batch: int, length: int, repeats: int, seed: int = 0,
                    threads: int | None = None, gpu: bool | None = None) -> dict[str, object]:
    """Latency of the exported model against the dense one where the trial runs.

    Always on the CPU (fp32): ``cpu_latency_ms``, ``cpu_dense_latency_ms``, ``cpu_speedup`` (+ quartiles).
    With a GPU also there, fp32 and half-precision autocast, under :func:`gpu_timing_lock`: ``gpu_fp32_*`` and
    ``gpu_bf16_*`` (``gpu_fp16_*`` on a GPU without bf16, :func:`gpu_half_precision`, and ``latency_note``
    says so). ``latency_ms``, ``dense_latency_ms``, ``speedup`` (+ quartiles) are those of the trial's device
    (GPU half precision when there is a GPU), and ``latency_device`` says which (``cuda-bf16 (<name>)`` or
    ``cuda-fp16 (<name>)``); on a CPU-only machine ``latency_note`` says that only the CPU was timed. Both
    models are moved back to the CPU.
    """
    gpu = torch.cuda.is_available() if gpu is None else gpu
    inputs = make_inputs(batch, length, exported.config.vocab_size, seed=seed)
    t = time_samples({"dense": dense.cpu().eval(), "exported": exported.cpu().eval()}, inputs, repeats=repeats,
                     threads=threads)
    cpu = speedup_stats(t["dense"], t["exported"])
    out: dict[str, object] = {f"cpu_{k}": v for k, v in cpu.items()}
    if not gpu:
        return out | cpu | {"latency_device": "cpu", "latency_note": "no GPU on this worker: CPU latency only"}
    dev = torch.device("cuda")
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    half, half_dtype = gpu_half_precision(torch.cuda.is_bf16_supported())
    try:
        with gpu_timing_lock():
            models = {"dense": dense.to(dev), "exported": exported.to(dev)}
            for name, amp in (("fp32", None), (half, half_dtype)):
                t = time_samples(models, inputs, repeats=max(repeats, 20), warmup=3, autocast=amp)
                out |= {f"gpu_{name}_{k}": v for k, v in speedup_stats(t["dense"], t["exported"]).items()}
    finally:
        dense.cpu()
        exported.cpu()
    out |= {k: out[f"gpu_{half}_{k}"] for k in cpu} | {"latency_device": f"cuda-{half} ({torch.cuda.get_device_name()})"}
    if half != "bf16":
        out["latency_note"] = f"this GPU has no bf16: timed in {half} autocast (gpu_{half}_*)"
    return out
