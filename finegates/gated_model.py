"""Putting gates into a Hugging Face classifier, and the sparsity penalties.

Supported: the families of :mod:`finegates.arch` (BERT/RoBERTa encoders, Llama-style decoders), which
say where the layers are, which linears of a layer are gated (the slots) and which units go together.

Two gate layouts:

* ``independent`` (the paper): a row and a column gate on every slot (BERT: Q, K, V, O, FFN-up,
  FFN-down). Residual-side gates (columns of Q/K/V/up, rows of O/down) can only be folded into weights;
  they never remove a parameter.
* ``coupled``: one gate per physically removable unit: rows of Q, K, V and FFN-up. A closed V row
  removes that row of V and the matching column of O; a closed up row removes an FFN neuron (its
  up row and down column); a closed Q or K row removes that dimension from both Q and K.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from finegates.arch import Family, get_family
from finegates.gates import Gate, GatedLinear

log = logging.getLogger(__name__)

LAYOUTS = ("independent", "coupled")
PENALTIES = ("controller", "paper", "code")
SLOTS = ("q", "k", "v", "o", "up", "down")  # BERT's slots (a family may have more: Llama's "gate")


class LayerGates:
    """The gated linears of one transformer layer, by slot (``lg.q``, ``lg.up``, ...)."""

    def __init__(self, meta: dict | None = None, **gated: GatedLinear) -> None:
        self.gated = dict(gated)
        self.meta = dict(meta or {})  # family facts, e.g. Llama's (heads, kv heads, head dim)

    def __getattr__(self, slot: str) -> GatedLinear:
        gated = self.__dict__.get("gated", {})
        if slot in gated:
            return gated[slot]
        raise AttributeError(slot)

    def items(self) -> list[tuple[str, GatedLinear]]:
        return list(self.gated.items())


def family_of(model: nn.Module) -> Family:
    """The model's family (:mod:`finegates.arch`); an :class:`~finegates.arch.UnsupportedModelError` if none."""
    return get_family(model)


def base_encoder(model: nn.Module) -> nn.Module:
    """The encoder module holding ``layer`` (BERT/RoBERTa only; kept for callers of the old name)."""
    return get_family("bert").encoder(model)


def apply_gates(model: nn.Module, *, layout: str = "coupled", rank: int = 0, lora_alpha: float | None = None,
                train_bias: bool = True, gate_init: str = "edge") -> list[LayerGates]:
    """Replace the six target linears of every layer by :class:`GatedLinear` (in place) and freeze
    everything but gates, LoRA, (optionally) the gated biases and the classification head."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown gate layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
    fam = family_of(model)
    freeze_all_but_head(model)
    layers: list[LayerGates] = []
    meta = fam.layer_meta(model)
    for layer in fam.layers(model):
        gated = {}
        for slot, (parent, attr) in fam.layer_modules(layer).items():
            base = getattr(parent, attr)
            row, col = fam.gate_sides(slot, layout)
            gl = GatedLinear(base, row=row, col=col, rank=rank, lora_alpha=lora_alpha, train_bias=train_bias,
                             gate_init=gate_init)
            gl.to(device=base.weight.device)
            setattr(parent, attr, gl)
            gated[slot] = gl
        layers.append(LayerGates(meta, **gated))
    model.finegates_layers = layers  # type: ignore[attr-defined]
    return layers


def trainable_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classification head, as the model's family defines it (BERT: pooler + classifier; RoBERTa:
    classifier.dense + classifier.out_proj; Llama: score)."""
    return family_of(model).head_parameters(model)


