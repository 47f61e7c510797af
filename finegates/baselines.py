"""The methods FineGates is compared with, each behind the :class:`finegates.methods.Method` interface.

All keep the base weights frozen (but ``full``), train the classification head, and export through
the same exporter: their layers provide ``folded()`` (an equivalent plain weight and bias), so none
of them prunes (sparsity 0) and all are timed alike. Facts from ../shared/METHOD.md:

* GIFT-SW (arXiv 2408.15300): per targeted linear, the ``k`` most salient input columns (largest
  activation norm on a calibration pass over the task's train data) train; the frozen columns get
  Gaussian noise ``Delta * xi / 2`` during training only, ``Delta = alpha / (2^(b-1) - 1)`` (b = 4),
  ``alpha`` the per-row clipping scale minimising the 4-bit quantisation error.
* SpaRTA (arXiv 2502.15975): a random subset of individual weights (``density``) of W_v and W_o
  trains as sparse deltas added into W.
* Propulsion (arXiv 2409.10927): each frozen linear's output is scaled elementwise by ``z ** degree``,
  z initialised to ones.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from finegates.gated_model import SLOTS, family_of

log = logging.getLogger(__name__)
ALL_SLOTS = SLOTS  # BERT's six; ``None`` as targets means every slot of the model's family


def _layer_slots(model: nn.Module):
    """(layer index, slot, parent, attr) of every target linear, as the model's family places them."""
    fam = family_of(model)
    for i, layer in enumerate(fam.layers(model)):
        for slot, (parent, attr) in fam.layer_modules(layer).items():
            yield i, slot, parent, attr


def _replace(model: nn.Module, slots: Iterable[str] | None, make) -> list[nn.Module]:
    """Replace the given slots (None: all) of every layer by ``make(linear, layer_index, slot)``."""
    new = []
    for i, slot, parent, attr in list(_layer_slots(model)):
        if slots is None or slot in slots:
            mod = make(getattr(parent, attr), i, slot)
            setattr(parent, attr, mod)
            new.append(mod)
    return new


# ---------------------------------------------------------------------------------------------------
# GIFT-SW


def quant_clip_scale(w: torch.Tensor, bits: int = 4, steps: int = 100) -> torch.Tensor:
    """Per-row alpha = p * max|w| (p = 1.00, 0.99, ...) minimising the symmetric b-bit quantisation error."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1).clamp_min(1e-12)  # (m,)
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for i in range(steps):
        alpha = amax * (1.0 - 0.01 * i)
        s = (alpha / qmax)[:, None]
        q = torch.clamp(torch.round(w / s), -qmax - 1, qmax) * s
        err = ((q - w) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, alpha, best)
    return best


class GiftLinear(nn.Module):
    """Frozen W with ``k`` trainable salient columns; noise on the frozen columns in training only."""

    def __init__(self, base: nn.Linear, salient: torch.Tensor, bits: int = 4) -> None:
        super().__init__()
        w = base.weight.detach().clone()  # (m, n)
        self.register_buffer("weight", w)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.register_buffer("salient", salient.long())  # (k,)
        self.salient_weight = nn.Parameter(w[:, self.salient].clone())  # (m, k): trains
        frozen = torch.ones(w.shape[1], dtype=torch.bool)
        frozen[self.salient] = False
        self.register_buffer("frozen_mask", frozen.to(w.dtype))  # (n,)
        self.register_buffer("delta", quant_clip_scale(w, bits) / (2 ** (bits - 1) - 1))  # (m,)
        self.in_features, self.out_features = base.in_features, base.out_features

    def _weight(self) -> torch.Tensor:
        w = self.weight
        if self.training:
            w = w + self.delta[:, None] * torch.randn_like(w) / 2 * self.frozen_mask[None, :]
        return w.index_copy(1, self.salient, self.salient_weight.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight.float().index_copy(1, self.salient, self.salient_weight.float())
        return w, None if self.bias is None else self.bias.float().clone()


@torch.no_grad()
def activation_norms(model: nn.Module, batches: list[dict], slots: Iterable[str] | None
                     ) -> dict[tuple[int, str], torch.Tensor]:
    """Per-input-column L2 norm of the activations entering each targeted linear (calibration)."""
    norms: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, slot, parent, attr in _layer_slots(model):
        if slots is not None and slot not in slots:
            continue

        def hook(mod, inp, out, key=(i, slot)):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            norms[key] = norms.get(key, 0) + (x * x).sum(0)

        hooks.append(getattr(parent, attr).register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for b in batches:
            model(**{k: v for k, v in b.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {k: v.sqrt() for k, v in norms.items()}


# ---------------------------------------------------------------------------------------------------
# SpaRTA


class SpartaLinear(nn.Module):
    """Frozen W plus trainable deltas at a fixed random subset of positions."""

    def __init__(self, base: nn.Linear, density: float, generator: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("weight", base.weight.detach().clone())
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        n = self.weight.numel()
        k = max(1, round(density * n))
        self.register_buffer("index", torch.randperm(n, generator=generator)[:k].sort().values)
        self.delta = nn.Parameter(torch.zeros(k))
        self.in_features, self.out_features = base.in_features, base.out_features

    def _weight(self) -> torch.Tensor:
        return self.weight.flatten().index_add(0, self.index, self.delta.to(self.weight.dtype)).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._weight().float(), None if self.bias is None else self.bias.float().clone()


# ---------------------------------------------------------------------------------------------------
# Propulsion


class PropulsionLinear(nn.Module):
    """``y = (W x + b) * z ** degree`` with a trainable z (ones at init), and b trainable if ``train_bias``."""

    def __init__(self, base: nn.Linear, degree: int, train_bias: bool = False) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        if train_bias and base.bias is not None:
            base.bias.requires_grad_(True)
        self.degree = degree
        self.z = nn.Parameter(torch.ones(base.out_features))
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * (self.z ** self.degree).to(x.dtype)

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = (self.z.float() ** self.degree)
        b = None if self.base.bias is None else self.base.bias.float() * s
        return self.base.weight.float() * s[:, None], b
