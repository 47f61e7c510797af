"""BitFit (Ben Zaken et al. 2022, arXiv 2106.10199): only the bias terms of the model train, with the
classification head. The bias-only baseline: FineGates trains the biases of its gated linears too, so this
row says how much of FineGates' accuracy the biases alone would give."""
from __future__ import annotations

from torch import nn

from finegates import gated_model as gm
from finegates.methods.base import LogUniform, Method


class BitFit(Method):
    """BitFit: every bias of the model (attention, FFN, LayerNorm) trains, and the head; nothing else."""

    name = "bitfit"
    help = "BitFit: only the biases (every linear and LayerNorm) and the head train (dense)"
    search = {"lr": LogUniform(1e-4, 1e-2)}
    reference = {"lr": 2e-3}  # the learning rate FineGates trains its gated biases with
    reference_name = "BitFit, every bias, lr 2e-3"

    def prepare(self, model: nn.Module, cfg, total_steps: int, calibration: list[dict] | None = None) -> nn.Module:
        gm.freeze_all_but_head(model)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
        return model
