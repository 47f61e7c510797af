"""The configuration of one training run. Validates itself; errors name the bad value."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from finegates.errors import ConfigError
from finegates.gated_model import CLOSE_SCHEDULES, DUAL_RESETS, LAYOUTS, PENALTIES, RECOVERY_LRS
from finegates.gates import GATE_INITS


PRECISIONS = ("auto", "no", "fp16", "bf16")
TEACHERS = ("none", "lora", "full")
EVAL_PARTS = ("all", "selection", "report")  # tasks.data.EVAL_PARTS


#: ``--smoke-test`` sizes of one run, shared by ``finegates.train`` and every trial of ``tune.run``
SMOKE_SIZES: dict[str, Any] = dict(max_train=64, max_eval=64, epochs=1.0, max_length=64, latency_repeats=2,
                                   latency_batch=2, latency_length=32)


def parse_count(value: str | int | None, flag: str) -> int | None:
    """A subset size given on a command line: a positive integer, or 'all' (also 'none') for the whole
    split. 0 is refused (it reads as "no examples", not "all"). Raises a one-line :class:`ConfigError`."""
    if value is None or str(value).strip().lower() in ("all", "none"):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{flag} {value!r} is not an integer; accepted: a positive integer or 'all'") from None
    if n <= 0:
        raise ConfigError(f"{flag} {value} must be > 0; accepted: a positive integer or 'all'")
    return n


def teacher_init_problem(teacher_init: bool | None, teacher: str | None) -> str | None:
    """The one-line error of a command line that asks for ``--teacher-init`` with ``--teacher none`` (None: no
    problem). TrainConfig itself ignores ``teacher_init`` without a teacher, since it is on by default."""
    if teacher_init and teacher == "none":
        return "--teacher-init needs a teacher, got --teacher none; accepted: --teacher lora or full"
    return None


def parse_frac_or_none(value: str) -> float | str:
    """``--max-recovery-frac``'s type: a number, or ``"none"`` (kept as the string, so that a command line can tell
    "given as none" from "not given")."""
    if value.strip().lower() == "none":
        return "none"
    try:
        return float(value)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"{value!r} is not a number; accepted: a number in [0, 1], or none") from None


def max_recovery_problem(given: float | str | None, penalty: str) -> str | None:
    """The one-line error of a command line that gives ``--max-recovery-frac`` a number with a penalty other than
    the controller's (None: no problem). TrainConfig ignores the option there, since it has a default."""
    if given is not None and given != "none" and penalty != "controller":
        return (f"--max-recovery-frac {given:g} has no effect with --penalty {penalty}; accepted: --penalty controller "
                "(an early recovery waits for the controller's target), or none")
    return None


# Fields added after trials began to record their config (tune.trial's train_config tag, since 0cdcd5b), whose default
# is not what a run did before the field existed, with that behaviour: a config recorded before one of them lacks it,
# and TrainConfig.from_dict reads it as the run was trained. A field added later with such a default belongs here.
BEFORE_THE_FIELD: dict[str, Any] = {
    "close_schedule": "at-pin",  # 2481cb0: all the closing at the pin before the gradual schedule
    "teacher_init": False,  # db2062d: a student started from the pretrained model
    "dual_reset": "none",  # fa82813: the controller's multiplier never restarted
    "max_recovery_frac": None,  # 1299006: the recovery always began at recovery_frac
}


