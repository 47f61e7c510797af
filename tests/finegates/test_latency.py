"""The half precision a GPU is timed in (no GPU here: the choice itself, a pure function)."""
import torch

from finegates.latency import gpu_half_precision


def test_a_gpu_without_bf16_is_timed_in_fp16_and_labelled_so():
    assert gpu_half_precision(True) == ("bf16", torch.bfloat16)
    assert gpu_half_precision(False) == ("fp16", torch.float16)  # e.g. a V100 or a T4: no bf16 autocast
