"""GIFT-SW (arXiv 2408.15300): salient columns train, the rest frozen with quantisation-scaled noise
(training only). Layers: :class:`finegates.baselines.GiftLinear`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from finegates import gated_model as gm
from finegates.errors import ConfigError
from finegates.methods.base import Choice, LogUniform, Method


@dataclass(frozen=True)
class GiftSWOptions:
    k: int = 16  # salient columns per linear (the paper's 128 is for 4096-wide LLMs; MiniLM is 384 wide)
    bits: int = 4  # quantisation bits of the noise scale
    targets: tuple[str, ...] | None = None  # slots; None: every slot of the family

    def check(self) -> None:
        if self.k < 1 or self.bits < 2:
            raise ConfigError(f"gift-sw k={self.k}, bits={self.bits} are invalid; accepted: k >= 1, bits >= 2")


class GiftSW(Method):
    """GIFT-SW: salient columns train, the rest frozen with quantisation-scaled noise (training only).

    Options: ``k`` salient columns per linear (default 16), ``bits`` = 4, ``targets`` (default all slots).
    """

    name = "gift-sw"
    help = "GIFT-SW: k salient input columns per linear train, noise on the rest (dense)"
    Options = GiftSWOptions
    search = {"lr": LogUniform(1e-4, 3e-3), "k": Choice((8, 16, 32))}
    reference = {"lr": 1e-3, "k": 16}
    reference_name = "GIFT-SW, 16 salient columns per linear, lr 1e-3"

    def prepare(self, model, cfg, total_steps, calibration=None):
        from finegates.baselines import GiftLinear, _replace, activation_norms

        if not calibration:
            raise ValueError("gift-sw needs calibration batches from the task's train data")
        opts = self.parse_options(cfg.extra)
        gm.freeze_all_but_head(model)
        norms = activation_norms(model, calibration, opts.targets)

        def make(lin, i, slot):
            sal = torch.topk(norms[(i, slot)], min(opts.k, lin.in_features)).indices.sort().values
            return GiftLinear(lin, sal.to(lin.weight.device), opts.bits).to(lin.weight.device)

        _replace(model, opts.targets, make)
        return model
