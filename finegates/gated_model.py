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

import itertools
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from finegates.arch import Family, get_family
from finegates.errors import ConfigError
from finegates.gates import PINNED_OPEN_MIN, Batched, Gate, GatedLinear, compact_gather, gate_values, p_open_all

log = logging.getLogger(__name__)

LAYOUTS = ("independent", "coupled")
PENALTIES = ("controller", "paper", "code")
CLOSE_SCHEDULES = ("gradual", "aligned", "at-pin")  # when units close that the controller has not closed in time (TrainConfig)
DUAL_RESETS = ("none", "crossing")  # controller: when its linear multiplier restarts from 0 (TrainConfig.dual_reset)
RECOVERY_LRS = ("constant", "linear")  # the learning rates during the recovery (TrainConfig.recovery_lr)
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
                train_bias: bool = True, gate_init: str = "edge",
                lora_slots: tuple[str, ...] | list[str] | None = None) -> list[LayerGates]:
    """Replace the six target linears of every layer by :class:`GatedLinear` (in place) and freeze
    everything but gates, LoRA, (optionally) the gated biases and the classification head. With ``rank``
    > 0, LoRA goes inside the gates of the ``lora_slots`` (default: every slot)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown gate layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
    fam = family_of(model)
    check_lora_slots(fam, lora_slots)
    freeze_all_but_head(model)
    layers: list[LayerGates] = []
    meta = fam.layer_meta(model)
    for layer in fam.layers(model):
        gated = {}
        for slot, (parent, attr) in fam.layer_modules(layer).items():
            base = getattr(parent, attr)
            row, col = fam.gate_sides(slot, layout)
            r = rank if lora_slots is None or slot in lora_slots else 0
            gl = GatedLinear(base, row=row, col=col, rank=r, lora_alpha=lora_alpha, train_bias=train_bias,
                             gate_init=gate_init)
            gl.to(device=base.weight.device)
            setattr(parent, attr, gl)
            gated[slot] = gl
        for a, b in fam.row_gate_pairs(model):
            if gated[a].row_gate is not None and gated[b].row_gate is not None:
                gated[a].pair_row_gate(gated[b])
        layers.append(LayerGates(meta, **gated))
    model.finegates_layers = layers  # type: ignore[attr-defined]
    model.register_forward_pre_hook(_gate_pass_begin)
    model.register_forward_hook(_gate_pass_end, always_call=True)
    return layers


def separate_row_gates(model: nn.Module) -> None:
    """Every row gate on its own linear's output again, none applied on a pair's (``Family.row_gate_pairs``): the same
    function, one pass more per pair; for comparisons (benchmarks/throughput.py, tests)."""
    for lg in gated_layers(model):
        for _, gl in lg.items():
            gl.unpair_row_gate()


def check_slots(fam: Family, option: str, slots) -> None:
    """A ConfigError naming ``option`` if ``slots`` has a slot that ``fam``'s layers do not have."""
    bad = sorted(set(slots or ()) - set(fam.slots))
    if bad:
        raise ConfigError(f"{option}={list(slots)!r} is invalid ({', '.join(bad)}); "
                          f"accepted: slots of {fam.name}: {', '.join(fam.slots)}")


def check_lora_slots(fam: Family, lora_slots) -> None:
    check_slots(fam, "finegates option lora_slots", lora_slots)


