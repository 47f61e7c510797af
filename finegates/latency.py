"""Latency of a forward pass: several models timed in the same process, on the same inputs, interleaved.

Each model gets ``warmup`` untimed passes, then the models run in turn (A B A B ...) ``repeats`` times;
we report the median per model, so drifts of a shared machine hit every model alike. On CUDA every pass
is bracketed by ``torch.cuda.synchronize()``; ``autocast`` (e.g. ``torch.bfloat16``) runs the passes
under ``torch.autocast`` on the inputs' device.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


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
def time_models(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], repeats: int = 10,
                warmup: int = 2, threads: int | None = None, autocast: torch.dtype | None = None
                ) -> dict[str, float]:
    """Median milliseconds of one forward pass per model."""
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
    return {k: statistics.median(v) for k, v in times.items()}
