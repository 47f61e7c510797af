"""benchmarks/throughput.py --malloc hold: glibc keeps the memory a train step frees for the next step."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

THROUGHPUT = Path(__file__).parents[1] / "benchmarks" / "throughput.py"

# Run in a fresh process, since the setting is process-wide: where a 16 MiB block comes from (bytes glibc maps for it
# alone, which it unmaps when the block is freed), then the minor page faults of 4 rounds of a step-like pattern
# (one round: 8 steps over SST-2 batch lengths, each holding 6 layers' activations, then freeing them).
PROBE = """
import ctypes, json, resource, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                              "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "hold":
    import importlib.util
    spec = importlib.util.spec_from_file_location("throughput", sys.argv[2])
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    assert throughput.hold_freed_memory()  # mallopt took both thresholds
m0 = libc.mallinfo2().hblkhd
block = torch.empty(4 << 20)
mapped = libc.mallinfo2().hblkhd - m0
del block
def step(n):
    held = [torch.empty(16 * n * w).fill_(1.0) for w in (384, 384, 384, 1536, 384) * 6]
    probs = torch.empty(16 * 12 * n * n).fill_(1.0)
    del probs, held
faults = []
for _ in range(4):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for n in (47, 42, 36, 51, 41, 47, 27, 47):
        step(n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"mapped": mapped, "faults": faults}))
"""


def probe(mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", PROBE, mode, str(THROUGHPUT)], capture_output=True, text=True, timeout=180,
                       check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _glibc_malloc() -> bool:
    """glibc >= 2.33 (mallinfo2) is the allocator: no other one preloaded."""
    import os
    import platform

    lib, version = platform.libc_ver()
    return (lib == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 33)
            and "LD_PRELOAD" not in os.environ)


@pytest.mark.skipif(not _glibc_malloc(), reason="glibc's malloc (>= 2.33) only")
def test_held_memory_comes_from_the_heap_and_is_reused_without_page_faults():
    """By default glibc maps a 16 MiB block on its own (and unmaps it when it is freed: the next one is faulted in
    again); held, it comes from the heap, and every round after the first reuses what the first faulted in."""
    default, held = probe("default"), probe("hold")
    assert default["mapped"] >= 16 << 20, default
    assert held["mapped"] == 0, held
    assert held["faults"][0] > 1000 and sum(held["faults"][1:]) < 200, held