def _gate_pass_begin(model: nn.Module, args) -> None:
    """Before a forward of the gated model: every gate evaluated in one chain of ops (the speed of a train
    step on a GPU is set by how many ops it launches). The cast to the activations' dtype happens inside
    the forward, once for all gates (``Gate.value``): a pre-hook runs outside an autocast that wraps
    ``forward`` itself, as accelerate's does. The gated biases and the LoRA factors likewise: under autocast
    they are cast in one op each for the whole model, compacted gathered in one op (``gates.Batched``); and
    an input that feeds several linears (Q, K, V) is cast once for all of them."""
    gates = all_gates(model)
    values = gate_values(gates, getattr(model, "finegates_gather", None))
    for i, g in enumerate(gates):
        _set_plain(g, "batched", (values, i))
    linears = _gated_linears(model)
    last_cast: list = [None]  # under autocast, an input cast once for the linears it feeds one after another
    for gl in linears:
        _set_plain(gl, "input_casts", last_cast)
    with_bias = [gl for gl in linears if gl.bias is not None]
    biases = Batched([gl.bias for gl in with_bias], [(gl.out_width,) for gl in with_bias],
                     getattr(model, "finegates_bias_gather", None))
    for i, gl in enumerate(with_bias):
        _set_plain(gl, "batched_bias", (biases, i))
    with_lora = [gl for gl in linears if gl.lora_A is not None]
    if with_lora:
        factors = Batched([t for gl in with_lora for t in (gl.lora_A, gl.lora_B)],
                          [s for gl in with_lora for s in ((gl.rank, gl.in_width), (gl.out_width, gl.rank))],
                          getattr(model, "finegates_lora_gather", None))
        for i, gl in enumerate(with_lora):
            _set_plain(gl, "batched_lora", (factors, 2 * i))


def _gate_pass_end(model: nn.Module, args, output) -> None:
    for g in all_gates(model):
        _set_plain(g, "batched", None)
    for gl in _gated_linears(model):
        _set_plain(gl, "batched_bias", None)
        _set_plain(gl, "batched_lora", None)
        _set_plain(gl, "input_casts", None)


def _set_plain(module: nn.Module, name: str, value) -> None:
    """``module.name = value`` for an attribute that is never a parameter, buffer or submodule (the per-forward state
    above): ``nn.Module.__setattr__`` checks all three on each write, and the hooks make 228 writes a forward on
    MiniLM (docs/BENCHMARKS.md, "A step's fixed costs"; a GPU step of this model is set by such host work)."""
    object.__setattr__(module, name, value)


def _gated_linears(model: nn.Module) -> list[GatedLinear]:
    return [gl for lg in gated_layers(model) for _, gl in lg.items()]


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
    return [g for gl in _gated_linears(model) for g in gl.gates()]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [g.theta for g in all_gates(model)]


# ---------------------------------------------------------------------------------------------------
# Penalties and expected sparsity


def penalty_paper(model: nn.Module) -> torch.Tensor:
    """Gaussian-relaxed L0 (paper): mean over all gates of P(open)."""
    return torch.cat(p_open_all(all_gates(model))).mean()


def penalty_code(model: nn.Module, target_sparsity: float) -> torch.Tensor:
    """Official code: per gated linear 0.5 * (|mean_r P - keep| + |mean_c P - keep|), averaged."""
    keep = 1.0 - target_sparsity
    p = _p_open_by_gate(model)
    terms = []
    for lg in gated_layers(model):
        for _, gl in lg.items():
            parts = [(p[id(g)].mean() - keep).abs() for g in gl.gates()]
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
    kept, total = family_of(model).layers_kept(gated_layers(model), keep_fn)
    return 1.0 - kept / total


def expected_sparsity(model: nn.Module) -> torch.Tensor:
    """Expected fraction of gated weight parameters that export removes (differentiable in the gates)."""
    p = _p_open_by_gate(model)
    return structural_sparsity(model, lambda g: p[id(g)])


def _p_open_by_gate(model: nn.Module) -> dict[int, torch.Tensor]:
    """id(gate) -> its P(open), all computed in one chain of ops."""
    gates = all_gates(model)
    return {id(g): p for g, p in zip(gates, p_open_all(gates))}


@torch.no_grad()
def closure_sparsity(model: nn.Module, threshold: float) -> float:
    """Removed fraction if every unit whose mu <= ``threshold`` were closed (as well as those already closed)."""
    return float(structural_sparsity(model, lambda g: ((g.mu > threshold) & ~g.closed()).float()))