def freeze_all_but_head(model: nn.Module) -> None:
    """Freeze every parameter but the classification head (what every frozen-base method starts from)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable_head_parameters(model):
        p.requires_grad_(True)


def gated_layers(model: nn.Module) -> list[LayerGates]:
    layers = getattr(model, "finegates_layers", None)
    if layers is None:
        raise ValueError("model has no gates: call finegates.apply_gates first")
    return layers


def all_gates(model: nn.Module) -> list[Gate]:
    return [g for lg in gated_layers(model) for _, gl in lg.items() for g in gl.gates()]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [g.theta for g in all_gates(model)]


# ---------------------------------------------------------------------------------------------------
# Penalties and expected sparsity


def penalty_paper(model: nn.Module) -> torch.Tensor:
    """Gaussian-relaxed L0 (paper): mean over all gates of P(open)."""
    return torch.cat([g.p_open() for g in all_gates(model)]).mean()


def penalty_code(model: nn.Module, target_sparsity: float) -> torch.Tensor:
    """Official code: per gated linear 0.5 * (|mean_r P - keep| + |mean_c P - keep|), averaged."""
    keep = 1.0 - target_sparsity
    terms = []
    for lg in gated_layers(model):
        for _, gl in lg.items():
            parts = [(g.p_open().mean() - keep).abs() for g in gl.gates()]
            if parts:
                terms.append(sum(parts) / len(parts))
    return torch.stack(terms).mean()


def structural_sparsity(model: nn.Module, keep_fn) -> torch.Tensor:
    """Fraction of gated weight parameters removed when each gate keeps its units with ``keep_fn(gate)``
    (a probability per unit for the expectation, an indicator for a fixed structure).

    Which units go together is the family's (:meth:`finegates.arch.Family.layer_kept`). BERT: per layer,
    a Q/K dimension j survives iff Q-row j and K-row j are open; a V/O dimension iff V-row j and O-column
    j; an FFN neuron iff up-row j and down-column j. Each survivor keeps 2 * hidden weights.
    (Head padding at export can keep a few more; the exporter reports the true count.)
    """
    fam = family_of(model)
    kept, total = 0.0, 0
    for lg in gated_layers(model):
        k, t = fam.layer_kept(lg, keep_fn)
        kept = kept + k
        total += t
    return 1.0 - kept / total


def expected_sparsity(model: nn.Module) -> torch.Tensor:
    """Expected fraction of gated weight parameters that export removes (differentiable in the gates)."""
    return structural_sparsity(model, lambda g: g.p_open())


@torch.no_grad()
def closure_sparsity(model: nn.Module, threshold: float) -> float:
    """Removed fraction if every unit whose mu <= ``threshold`` were closed (as well as those already closed)."""
    return float(structural_sparsity(model, lambda g: ((g.mu > threshold) & ~g.closed()).float()))


@torch.no_grad()
def pin_to_target(model: nn.Module, target: float | None) -> float:
    """Fix the structure (see :meth:`Gate.pin`). With a ``target``, first close the least open units
    (lowest mu) until the removed fraction reaches it: CoFi's deterministic mask, which keeps the units
    with the largest scores in the number the L0 expectation asks for. Never reopens a closed unit.
    Returns the mu threshold used (-0.5: only the already closed units)."""
    lo = -0.5  # mu <= -0.5 is closed already
    if target is not None and closure_sparsity(model, lo) < target:
        hi = 1.0  # everything closed
        for _ in range(40):  # bisection on the threshold: closure_sparsity is monotone in it
            mid = 0.5 * (lo + hi)
            if closure_sparsity(model, mid) >= target:
                hi = mid
            else:
                lo = mid
        lo = hi
        for g in all_gates(model):
            g.theta.copy_(torch.where(g.mu <= lo, torch.full_like(g.theta, -3.0), g.theta))
    for g in all_gates(model):
        g.pin()
    return lo


class SparsityController(nn.Module):
    """CoFi-style Lagrangian that drives expected sparsity to a target (Xia et al. 2022).

    ``loss = l1 (s_hat - t) + l2 (s_hat - t)^2``; the gates minimise it, ``l1`` and ``l2`` maximise it
    (their own optimiser with a negative learning rate). ``t`` ramps linearly from 0 to the target over
    ``warmup_steps``.
    """

    def __init__(self, target: float, warmup_steps: int) -> None:
        super().__init__()
        self.target = target
        self.warmup_steps = max(int(warmup_steps), 0)
        self.l1 = nn.Parameter(torch.zeros(()))
        self.l2 = nn.Parameter(torch.zeros(()))

    def current_target(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.target
        return self.target * min(1.0, step / self.warmup_steps)

    def forward(self, s_hat: torch.Tensor, step: int) -> torch.Tensor:
        d = s_hat - self.current_target(step)
        return self.l1 * d + self.l2 * d * d


# ---------------------------------------------------------------------------------------------------
# Counting


@torch.no_grad()
def gate_sparsity(model: nn.Module) -> float:
    """Fraction of gates whose eval value is 0."""
    closed = torch.cat([g.closed() for g in all_gates(model)])
    return float(closed.float().mean())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
