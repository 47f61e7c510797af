"""SpaRTA (arXiv 2502.15975): trainable sparse deltas at random positions of W_v and W_o. Layers:
:class:`finegates.baselines.SpartaLinear`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from finegates import gated_model as gm
from finegates.errors import ConfigError
from finegates.methods.base import LogUniform, Method


@dataclass(frozen=True)
class SpartaOptions:
    density: float = 0.01  # fraction of the targeted weights that train
    targets: tuple[str, ...] = ("v", "o")

    def check(self) -> None:
        if not 0 < self.density <= 1:
            raise ConfigError(f"sparta density={self.density!r} is invalid; accepted: a number in (0, 1]")


class Sparta(Method):
    """SpaRTA: trainable sparse deltas at random positions of W_v and W_o (``density``, default 1%)."""

    name = "sparta"
    help = "SpaRTA: sparse trainable deltas in W_v and W_o (dense)"
    Options = SpartaOptions
    search = {"lr": LogUniform(1e-4, 1e-2), "density": LogUniform(0.002, 0.01)}
    reference = {"lr": 2e-3, "density": 0.01}
    reference_name = "SpaRTA, 1% of W_v and W_o, lr 2e-3"

    def prepare(self, model, cfg, total_steps, calibration=None):
        from finegates.baselines import SpartaLinear, _replace

        opts = self.parse_options(cfg.extra)
        gm.freeze_all_but_head(model)
        g = torch.Generator().manual_seed(cfg.seed)
        _replace(model, opts.targets, lambda lin, i, s: SpartaLinear(lin, opts.density, g).to(lin.weight.device))
        return model
