"""Finetuning methods behind one small interface, registered by name.

A method prepares a model in place (adds its parameters, freezes the rest), gives the optimiser its
parameter groups, optionally a regulariser, and reports its own metrics. Every method exports through
:func:`finegates.export.build_compressed`, so all are timed and counted alike (methods that do not
prune export at sparsity 0).
"""
from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from finegates import gated_model as gm

if TYPE_CHECKING:
    from finegates.config import TrainConfig

log = logging.getLogger(__name__)


class Method(ABC):
    name: str = ""
    prunes: bool = False

    @abstractmethod
    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int,
                calibration: list[dict] | None = None) -> nn.Module:
        """Modify ``model`` for training; return the module to train (may be a wrapper).

        ``calibration``: a few tokenised train batches, for methods that look at activations (GIFT-SW).
        """

    def param_groups(self, model: nn.Module, cfg: "TrainConfig") -> list[dict]:
        """Optimiser parameter groups (each a dict with ``params`` and ``lr``): by default one group of
        everything that trains, at ``cfg.lr``."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr,
                 "weight_decay": cfg.weight_decay}]

    def regularizer(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        """Called after the main optimiser step (e.g. to step a dual optimiser)."""

    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {}

    def exportable(self, model: nn.Module) -> nn.Module:
        """The plain (or gated) HF model to export."""
        return model


class FineGates(Method):
    """Row/column gates (+ optional LoRA inside the gates), see :mod:`finegates.gates`.

    The run has up to two phases. Pruning (steps ``[0, recovery_start)``): the penalty acts; with the
    default controller the expected sparsity follows a target that ramps from 0 to ``target_sparsity``
    over ``warmup_frac`` of the steps, so a target means the same at any run length. Recovery (the last
    ``recovery_frac`` of the steps): the gates are pinned (closed units stay closed, open ones stay
    open), the penalty is off, and the kept weights (gates, biases, LoRA, head) go on training.
    """

    name = "finegates"
    prunes = True

    def __init__(self) -> None:
        self.controller: gm.SparsityController | None = None
        self.dual_opt: torch.optim.Optimizer | None = None
        self.cfg: TrainConfig | None = None
        self.model: nn.Module | None = None
        self.recovery_start: int | None = None  # first step of the recovery phase (None: no recovery)
        self.pinned_at: int | None = None

    def penalised(self, cfg: "TrainConfig") -> bool:
        if cfg.penalty == "controller":
            return cfg.target_sparsity > 0
        return cfg.lam > 0

    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int,
                calibration: list[dict] | None = None) -> nn.Module:
        self.cfg, self.model = cfg, model
        gm.apply_gates(model, layout=cfg.layout, rank=cfg.rank, lora_alpha=cfg.lora_alpha, train_bias=cfg.train_bias,
                       gate_init=cfg.gate_init)
        if cfg.penalty == "controller" and self.penalised(cfg):
            dev = next(model.parameters()).device
            self.controller = gm.SparsityController(cfg.target_sparsity, int(cfg.warmup_frac * total_steps)).to(dev)
            # gradient ascent on the multipliers (CoFi: lr -reg_lr); maximize=True is the same thing
            self.dual_opt = torch.optim.AdamW(self.controller.parameters(), lr=cfg.gate_lr, maximize=True,
                                              weight_decay=0.0)
        if cfg.recovery_frac > 0 and self.penalised(cfg):
            self.recovery_start = max(1, int(round((1.0 - cfg.recovery_frac) * total_steps)))
        return model

    def param_groups(self, model: nn.Module, cfg: "TrainConfig") -> list[dict]:
        gate_ids = {id(p) for p in gm.gate_parameters(model)}
        gates = [p for p in model.parameters() if id(p) in gate_ids]
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
        return [{"params": gates, "lr": cfg.gate_lr, "weight_decay": 0.0},
                {"params": others, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]

    def in_recovery(self, step: int) -> bool:
        return self.recovery_start is not None and step >= self.recovery_start

    def regularizer(self, model: nn.Module, step: int) -> torch.Tensor | None:
        cfg = self.cfg
        assert cfg is not None
        if self.in_recovery(step):
            if self.pinned_at is None:
                target = cfg.target_sparsity if cfg.penalty == "controller" else None
                gm.pin_to_target(model, target)
                self.pinned_at = step
                log.info("recovery from step %d: structure pinned at gate sparsity %.3f", step,
                         gm.gate_sparsity(model))
            return None
        if not self.penalised(cfg):
            return None
        if cfg.penalty == "paper":
            return cfg.lam * gm.penalty_paper(model)
        if cfg.penalty == "code":
            return cfg.lam * gm.penalty_code(model, cfg.target_sparsity)
        assert self.controller is not None
        return self.controller(gm.expected_sparsity(model), step)

    def after_step(self) -> None:
        if self.dual_opt is not None and self.pinned_at is None:
            self.dual_opt.step()
            self.dual_opt.zero_grad(set_to_none=True)
        if self.pinned_at is not None and self.model is not None:
            for g in gm.all_gates(self.model):
                g.keep_open_()

    def metrics(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            out = {"gate_sparsity": gm.gate_sparsity(model), "expected_sparsity": float(gm.expected_sparsity(model))}
            mus = torch.cat([g.mu for g in gm.all_gates(model)])
            out["gate_mu_min"] = float(mus.min())
            out["gate_mu_mean"] = float(mus.mean())
        if self.controller is not None:
            out["lagrange_l1"] = float(self.controller.l1.detach())
        if self.pinned_at is not None:
            out["pinned_at_step"] = self.pinned_at
        return out


class Full(Method):
    """Full finetuning: every parameter trains (the usual upper reference)."""

    name = "full"

    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int,
                calibration: list[dict] | None = None) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


class Lora(Method):
    """LoRA through peft (r = cfg.rank or 8, on query and value by default); merged on export."""

    name = "lora"

    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int,
                calibration: list[dict] | None = None) -> nn.Module:
        from peft import LoraConfig, TaskType, get_peft_model

        r = cfg.rank or 8
        fam = gm.family_of(model)
        targets = cfg.extra.get("target_modules", list(fam.lora_targets))
        save = fam.lora_modules_to_save(model)
        pcfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=cfg.lora_alpha or 2 * r,
                          lora_dropout=float(cfg.extra.get("lora_dropout", 0.0)), target_modules=targets,
                          modules_to_save=save)
        return get_peft_model(model, pcfg)

    def exportable(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


class FineGatesLora(FineGates):
    """FineGates with LoRA inside the gates: ``Diag(z_r)(W + B A)Diag(z_c)`` (rank 8 unless given)."""

    name = "finegates-lora"

    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int,
                calibration: list[dict] | None = None) -> nn.Module:
        if cfg.rank == 0:
            cfg = dataclasses.replace(cfg, rank=8)
        return super().prepare(model, cfg, total_steps, calibration)


class GiftSW(Method):
    """GIFT-SW: salient columns train, the rest frozen with quantisation-scaled noise (training only).

    Options (``cfg.extra``): ``k`` salient columns per linear (default 16: the paper's 128 is for
    4096-wide LLMs; MiniLM is 384 wide), ``bits`` = 4, ``targets`` (default all six linears).
    """

    name = "gift-sw"

    def prepare(self, model, cfg, total_steps, calibration=None):
        from finegates.baselines import GiftLinear, _replace, activation_norms

        if not calibration:
            raise ValueError("gift-sw needs calibration batches from the task's train data")
        k = int(cfg.extra.get("k", 16))
        bits = int(cfg.extra.get("bits", 4))
        slots = cfg.extra.get("targets")  # None: every slot of the family
        gm.freeze_all_but_head(model)
        norms = activation_norms(model, calibration, slots)

        def make(lin, i, slot):
            sal = torch.topk(norms[(i, slot)], min(k, lin.in_features)).indices.sort().values
            return GiftLinear(lin, sal.to(lin.weight.device), bits).to(lin.weight.device)

        _replace(model, slots, make)
        return model


class Sparta(Method):
    """SpaRTA: trainable sparse deltas at random positions of W_v and W_o (``density``, default 1%)."""

    name = "sparta"

    def prepare(self, model, cfg, total_steps, calibration=None):
        from finegates.baselines import SpartaLinear, _replace

        density = float(cfg.extra.get("density", 0.01))
        if not 0 < density <= 1:
            raise ValueError(f"sparta density={density!r} is invalid; accepted: a number in (0, 1]")
        slots = tuple(cfg.extra.get("targets", ("v", "o")))
        gm.freeze_all_but_head(model)
        g = torch.Generator().manual_seed(cfg.seed)
        _replace(model, slots, lambda lin, i, s: SpartaLinear(lin, density, g).to(lin.weight.device))
        return model


class Propulsion(Method):
    """Propulsion: outputs of the frozen Q, K, V, O, up, down scaled by ``z ** degree`` (default 15)."""

    name = "propulsion"

    def prepare(self, model, cfg, total_steps, calibration=None):
        from finegates.baselines import PropulsionLinear, _replace

        degree = int(cfg.extra.get("degree", 15))
        gm.freeze_all_but_head(model)
        _replace(model, cfg.extra.get("targets"), lambda lin, i, s: PropulsionLinear(lin, degree))
        return model


METHODS: dict[str, type[Method]] = {m.name: m for m in (FineGates, FineGatesLora, Lora, GiftSW, Sparta, Propulsion,
                                                         Full)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[name]()
