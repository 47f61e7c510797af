"""Full finetuning: every parameter trains (the usual upper reference)."""
from __future__ import annotations

from torch import nn

from finegates.methods.base import LogUniform, Method


class Full(Method):
    """Full finetuning: every parameter trains (the usual upper reference)."""

    name = "full"
    help = "full finetuning, every parameter trains (dense reference)"
    search = {"lr": LogUniform(1e-5, 2e-4)}
    reference = {"lr": 5e-5}
    reference_name = "full finetuning, lr 5e-5"

    def prepare(self, model: nn.Module, cfg, total_steps: int, calibration: list[dict] | None = None) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