def compact(model: nn.Module) -> bool:
    """After the pin: every gated layer computes only its pinned-open units (the family's
    :meth:`~finegates.arch.Family.compact`), exactly: logits and gradients are those of the full widths up to
    float rounding. False where the family does not compact (nothing changed)."""
    if len({gl.weight.device for gl in _gated_linears(model)}) > 1:
        log.info("recovery at full widths: the gated linears are on several devices")
        return False
    done = family_of(model).compact(model, gated_layers(model))
    if done:  # the compacted gates' values, the kept rows of the biases and the kept parts of the LoRA factors, in
        # one gather each per forward; the gathers are buffers (not saved) so that .to() moves them with the model
        model.register_buffer("finegates_gather", compact_gather(all_gates(model)), persistent=False)
        linears = _gated_linears(model)
        dev = linears[0].weight.device
        model.register_buffer("finegates_bias_gather", _concat_index(
            [(gl.bias.numel(), _rows(gl.out_index, gl.out_features)) for gl in linears if gl.bias is not None], dev),
            persistent=False)
        model.register_buffer("finegates_lora_gather", _concat_index(
            [part for gl in linears if gl.lora_A is not None for part in (
                (gl.lora_A.numel(), _block(torch.arange(gl.rank), _rows(gl.in_index, gl.in_features), gl.in_features)),
                (gl.lora_B.numel(), _block(_rows(gl.out_index, gl.out_features), torch.arange(gl.rank), gl.rank)))],
            dev), persistent=False)
    return done


