"""FineGates: row/column gates (+ optional LoRA inside the gates), see :mod:`finegates.gates`; and
``finegates-lora`` (the same with LoRA r=8 inside the gates unless a rank is given).

Search: the sparsity it is asked to reach (``target_sparsity``, the controller's target: the same value
gives the same exported sparsity at any training length, which a penalty weight does not), the learning
rate of the head and LoRA (log scale) and the LoRA rank inside the gates (0 = gates only) jointly. The
reference trial is the dense one (target 0: gates and the rest train, no penalty). Ranges come from the
measurements in docs/GATE_DEFAULTS.md and docs/COMPRESSION.md.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from finegates import gated_model as gm
from finegates.errors import ConfigError
from finegates.export import DEFAULT_ALIGN
from finegates.gates import keep_open_all_
from finegates.methods.base import Choice, LogUniform, Method, Uniform, adamw

if TYPE_CHECKING:
    from finegates.config import TrainConfig

log = logging.getLogger(__name__)

#: warn when the controller's expected sparsity at the pin is this far below the target (the pin closes the rest)
PIN_GAP_WARN = 0.1
ALIGNED_STEP = 0.005  # close_schedule "aligned": how far the line rises between two aligned plans


@dataclasses.dataclass(frozen=True)
class FineGatesOptions:
    # the slots that get LoRA inside their gates when rank > 0 (None: every gated slot). ["q", "v"] is
    # peft LoRA's placement on BERT, at a third of the LoRA cost of all six (docs/BENCHMARKS.md)
    lora_slots: tuple[str, ...] | None = None
    # once the structure is pinned (recovery), compute only the open units: exact, and the steps get cheaper
    # as units close (docs/BENCHMARKS.md, "Recovery on the kept units"). false: full widths to the end
    compact_recovery: bool = True

    def check(self) -> None:
        if self.lora_slots is not None and not self.lora_slots:
            raise ConfigError("finegates option lora_slots=[] is invalid; accepted: a non-empty list of slots")


class FineGates(Method):
    """Row/column gates (+ optional LoRA inside the gates), see :mod:`finegates.gates`.

    The run has up to two phases. Pruning (steps ``[0, recovery_start)``): the penalty acts; with the
    default controller the expected sparsity follows a target that ramps from 0 to ``target_sparsity``
    over ``warmup_frac`` of the steps, so a target means the same at any run length. Recovery (the last
    ``recovery_frac`` of the steps): the gates are pinned (closed units stay closed, open ones stay
    open), the penalty is off, and the kept weights (gates, biases, LoRA, head) go on training. From the pin on
    the gated layers compute only the open units (``compact_recovery``, exact), so the matrix products of a
    recovery step are those of the pruned model (a copy of the kept frozen weights is held beside the full
    ones; gradients and optimiser state keep full shapes); :meth:`exportable` restores full widths first.
    """

    name = "finegates"
    help = "stochastic row/column gates, exported physically smaller (prunes)"
    Options = FineGatesOptions
    search = {"target_sparsity": Uniform(0.1, 0.8), "lr": LogUniform(3e-4, 1e-2), "rank": Choice((0, 4, 8))}
    reference = {"target_sparsity": 0.0, "lr": 2e-3, "rank": 0}
    reference_name = "dense reference (target sparsity 0)"
    prunes = True

    def __init__(self) -> None:
        self.controller: gm.SparsityController | None = None
        self.dual_opt: torch.optim.Optimizer | None = None
        self.cfg: TrainConfig | None = None
        self.model: nn.Module | None = None
        self.total_steps = 0
        self.recovery_start: int | None = None  # first step of the recovery phase (None: no recovery)
        self.earliest_pin: int | None = None  # max_recovery_frac: the first step the recovery may start at
        self.pinned_at: int | None = None
        self.expected_at_pin: float | None = None  # the controller's expected sparsity just before the pin
        self.schedule_start = 0  # gradual closing: closed fraction from 0 at the end of the warmup ...
        self.schedule_end: int | None = None  # ... to the target at the pin
        self.schedule_closed = 0.0  # removed fraction that the schedule closed (the gates had not)
        self.step = 0  # the step the last regularizer call was for
        self.compacted = False  # the recovery trains the pinned-open units only (FineGatesOptions.compact_recovery)
        self.aligned_floor = 0.0  # close_schedule "aligned": the fraction of the last aligned plan applied
        self.aligned_family = True  # ... and whether the family has one (else the least open units close)
        self.dual_resets = 0  # dual_reset "crossing": how many times l1 restarted

    def penalised(self, cfg: "TrainConfig") -> bool:
        if cfg.penalty == "controller":
            return cfg.target_sparsity > 0
        return cfg.lam > 0

    def check(self, model: nn.Module, cfg: "TrainConfig") -> None:
        gm.check_lora_slots(gm.family_of(model), self.parse_options(cfg.extra).lora_slots)

    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int,
                calibration: list[dict] | None = None) -> nn.Module:
        self.cfg, self.model, self.total_steps = cfg, model, total_steps
        opts = self.parse_options(cfg.extra)
        gm.apply_gates(model, layout=cfg.layout, rank=cfg.rank, lora_alpha=cfg.lora_alpha, train_bias=cfg.train_bias,
                       gate_init=cfg.gate_init, lora_slots=opts.lora_slots)
        if cfg.penalty == "controller" and self.penalised(cfg):
            dev = next(model.parameters()).device
            self.controller = gm.SparsityController(cfg.target_sparsity, int(cfg.warmup_frac * total_steps)).to(dev)
            # gradient ascent on the multipliers (CoFi: lr -reg_lr); maximize=True is the same thing
            self.dual_opt = adamw(self.controller.parameters(), lr=cfg.dual_lr, maximize=True, weight_decay=0.0)
        if cfg.recovery_frac > 0 and self.penalised(cfg):
            self.recovery_start = max(1, int(round((1.0 - cfg.recovery_frac) * total_steps)))
        # an earlier start of the recovery there is (recovery_frac 0: none), never before the ramp is over
        if self.controller is not None and self.recovery_start is not None and cfg.max_recovery_frac is not None:
            self.earliest_pin = max(1, self.controller.warmup_steps,
                                    int(round((1.0 - cfg.max_recovery_frac) * total_steps)))
        if self.controller is not None and cfg.close_schedule in ("gradual", "aligned"):
            self.schedule_start = self.controller.warmup_steps
            self.schedule_end = self.recovery_start or total_steps
        return model

    def param_groups(self, model: nn.Module, cfg: "TrainConfig") -> list[dict]:
        gate_ids = {id(p) for p in gm.gate_parameters(model)}
        gates = [p for p in model.parameters() if id(p) in gate_ids]
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
        return [{"params": gates, "lr": cfg.gate_lr, "weight_decay": 0.0},
                {"params": others, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]

    def in_recovery(self, step: int) -> bool:
        return self.recovery_start is not None and step >= self.recovery_start

    def lr_factor(self, step: int) -> float:
        """``recovery_lr`` linear: from the pin, every learning rate falls on a line from its value there to 0 after
        the last step (the last step takes 1/n of it, n the recovery's steps); constant, or before the pin: 1."""
        if self.cfg is None or self.cfg.recovery_lr != "linear" or not self.in_recovery(step):
            return 1.0
        assert self.recovery_start is not None  # in recovery: recovery_start <= step < total_steps
        return (self.total_steps - step) / (self.total_steps - self.recovery_start)

    def regularizer(self, model: nn.Module, step: int) -> torch.Tensor | None:
        cfg = self.cfg
        assert cfg is not None
        self.step = step
        s_hat = None  # the gates' expected sparsity, for the controller (and the early recovery's test)
        if self.controller is not None and not self.in_recovery(step):
            s_hat = gm.expected_sparsity(model)
            if self._gates_done_early(s_hat, step):
                self.recovery_start = step  # the gates reached the target: the rest of the run is recovery
        if self.in_recovery(step):
            if self.pinned_at is None:
                if cfg.penalty == "controller":  # pin the structure the exporter writes: it exports the target
                    self.expected_at_pin = float(gm.expected_sparsity(model).detach())
                    if cfg.close_schedule == "at-pin" and cfg.target_sparsity - self.expected_at_pin > PIN_GAP_WARN:
                        log.warning(
                            "the controller reached %.0f%% expected sparsity of the %.0f%% target by the pin at step "
                            "%d: the pin closes the rest at once, which can cost much accuracy (docs/COMPRESSION.md, "
                            "'A pin that closes too much at once'); --close-schedule gradual, more steps, a larger "
                            "--dual-lr or a lower target help", 100 * self.expected_at_pin, 100 * cfg.target_sparsity, step)
                    gm.pin_to_target(model, cfg.target_sparsity, align=DEFAULT_ALIGN)
                else:
                    gm.pin_to_target(model, None)
                self.pinned_at = step
                if self.parse_options(cfg.extra).compact_recovery:
                    self.compacted = gm.compact(model)
                    if not self.compacted:
                        log.info("recovery at full widths: %s models do not compact here (docs/BENCHMARKS.md, "
                                 "'Recovery on the kept units')", model.config.model_type)
                log.info("recovery from step %d: structure pinned at gate sparsity %.3f (%.3f of it closed by the "
                         "schedule)", step, gm.gate_sparsity(model), self.schedule_closed)
            return None
        if not self.penalised(cfg):
            return None
        if cfg.penalty == "paper":
            return cfg.lam * gm.penalty_paper(model)
        if cfg.penalty == "code":
            return cfg.lam * gm.penalty_code(model, cfg.target_sparsity)
        assert self.controller is not None and s_hat is not None
        return self.controller(s_hat, step)

    def _gates_done_early(self, s_hat: torch.Tensor, step: int) -> bool:
        """``max_recovery_frac``: whether ``step`` lies between the earliest pin and the fixed one and the gates'
        expected sparsity has reached the target (one sync on a GPU, on those steps only). The close schedule keeps
        its line to the fixed pin, so it never pushes the gates to an early one."""
        assert self.cfg is not None
        if self.earliest_pin is None or self.recovery_start is None:
            return False
        if not self.earliest_pin <= step < self.recovery_start:
            return False
        return float(s_hat.detach()) >= self.cfg.target_sparsity

    def after_step(self) -> None:
        if self.dual_opt is not None and self.pinned_at is None:
            self.dual_opt.step()
            self.dual_opt.zero_grad(set_to_none=True)
            assert self.controller is not None and self.cfg is not None
            if self.cfg.dual_reset == "crossing" and self.controller.crossed():
                self.controller.restart_l1(self.dual_opt)
                self.dual_resets += 1
        if self.schedule_end is not None and self.pinned_at is None and self.model is not None:
            self._close_on_schedule(self.model, self.step + 1)
        if self.pinned_at is not None and self.model is not None:
            keep_open_all_(gm.all_gates(self.model))

    @torch.no_grad()
    def _close_on_schedule(self, model: nn.Module, step: int) -> None:
        """Gradual closing: the closed fraction of the gated weights rises at least linearly from 0 at the end
        of the controller's warmup to the target at the pin. What the gates have not closed by then closes now,
        the least open units first, so the pin never has much left to close at once (docs/COMPRESSION.md,
        "Closing on a schedule"). Before the end of the warmup the gates alone choose. ``aligned``: what closes is
        what the structure the aligned exporter writes at that fraction drops (the pin's plan: per layer one head
        width, widths in multiples of 8), so the pin no longer moves the model to that structure in one step."""
        assert self.cfg is not None and self.schedule_end is not None
        start, end = self.schedule_start, self.schedule_end
        frac = (step >= end) if end <= start else (step - start) / (end - start)
        floor = self.cfg.target_sparsity * min(1.0, max(0.0, float(frac)))
        if floor <= 0.0:  # the warmup: nothing to count (on a GPU the count costs a sync)
            return
        closed = gm.closure_sparsity(model, -0.5)
        aligned = self.cfg.close_schedule == "aligned" and self.aligned_family
        # aligned: the structure the pin will export at this fraction, so that the pin has little left to change; the
        # plan (~0.1 s on a CPU for MiniLM) is made again each time the line has risen by ALIGNED_STEP, and at its end
        if aligned and (floor - self.aligned_floor >= ALIGNED_STEP
                        or floor >= self.cfg.target_sparsity > self.aligned_floor):
            self.aligned_family = aligned = gm.close_aligned(model, floor, DEFAULT_ALIGN)
            self.aligned_floor = floor
        if not aligned and closed < floor:
            gm.close_least_open(model, floor)
        self.schedule_closed += gm.closure_sparsity(model, -0.5) - closed

    def exportable(self, model: nn.Module) -> nn.Module:
        if self.compacted:
            gm.uncompact(model)
            self.compacted = False
        return model

    def metrics(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            out = {"gate_sparsity": gm.gate_sparsity(model), "expected_sparsity": float(gm.expected_sparsity(model))}
            mus = torch.cat([g.mu for g in gm.all_gates(model)])
            out["gate_mu_min"] = float(mus.min())
            out["gate_mu_mean"] = float(mus.mean())
        if self.controller is not None:
            out["lagrange_l1"] = float(self.controller.l1.detach())
            if self.cfg is not None and self.cfg.dual_reset != "none":
                out["dual_resets"] = self.dual_resets
        if self.pinned_at is not None:
            out["pinned_at_step"] = self.pinned_at
        if self.expected_at_pin is not None:
            out["expected_sparsity_at_pin"] = self.expected_at_pin
        if self.schedule_end is not None:
            out["schedule_closed"] = self.schedule_closed
        return out



class FineGatesLora(FineGates):
    """FineGates with LoRA inside the gates: ``Diag(z_r)(W + B A)Diag(z_c)`` (rank 8 unless given)."""

    name = "finegates-lora"
    help = "FineGates with LoRA inside the gates (rank 8 unless --rank)"
    search = {"target_sparsity": Uniform(0.1, 0.8), "lr": LogUniform(3e-4, 3e-3), "rank": Choice((4, 8, 16))}
    reference = {"target_sparsity": 0.0, "lr": 1e-3, "rank": 8}
    reference_name = "dense reference with LoRA r=8 inside the gates (target sparsity 0)"

    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int,
                calibration: list[dict] | None = None) -> nn.Module:
        if cfg.rank == 0:
            cfg = dataclasses.replace(cfg, rank=8)
        return super().prepare(model, cfg, total_steps, calibration)
