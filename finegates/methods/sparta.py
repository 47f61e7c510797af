"""SpaRTA (arXiv 2502.15975): trainable sparse deltas at random positions of W_v and W_o. Layers:
:class:`finegates.baselines.SpartaLinear`.

``density`` counts as in the official code (IBM/SpaRTA, ``sparsify.py``) by default (``scope="model"``): the
number of trainable deltas is ``density`` times the parameters of the whole base model (embeddings
included, the classification head not), and they are placed uniformly at random in the targeted
matrices, the same fraction of each. ``scope="targets"`` makes ``density`` the fraction of each targeted
matrix instead (what this project did before).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finegates import gated_model as gm
from finegates.errors import ConfigError
from finegates.methods.base import LogUniform, Method

SCOPES = ("model", "targets")


@dataclass(frozen=True)
class SpartaOptions:
    density: float = 0.01  # fraction of the base model's parameters (scope "model") or of each target that trains
    targets: tuple[str, ...] = ("v", "o")
    scope: str = "model"

    def check(self) -> None:
        if not 0 < self.density <= 1:
            raise ConfigError(f"sparta density={self.density!r} is invalid; accepted: a number in (0, 1]")
        if not self.targets:
            raise ConfigError("sparta option targets=[] is invalid; accepted: a non-empty list of slots")
        if self.scope not in SCOPES:
            raise ConfigError(f"sparta scope={self.scope!r} is invalid; accepted: {', '.join(SCOPES)}")


def target_fraction(model: nn.Module, opts: SpartaOptions) -> float:
    """The fraction of each targeted weight matrix that trains; a ConfigError if ``density`` asks for more
    deltas than the targets hold."""
    from finegates.baselines import _layer_slots

    gm.check_slots(gm.family_of(model), "sparta option targets", opts.targets)
    if opts.scope == "targets":
        return opts.density
    total = sum(p.numel() for p in getattr(model, "base_model", model).parameters())
    targeted = sum(getattr(parent, attr).weight.numel()
                   for _, slot, parent, attr in _layer_slots(model) if slot in opts.targets)
    keep = opts.density * total
    if keep > targeted:
        raise ConfigError(f"sparta density={opts.density!r} asks for {keep:,.0f} trainable weights (of the model's "
                          f"{total:,}), more than {'/'.join(opts.targets)} hold ({targeted:,}); accepted: density <= "
                          f"{targeted / total:.4g} with scope 'model', or scope 'targets'")
    return keep / targeted


class Sparta(Method):
    """SpaRTA: trainable sparse deltas at random positions of W_v and W_o (``density`` of the model's
    parameters, default 1%, as the official code counts it)."""

    name = "sparta"
    help = "SpaRTA: sparse trainable deltas in W_v and W_o (dense)"
    Options = SpartaOptions
    search = {"lr": LogUniform(1e-4, 1e-2), "density": LogUniform(0.002, 0.01)}
    reference = {"lr": 2e-3, "density": 0.01}
    reference_name = "SpaRTA, 1% of the model's weights (in W_v and W_o), lr 2e-3"

    def check(self, model, cfg) -> None:
        target_fraction(model, self.parse_options(cfg.extra))

    def prepare(self, model, cfg, total_steps, calibration=None):
        from finegates.baselines import SpartaLinear, _replace

        opts = self.parse_options(cfg.extra)
        fraction = target_fraction(model, opts)  # counted before anything is replaced or frozen
        gm.freeze_all_but_head(model)
        g = torch.Generator().manual_seed(cfg.seed)
        _replace(model, opts.targets, lambda lin, i, s: SpartaLinear(lin, fraction, g).to(lin.weight.device))
        return model