def _rows(index: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.arange(n) if index is None else index.cpu()


def _block(rows: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Flat indices of the block ``rows x cols`` of a row-major matrix with ``n_cols`` columns."""
    return (rows[:, None] * n_cols + cols[None, :]).reshape(-1)


def _concat_index(parts: list[tuple[int, torch.Tensor]], device: torch.device) -> torch.Tensor | None:
    """One gather over the concatenation of flattened tensors: ``parts`` is (numel, flat indices kept) per tensor."""
    if not parts:
        return None
    offsets = itertools.accumulate((n for n, _ in parts[:-1]), initial=0)
    return torch.cat([idx + off for (_, idx), off in zip(parts, offsets)]).to(device)


def uncompact(model: nn.Module) -> None:
    """Undo :func:`compact` (full widths again); a no-op on a model that is not compacted."""
    family_of(model).uncompact(model, gated_layers(model))
    for name in ("finegates_gather", "finegates_bias_gather", "finegates_lora_gather"):
        model._buffers.pop(name, None)


@torch.no_grad()
def pin_to_target(model: nn.Module, target: float | None, align: int | None = None,
                  same_head_dim: bool | None = None) -> float:
    """Fix the structure (see :meth:`Gate.pin`) at a ``target`` removed fraction.

    ``align=None``: close the least open units (lowest mu) until the removed fraction reaches the target;
    never reopens a closed unit, so gates that closed more than the target stay so. Returns the mu
    threshold used (-0.5: only the already closed units).

    ``align=k``: the structure the exporter writes with ``align=k``: per layer the kept heads share their
    Q/K width and their V/O width (one width for both if ``same_head_dim``, default ``k > 1``, as the
    exporter), widths in multiples of ``k``; so that the exported (aligned) sparsity, not only the gates',
    is the target (within one width step). CoFi's deterministic mask: the units with the highest scores
    are kept, in the number the target allows. When the gates closed more than the target, the least
    closed units are reopened (eval gate 0.05; recovery trains them). Returns the price used.
    """
    if align is not None and target is not None and family_of(model).name == "bert":  # the aligned plan knows BERT's layout only
        return _pin_aligned(model, target, align, align > 1 if same_head_dim is None else same_head_dim)
    lo = -0.5 if target is None else close_least_open(model, target)
    for g in all_gates(model):
        g.pin()
    return lo


@torch.no_grad()
def close_least_open(model: nn.Module, target: float) -> float:
    """Close the least open units (lowest mu) until the removed fraction (unaligned, as
    :func:`closure_sparsity` counts it) reaches ``target``; never reopens a unit. Returns the mu threshold
    used (-0.5: nothing had to close)."""
    lo = -0.5  # mu <= -0.5 is closed already
    if closure_sparsity(model, lo) < target:
        hi = 1.0  # everything closed
        for _ in range(40):  # bisection on the threshold: closure_sparsity is monotone in it
            mid = 0.5 * (lo + hi)
            if closure_sparsity(model, mid) >= target:
                hi = mid
            else:
                lo = mid
        lo = hi
        for g in all_gates(model):
            g.theta.copy_(torch.where(g.mu <= lo, torch.full_like(g.theta, _CLOSED_THETA), g.theta))
    return lo


# ---------------------------------------------------------------------------------------------------
# Export-aware pinning: the kept structure is the one the aligned exporter writes, without padding waste

_CLOSED_THETA = -3.0


_REOPEN_SCALE = 1e-3  # closed units rank below every open one, in the order of their mu


def _benefit(*gates: Gate | None) -> torch.Tensor:
    """Per unit: its score for the kept structure. Open units: the eval gate before the upper clamp,
    mu + 0.5 (> 0), the smallest over the gates that must all be open for the unit to survive. Closed units
    (a gate at mu <= -0.5): a tiny positive score in the order of their mu, so that they are kept (reopened)
    only when the gates have closed more than the target, the least closed first."""
    present = [g for g in gates if g is not None]
    mu = torch.stack([g.mu for g in present]).amin(dim=0)
    closed = torch.stack([g.closed() for g in present]).any(dim=0)
    return torch.where(closed, _REOPEN_SCALE * (mu + 1.0).clamp(min=0.0) + 1e-9, mu + 0.5)


def _width_options(cap: int, align: int) -> list[int]:
    """Kept widths the exporter writes without padding: multiples of ``align`` up to ``cap``, and ``cap``."""
    return sorted({w for w in range(align, cap + 1, align)} | {cap})


def _best_width(sorted_vals: torch.Tensor, options: list[int]) -> tuple[float, int]:
    """max over n in {0} + options of the sum of the n largest values (``sorted_vals`` sorted descending)."""
    cum = torch.cat([sorted_vals.new_zeros(1), sorted_vals.cumsum(0)])
    best, n_best = 0.0, 0
    for n in options:
        v = float(cum[n])
        if v > best:
            best, n_best = v, n
    return best, n_best


@dataclass
class _LayerUnits:
    qk: torch.Tensor  # (H, dh) benefit of each Q/K dim
    v: torch.Tensor  # (H, dh) benefit of each V/O dim
    ffn: torch.Tensor  # (inter,) benefit of each FFN neuron


def _layer_units(lg: LayerGates, n_heads: int) -> _LayerUnits:
    return _LayerUnits(
        qk=_benefit(lg.q.row_gate, lg.k.row_gate).view(n_heads, -1),
        v=_benefit(lg.v.row_gate, lg.o.col_gate).view(n_heads, -1),
        ffn=_benefit(lg.up.row_gate, lg.down.col_gate),
    )


def _layer_plan(u: _LayerUnits, price: float, align: int, same_head_dim: bool
                ) -> tuple[list[int], int, int, int]:
    """The structure of one layer that maximises sum(benefit - price) over kept units (each unit costs the
    same 2 * hidden weights) under the exporter's constraints: kept heads share their Q/K width and their
    V/O width (one width if ``same_head_dim``), widths and the FFN width are multiples of ``align`` (or the
    full width). Returns (kept heads, Q/K width, V/O width, FFN width)."""
    H, dh = u.v.shape
    opts = _width_options(dh, align)
    qk_sorted = (u.qk - price).sort(dim=1, descending=True).values
    v_sorted = (u.v - price).sort(dim=1, descending=True).values
    qk_cum = torch.cat([qk_sorted.new_zeros(H, 1), qk_sorted.cumsum(1)], dim=1)
    v_cum = torch.cat([v_sorted.new_zeros(H, 1), v_sorted.cumsum(1)], dim=1)
    pairs = [(w, w) for w in opts] if same_head_dim else [(a, b) for a in opts for b in opts]
    best, plan = 0.0, ([], 0, 0)
    for a, b in pairs:
        per_head = qk_cum[:, a] + v_cum[:, b]
        order = per_head.argsort(descending=True)
        prefix = per_head[order].cumsum(0)
        k = int(prefix.argmax())
        if float(prefix[k]) > best:
            best, plan = float(prefix[k]), (sorted(order[: k + 1].tolist()), a, b)
    _, n_ffn = _best_width((u.ffn - price).sort(descending=True).values, _width_options(u.ffn.numel(), align))
    heads, a, b = plan
    return heads, a, b, n_ffn


def _plan_sparsity(model: nn.Module, units: list[_LayerUnits], price: float, align: int,
                   same_head_dim: bool) -> float:
    kept = total = 0
    for lg, u in zip(gated_layers(model), units):
        heads, a, b, n_ffn = _layer_plan(u, price, align, same_head_dim)
        h = lg.q.in_features
        kept += 2 * h * (len(heads) * (a + b) + n_ffn)
        total += sum(gl.weight.numel() for _, gl in lg.items())
    return 1.0 - kept / total


_REOPEN_THETA = math.atanh(PINNED_OPEN_MIN - 0.5)  # a reopened unit comes back gently: eval gate 0.05


def _close(gates: tuple[Gate | None, ...], drop: torch.Tensor) -> None:
    """Close the units in ``drop``; reopen the kept units that are closed (eval gate PINNED_OPEN_MIN)."""
    for g in gates:
        if g is not None:
            reopen = ~drop & g.closed()
            theta = torch.where(drop, torch.full_like(g.theta, _CLOSED_THETA), g.theta)
            g.theta.copy_(torch.where(reopen, torch.full_like(g.theta, _REOPEN_THETA), theta))


def _top_mask(values: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` largest entries of a 1-d tensor (ties: lower index first)."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    if n > 0:
        mask[torch.argsort(values, descending=True, stable=True)[:n]] = True
    return mask


def _pin_aligned(model: nn.Module, target: float | None, align: int, same_head_dim: bool) -> float:
    price, keeps = _aligned_keep(model, target, align, same_head_dim)
    for gates, keep in keeps:
        _close(gates, ~keep)
    for g in all_gates(model):
        g.pin()
    return price


@torch.no_grad()
def close_aligned(model: nn.Module, target: float, align: int, same_head_dim: bool | None = None) -> bool:
    """Close the units that the structure the aligned exporter writes at ``target`` drops (the plan of
    :func:`pin_to_target` with ``align``); reopen nothing and pin nothing, so training goes on around the
    structure the pin will keep. Returns False (and closes nothing) for a family whose aligned plan is not
    known here (only BERT's is): the caller closes the least open units instead."""
    if family_of(model).name != "bert":
        return False
    _, keeps = _aligned_keep(model, target, align, align > 1 if same_head_dim is None else same_head_dim)
    for gates, keep in keeps:
        for g in gates:
            if g is not None:
                g.theta.copy_(torch.where(keep, g.theta, torch.full_like(g.theta, _CLOSED_THETA)))
    return True


def _aligned_keep(model: nn.Module, target: float | None, align: int, same_head_dim: bool
                  ) -> tuple[float, list[tuple[tuple[Gate | None, ...], torch.Tensor]]]:
    """The aligned plan at ``target``: the price used and, per pair of gates that must both be open for a unit
    to survive, the mask of the units it keeps."""
    if align < 1:
        raise ValueError(f"align={align!r} is not valid; accepted: a positive integer")
    n_heads = int(model.config.num_attention_heads)
    layers = gated_layers(model)
    # planned on the CPU: a few thousand numbers, and the plan reads many of them one by one (a sync each on a GPU)
    units = [_LayerUnits(*(x.detach().float().cpu() for x in (u.qk, u.v, u.ffn)))
             for u in (_layer_units(lg, n_heads) for lg in layers)]
    lo = 0.0  # price 0: every unit is worth keeping (nothing removed)
    if target is not None and _plan_sparsity(model, units, lo, align, same_head_dim) < target:
        hi = 2.0 + max(float(torch.cat([u.qk.flatten(), u.v.flatten(), u.ffn]).max()) for u in units)
        for _ in range(40):  # the optimum's kept size falls as the price rises: bisection on the price
            mid = 0.5 * (lo + hi)
            if _plan_sparsity(model, units, mid, align, same_head_dim) >= target:
                hi = mid
            else:
                lo = mid
        lo = hi
    keeps = []
    for lg, u in zip(layers, units):
        heads, a, b, n_ffn = _layer_plan(u, lo, align, same_head_dim)
        H, dh = u.v.shape
        keep_qk = torch.zeros(H, dh, dtype=torch.bool)
        keep_v = torch.zeros(H, dh, dtype=torch.bool)
        for hh in heads:
            keep_qk[hh] = _top_mask(u.qk[hh], a)
            keep_v[hh] = _top_mask(u.v[hh], b)
        dev = lg.q.weight.device
        keeps += [((lg.q.row_gate, lg.k.row_gate), keep_qk.flatten().to(dev)),
                  ((lg.v.row_gate, lg.o.col_gate), keep_v.flatten().to(dev)),
                  ((lg.up.row_gate, lg.down.col_gate), _top_mask(u.ffn, n_ffn).to(dev))]
    return lo, keeps


class SparsityController(nn.Module):
    """CoFi-style Lagrangian that drives expected sparsity to a target (Xia et al. 2022).

    ``loss = l1 (s_hat - t) + l2 (s_hat - t)^2``; the gates minimise it, ``l1`` and ``l2`` maximise it
    (their own optimiser with a negative learning rate). ``t`` ramps linearly from 0 to the target over
    ``warmup_steps``.

    The gates settle where ``d = s_hat - t = -l1 / (2 l2)``, so ``l1`` keeps the sum of the lag it saw (integral
    wind-up): after a long lag behind the ramp it holds the gates well past the target. ``crossed`` tells when
    ``d`` changed sign since the last forward, the moment to restart ``l1`` (``FineGates``'s ``dual_reset``).
    """

    def __init__(self, target: float, warmup_steps: int) -> None:
        super().__init__()
        self.target = target
        self.warmup_steps = max(int(warmup_steps), 0)
        self.l1 = nn.Parameter(torch.zeros(()))
        self.l2 = nn.Parameter(torch.zeros(()))
        self.last_d: torch.Tensor | None = None  # s_hat - t at the last forward ...
        self.sign = 0  # ... and its sign at the last ``crossed`` call (0: none yet)

    def current_target(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.target
        return self.target * min(1.0, step / self.warmup_steps)

    def forward(self, s_hat: torch.Tensor, step: int) -> torch.Tensor:
        d = s_hat - self.current_target(step)
        self.last_d = d.detach()
        return self.l1 * d + self.l2 * d * d

    def crossed(self) -> bool:
        """Whether ``s_hat - t`` changed sign between the forwards of the last two calls (one sync on a GPU)."""
        if self.last_d is None:
            return False
        d = float(self.last_d)
        sign = (d > 0) - (d < 0)
        out = sign != 0 and self.sign != 0 and sign != self.sign
        self.sign = sign or self.sign
        return out

    @torch.no_grad()
    def restart_l1(self, opt: torch.optim.Optimizer) -> None:
        """``l1 = 0`` and a fresh optimiser state for it: the lag it summed no longer pushes the gates."""
        self.l1.zero_()
        opt.state.pop(self.l1, None)


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