@dataclass
class TrainConfig:
    task: str = "sst2"
    model: str | None = None  # None: the embedded all-MiniLM-L6-v2
    method: str = "finegates"
    # FineGates
    penalty: str = "controller"  # controller (reach target_sparsity) | paper | code
    target_sparsity: float = 0.4  # controller: fraction of gated weights to remove (0 = dense reference)
    lam: float = 3.0  # paper/code penalty weight lambda (0 = no penalty); unused by the controller
    layout: str = "coupled"  # coupled | independent
    gate_init: str = "edge"  # edge (task gradient from step 0) | saturated (official code)
    rank: int = 0  # LoRA rank inside the gates; 0 = gates only
    lora_alpha: float | None = None
    train_bias: bool = True
    # optimisation
    lr: float = 2e-3  # head (and LoRA) learning rate
    head_lr: float | None = None  # the classification head's own learning rate (None: the method's lr)
    gate_lr: float = 5e-2  # gate learning rate
    # controller: learning rate of its multipliers. 0.5 since session 17 (0.15 before): a faster controller brings the
    # gates to the target before the pin, and the restart below holds them near it (docs/COMPRESSION.md, "A faster
    # controller")
    dual_lr: float = 0.5
    # controller: crossing (the linear multiplier restarts from 0 each time the expected sparsity crosses the target,
    # so the lag it summed during the ramp does not carry the gates past the target) | none (before session 16).
    # docs/COMPRESSION.md, "A controller that restarts its multiplier"
    dual_reset: str = "crossing"
    warmup_frac: float = 0.4  # controller: fraction of steps over which the target ramps up from 0
    recovery_frac: float = 0.3  # last fraction of steps with the structure fixed (0 = none)
    # controller: the recovery may start earlier, at the first step from which at most this fraction of the steps
    # remains (and the target's ramp is over) where the gates' expected sparsity has reached the target (the gates
    # are done: the extra steps go to the recovery); it starts at recovery_frac at the latest. None, or a fraction
    # <= recovery_frac: always at recovery_frac (before session 20). No effect without the controller, nor without a
    # recovery (recovery_frac 0).
    # docs/COMPRESSION.md, "A recovery that starts when the gates are done"
    max_recovery_frac: float | None = 0.45
    # the learning rates during the recovery: constant (those of the run) | linear (every one decays linearly from its
    # value at the pin to 0 at the last step). docs/COMPRESSION.md, "A recovery that anneals"
    recovery_lr: str = "constant"
    # controller: gradual (the closed fraction follows at least a line from 0 at the end of the warmup to the
    # target at the pin; what the gates have not closed closes, least open first) | aligned (the same line, and
    # what closes is what the structure the exporter writes at that fraction drops: the pin's aligned plan) |
    # at-pin (all of it at the pin). docs/COMPRESSION.md, "Closing on a schedule"
    close_schedule: str = "gradual"
    # distillation from a dense teacher finetuned on the same data (trained once, cached)
    teacher: str = "lora"  # lora | full | none (docs/COMPRESSION.md: distillation wins, so it is on)
    distill_alpha: float = 0.5  # loss = (1 - alpha) task + alpha distillation
    distill_temperature: float = 2.0
    # weight of the hidden-state loss (CoFi's layer distillation, layers matched one to one): the mean over layers of
    # the mean squared difference between the student's and the teacher's hidden states on real tokens. Costs a
    # teacher forward pass per step. 0 = off (logits only)
    layer_distill: float = 0.0
    teacher_lr: float | None = None  # None: lora 1e-3, full 5e-5
    # the teacher's epochs; None: the student's. A student that starts from its teacher (teacher_init) can train for
    # fewer epochs than the teacher it starts from, and still shares it with the other trials of its task
    teacher_epochs: float | None = None
    # a distilled student starts from its teacher's finetuned weights (its export; gates and LoRA go on top), not
    # from the pretrained model: it prunes a model that already knows the task. No teacher: nothing to start from
    # (docs/COMPRESSION.md, session 13)
    teacher_init: bool = True
    teacher_cache: str | None = None  # None: $FINEGATES_TEACHER_CACHE or ~/.cache/finegates/teachers
    epochs: float = 3.0
    batch_size: int = 16
    max_length: int = 128
    max_train: int | None = 1000
    max_eval: int | None = None
    weight_decay: float = 0.0
    seed: int = 1948  # training draws (and the data, unless data_seed is set)
    data_seed: int | None = None  # seed of the train/eval subsets and of the eval split; None = seed
    # evaluation: the whole eval set, or one part of its seeded stratified split (tune.run: trials see the
    # selection part; the selector scores its picks once on the report part)
    eval_part: str = "all"  # all | selection | report
    report_frac: float = 0.5  # fraction of the eval set in the report part
    # data and hardware
    data_dir: str | None = None
    threads: int | None = None
    precision: str = "auto"
    # export and timing
    output_dir: str | None = None
    save_model: bool = True  # write the exported model to output_dir/model (False: result and predictions only)
    latency_batch: int = 8
    latency_length: int = 128
    latency_repeats: int = 10
    extra: dict[str, Any] = field(default_factory=dict)  # the method's options (its Options dataclass)

    def __post_init__(self) -> None:
        from finegates.methods import METHOD_NAMES, get_method_class

        def bad(name: str, value: Any, accepted: str) -> ConfigError:
            return ConfigError(f"{name}={value!r} is invalid; accepted: {accepted}")

        def finite(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if self.method not in METHOD_NAMES:
            raise bad("method", self.method, ", ".join(METHOD_NAMES))
        if not isinstance(self.extra, dict):
            raise bad("extra", self.extra, "a dict of the method's options")
        get_method_class(self.method).parse_options(self.extra)  # unknown option or wrong type: ConfigError
        if not finite(self.lam) or self.lam < 0:
            raise bad("lambda", self.lam, "a finite number >= 0")
        if self.penalty not in PENALTIES:
            raise bad("penalty", self.penalty, ", ".join(PENALTIES))
        if self.layout not in LAYOUTS:
            raise bad("layout", self.layout, ", ".join(LAYOUTS))
        if self.dual_reset not in DUAL_RESETS:
            raise bad("dual_reset", self.dual_reset, ", ".join(DUAL_RESETS))
        if self.recovery_lr not in RECOVERY_LRS:
            raise bad("recovery_lr", self.recovery_lr, ", ".join(RECOVERY_LRS))
        if self.close_schedule not in CLOSE_SCHEDULES:
            raise bad("close_schedule", self.close_schedule, ", ".join(CLOSE_SCHEDULES))
        if not finite(self.target_sparsity) or not 0 <= self.target_sparsity < 1:
            raise bad("target_sparsity", self.target_sparsity, "a number in [0, 1)")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise bad("rank", self.rank, "an integer >= 0 (0 = gates only)")
        for name in ("lr", "gate_lr"):
            v = getattr(self, name)
            if not finite(v) or v <= 0:
                raise bad(name, v, "a finite number > 0")
        if not finite(self.dual_lr) or self.dual_lr <= 0:
            raise bad("dual_lr", self.dual_lr, "a finite number > 0")
        if not finite(self.epochs) or self.epochs <= 0:
            raise bad("epochs", self.epochs, "a number > 0")
        if self.gate_init not in GATE_INITS:
            raise bad("gate_init", self.gate_init, ", ".join(GATE_INITS))
        for name in ("warmup_frac", "recovery_frac", "distill_alpha"):
            v = getattr(self, name)
            if not finite(v) or not 0 <= v <= 1:
                raise bad(name, v, "a number in [0, 1]")
        if self.warmup_frac + self.recovery_frac > 1:
            raise bad("warmup_frac + recovery_frac", self.warmup_frac + self.recovery_frac, "at most 1")
        if self.max_recovery_frac is not None and (not finite(self.max_recovery_frac)
                                                   or not 0 <= self.max_recovery_frac <= 1):
            raise bad("max_recovery_frac", self.max_recovery_frac, "none, or a number in [0, 1]")
        if self.teacher not in TEACHERS:
            raise bad("teacher", self.teacher, ", ".join(TEACHERS))
        if not isinstance(self.teacher_init, bool):
            raise bad("teacher_init", self.teacher_init, "true or false")
        if not finite(self.layer_distill) or self.layer_distill < 0:
            raise bad("layer_distill", self.layer_distill, "a finite number >= 0 (0 = off)")
        if self.layer_distill > 0 and self.teacher == "none":
            raise bad("layer_distill", self.layer_distill, "0 without a teacher (--teacher none), or a teacher")
        if not finite(self.distill_temperature) or self.distill_temperature <= 0:
            raise bad("distill_temperature", self.distill_temperature, "a finite number > 0")
        if self.head_lr is not None and (not finite(self.head_lr) or self.head_lr <= 0):
            raise bad("head_lr", self.head_lr, "a finite number > 0, or none for the method's lr")
        if self.teacher_lr is not None and (not finite(self.teacher_lr) or self.teacher_lr <= 0):
            raise bad("teacher_lr", self.teacher_lr, "a finite number > 0, or none for the method's default")
        if self.teacher_epochs is not None and (not finite(self.teacher_epochs) or self.teacher_epochs <= 0):
            raise bad("teacher_epochs", self.teacher_epochs, "a number > 0, or none for the student's epochs")
        for name in ("batch_size", "max_length", "latency_batch", "latency_length", "latency_repeats"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise bad(name, v, "an integer > 0")
        for name in ("max_train", "max_eval"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise bad(name, v, "an integer > 0, or none for the whole split")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise bad("threads", self.threads, "an integer > 0")
        if self.eval_part not in EVAL_PARTS:
            raise bad("eval_part", self.eval_part, ", ".join(EVAL_PARTS))
        if not finite(self.report_frac) or not 0 < self.report_frac < 1:
            raise bad("report_frac", self.report_frac, "a number in (0, 1)")
        for name in ("seed", "data_seed"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise bad(name, v, "an integer >= 0")
        if not isinstance(self.save_model, bool):
            raise bad("save_model", self.save_model, "true or false")
        if self.precision not in PRECISIONS:
            raise bad("precision", self.precision, ", ".join(PRECISIONS))

    @property
    def subset_seed(self) -> int:
        """The seed of the data: train/eval subsets and the eval split."""
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def options(self) -> dict[str, Any]:
        """Every option of the method at the value this run uses (``extra`` holds only those that were set; the rest
        take the method's defaults), in JSON types: tuples as lists."""
        from finegates.methods import get_method_class

        opts = asdict(get_method_class(self.method).parse_options(self.extra))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}

    def recorded(self) -> dict[str, Any]:
        """:meth:`to_dict` with every option of the method (:meth:`options`): what a run records of its config (a
        trial's ``train_config`` tag, result.json), so that a later change of an option's default does not change
        what the record reads as (:meth:`from_dict`). Reads back as the same run: ``from_dict(recorded())``
        trains what this config trains."""
        return {**self.to_dict(), "extra": self.options()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config that ``d`` (a :meth:`to_dict`, e.g. a trial's ``train_config`` tag) records. A key it lacks takes
        its default, except a field added after such records began whose default is not what the code did before it
        existed (:data:`BEFORE_THE_FIELD`): the recorded run trained that way, so a re-run of it (tune.seeds) does.
        The same for the method's options (``extra``): one that a record lacks takes its default, except those in the
        method's ``options_before`` (added after :meth:`recorded` began to write every option)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; accepted: {', '.join(sorted(names))}")
        d = {**BEFORE_THE_FIELD, **d}
        from finegates.methods import METHOD_NAMES, get_method_class

        method = d.get("method", cls.method)
        if method in METHOD_NAMES and isinstance(d.get("extra", {}), dict):  # else __init__ says what is wrong
            d["extra"] = {**get_method_class(method).options_before, **d.get("extra", {})}
        return cls(**d)
