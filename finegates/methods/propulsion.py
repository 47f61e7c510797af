"""Propulsion (arXiv 2409.10927): outputs of the frozen linears scaled by ``z ** degree``. Layers:
:class:`finegates.baselines.PropulsionLinear`."""
from __future__ import annotations

from dataclasses import dataclass

from finegates import gated_model as gm
from finegates.methods.base import Choice, LogUniform, Method


@dataclass(frozen=True)
class PropulsionOptions:
    degree: int = 15
    targets: tuple[str, ...] | None = None  # slots; None: every slot of the family
    train_bias: bool = True  # the official code trains the biases of the targeted linears too


class Propulsion(Method):
    """Propulsion: outputs of the frozen Q, K, V, O, up, down scaled by ``z ** degree`` (default 15); their
    biases train too (``train_bias``, as the official code does: issue 11), so that its row compares with FineGates'."""

    name = "propulsion"
    help = "Propulsion: trainable output scales z**degree on the frozen linears (dense)"
    Options = PropulsionOptions
    search = {"lr": LogUniform(1e-4, 1e-2), "degree": Choice((5, 15, 35))}
    reference = {"lr": 2e-3, "degree": 15}
    reference_name = "Propulsion, degree 15, lr 2e-3"

    def prepare(self, model, cfg, total_steps, calibration=None):
        from finegates.baselines import PropulsionLinear, _replace

        opts = self.parse_options(cfg.extra)
        gm.freeze_all_but_head(model)
        _replace(model, opts.targets, lambda lin, i, s: PropulsionLinear(lin, opts.degree, opts.train_bias))
        return model
