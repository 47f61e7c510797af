"""Helpers shared by every family's exporter (finegates/arch/*): folded weights, kept rows, aligned widths,
and the export statistics. No family knowledge here."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

DEFAULT_ALIGN = 8
NO_CAP = 1 << 62


@dataclass
class ExportStats:
    gated_params_before: int
    gated_params_after: int  # weights of the gated linears in the exported model (padding included)
    params_total: int  # parameters of the exported model
    # what gated_params_after would be with align=1 and separate Q/K and V/O head dims (exact minimal layout)
    gated_params_minimal: int | None = None

    @property
    def sparsity(self) -> float:
        """Removed fraction of the gated weights, counted from the exported tensors (padding counts as present)."""
        return 1.0 - self.gated_params_after / self.gated_params_before

    @property
    def sparsity_minimal(self) -> float:
        """Removed fraction in the exact minimal layout (align=1): what the gates removed, before alignment."""
        kept = self.gated_params_after if self.gated_params_minimal is None else self.gated_params_minimal
        return 1.0 - kept / self.gated_params_before


def check_align(align: object) -> int:
    """``align`` as an int, or a one-line ValueError naming it and the accepted values."""
    if isinstance(align, bool) or not isinstance(align, numbers.Integral) or int(align) < 1:
        raise ValueError(f"align={align!r} is not valid; accepted: a positive integer "
                         f"(1 = exact minimal widths, {DEFAULT_ALIGN} = default)")
    return int(align)


def aligned_width(n: int, align: int, cap: int) -> int:
    """``n`` rounded up to a multiple of ``align``, but never above ``cap`` (the source width); 0 stays 0."""
    assert 0 <= n <= cap, (n, cap)
    return min(-(-n // align) * align, cap)


def nonzero_rows(w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    keep = w.abs().sum(dim=1) > 0
    if b is not None:
        keep |= b != 0
    return keep


def folded(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode (weight, bias) of a target linear with gates / deltas / scales folded in (fp32, CPU; a
    missing bias is returned as zeros)."""
    if callable(getattr(module, "folded", None)):  # GatedLinear and the baselines' layers
        w, b = module.folded()
    elif isinstance(module, nn.Linear):
        w, b = module.weight.detach().float(), None if module.bias is None else module.bias.detach().float()
    else:
        raise ValueError(f"cannot export a layer of type {type(module).__name__}; merge adapters first")
    w, b = w.float().cpu(), (b.float().cpu() if b is not None else None)
    return w, (b if b is not None else torch.zeros(w.shape[0]))


def check_activation(name: str) -> None:
    """Removing or padding an FFN neuron is exact only if act(0) = 0 (GELU, ReLU, SiLU, tanh)."""
    act = ACT2FN[name] if isinstance(name, str) else name
    if float(act(torch.zeros(1)).abs().max()) != 0.0:
        raise ValueError(f"hidden_act={name!r} has act(0) != 0, so FFN neurons cannot be removed exactly; "
                         "supported: activations with act(0) = 0 (gelu, relu, silu, tanh, ...)")


def gather_rows(w: torch.Tensor, b: torch.Tensor | None, idx: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``idx`` of ``w`` (and ``b``); index -1 gives a zero row (exact padding)."""
    valid = idx >= 0
    w2 = torch.zeros(len(idx), w.shape[1], dtype=w.dtype)
    w2[valid] = w[idx[valid]]
    if b is None:
        return w2, None
    b2 = torch.zeros(len(idx), dtype=b.dtype)
    b2[valid] = b[idx[valid]]
    return w2, b2


def gather_cols(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Columns ``idx`` of ``w``; index -1 gives a zero column (exact padding)."""
    valid = idx >= 0
    w2 = torch.zeros(w.shape[0], len(idx), dtype=w.dtype)
    w2[:, valid] = w[:, idx[valid]]
    return w2
