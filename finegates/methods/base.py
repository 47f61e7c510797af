"""The method contract (peft's habit: one module per method, each with a typed config and a registry line).

A method prepares a model in place (adds its parameters, freezes the rest), gives the optimiser its
parameter groups, optionally a regulariser, and reports its own metrics. Every method exports through
:func:`finegates.export.build_compressed`, so all are timed and counted alike (methods that do not
prune export at sparsity 0).

Each method declares:

* ``Options``: a dataclass of its own options (``TrainConfig.extra``; ``--option KEY=VALUE`` on the
  CLI), validated with one-line errors: an unknown key or a value of the wrong type is refused;
* ``search``: its search ranges as plain data (:class:`Uniform`, :class:`LogUniform`, :class:`Choice`),
  which ``tune/space.py`` turns into Optuna distributions, and ``reference`` / ``reference_name``: the
  first trial of every study;
* ``help``: one line for the CLIs.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

import torch
from torch import nn

from finegates.errors import ConfigError

if TYPE_CHECKING:
    from finegates.config import TrainConfig


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """The optimiser every method trains with: AdamW over ``params`` (tensors or groups), fused (the whole update of
    a tensor in one kernel, on the CPU as on a GPU) where every parameter is a floating-point tensor. Unfused, CPU
    AdamW runs about ten ops per tensor: a quarter of the time fused for FineGates' 64 tensors on MiniLM
    (benchmarks/optimiser_step.py; docs/BENCHMARKS.md, "A step's fixed costs"). The same update; only the rounding of
    its ops differs."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(torch.is_floating_point(p) for p in tensors)
    return torch.optim.AdamW(groups, **kwargs, fused=fused or None)


# ---- search ranges as plain data (no Optuna here)


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float


@dataclass(frozen=True)
class Choice:
    choices: tuple


Range = Union[Uniform, LogUniform, Choice]


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list) or tp in (tuple, list):
        args = typing.get_args(tp)
        return isinstance(value, (tuple, list)) and (not args or all(_type_ok(v, args[0]) for v in value))
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


class Method(ABC):
    name: ClassVar[str] = ""
    prunes: ClassVar[bool] = False
    help: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    search: ClassVar[dict[str, Range]] = {}
    reference: ClassVar[dict[str, Any]] = {}  # the first trial of every study; may lie outside the ranges
    reference_name: ClassVar[str] = ""
    # Options added after configs began to be recorded with every option (TrainConfig.recorded, session 22) whose default
    # is not what a run did before the option existed, with that behaviour: a record without the option reads as that
    # (TrainConfig.from_dict). Records written before session 22 hold only the options that were set, so they cannot
    # say how old they are: Propulsion's train_bias (True since 448634d) and SpaRTA's scope ("model" since 106314c)
    # read as today's defaults there (docs/SELECTION.md).
    options_before: ClassVar[dict[str, Any]] = {}

    @classmethod
    def parse_options(cls, extra: dict[str, Any] | None) -> Any:
        """``extra`` as a typed ``Options``; a ConfigError naming the bad key (and the accepted ones) or value."""
        extra = dict(extra or {})
        hints = typing.get_type_hints(cls.Options)
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        for k, v in extra.items():
            if k not in fields:
                accepted = ", ".join(sorted(fields)) or "none"
                raise ConfigError(f"{cls.name} option {k!r} is unknown; accepted: {accepted}")
            if not _type_ok(v, hints[k]):
                raise ConfigError(f"{cls.name} option {k}={v!r} is invalid; accepted: {_type_name(hints[k])}")
        opts = cls.Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()})
        check = getattr(opts, "check", None)
        if callable(check):
            check()
        return opts

    def check(self, model: nn.Module, cfg: "TrainConfig") -> None:
        """Refuse, with a ConfigError, options that do not fit this model (called before any training)."""

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

    def lr_factor(self, step: int) -> float:
        """The factor on every optimiser group's learning rate at ``step`` (0-based, the step about to be taken):
        1 by default (constant learning rates)."""
        return 1.0

    def after_step(self) -> None:
        """Called after the main optimiser step (e.g. to step a dual optimiser)."""

    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {}

    def exportable(self, model: nn.Module) -> nn.Module:
        """The plain (or gated) HF model to export."""
        return model
