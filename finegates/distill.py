"""Distillation from a dense teacher: train it once per task and data, cache it, reuse it.

A teacher is a dense finetune (``lora`` or ``full``) of the same base model on the same training subset
(same task, examples, length, epochs, seed) as the student. It is trained by the same
:func:`finegates.train.run` a student runs, once; its logits on every training example are stored beside
it, so a student pays no teacher forward pass: the distillation target of a batch is a lookup.

Cache layout (``<root>/<key>/``): ``teacher.json`` (what it is, its score, its training time),
``train_logits.npy`` (n_train x num_labels, float32, in the order of the student's training data),
``model/`` (the exported teacher). ``key`` hashes everything that changes the teacher. Concurrent trials of
one task (a sweep) take a file lock: one trains, the others wait and then reuse it.

A dense run given a teacher cache that trains exactly such a teacher (``teacher_of_run``: LoRA r8 at lr 1e-3, or
full finetuning at 5e-5, on the same data and seed, as the LoRA baseline of a sweep or of
benchmarks/compression_frontier.py does) puts its model into the cache when it ends (``publish_teacher``): the
students of that task then reuse it instead of training the same model a second time.

Loss (Hinton et al. 2015): classification ``T^2 KL(softmax(t / T) || softmax(s / T))``; regression
``MSE(s, t)``. The student minimises ``(1 - alpha) task + alpha distillation``, plus, with ``layer_distill``
> 0, that weight times the hidden-state loss (CoFi's layer distillation, :func:`hidden_state_loss`), for which
the teacher runs beside the student (one forward pass per step).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from finegates.locking import file_lock

if TYPE_CHECKING:
    from finegates.config import TrainConfig

log = logging.getLogger(__name__)

TEACHER_LR = {"lora": 1e-3, "full": 5e-5}
TEACHER_RANK = {"lora": 8, "full": 0}


@dataclass
class Teacher:
    path: Path
    train_logits: np.ndarray  # (n_train, num_labels)
    info: dict[str, Any]  # teacher.json
    reused: bool  # True when this call found it in the cache


def cache_root(cfg: "TrainConfig") -> Path:
    root = cfg.teacher_cache or os.environ.get("FINEGATES_TEACHER_CACHE") or "~/.cache/finegates/teachers"
    return Path(root).expanduser().resolve()


def teacher_config(cfg: "TrainConfig") -> "TrainConfig":
    """The teacher's own training run: the student's task, model, data and schedule, dense method."""
    # seeded by the data seed: a student re-run with another training seed (tune.run --seeds) keeps its teacher
    return replace(cfg, method=cfg.teacher, teacher="none", teacher_init=False, layer_distill=0.0,
                   rank=TEACHER_RANK[cfg.teacher], epochs=cfg.teacher_epochs or cfg.epochs, teacher_epochs=None,
                   seed=cfg.subset_seed, data_seed=None,
                   lr=cfg.teacher_lr or TEACHER_LR[cfg.teacher], head_lr=None, lora_alpha=None, output_dir=None,
                   extra={},
                   latency_repeats=1, latency_batch=1, latency_length=8)


def rows_digest(rows: list[dict]) -> str:
    """A digest of tokenised training rows (ids, labels, order)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["input_ids"], r["labels"]]).encode())
    return h.hexdigest()


def teacher_key(tcfg: "TrainConfig", model_path: str, train_rows: list[dict]) -> str:
    """Everything that changes the teacher's weights or the order of its logits."""
    ident = {k: getattr(tcfg, k) for k in ("task", "method", "rank", "lr", "epochs", "batch_size", "max_length",
                                           "max_train", "seed", "weight_decay", "precision")}
    ident["model"] = model_path
    ident["train_rows"] = rows_digest(train_rows)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]




def _load(d: Path, reused: bool) -> Teacher:
    info = json.loads((d / "teacher.json").read_text())
    return Teacher(d, np.load(d / "train_logits.npy"), info, reused)


def teacher_dir(cfg: "TrainConfig", kind: str, key: str) -> Path:
    """The cache folder of the ``kind`` teacher with this key, for ``cfg``'s task and cache."""
    return cache_root(cfg) / f"{cfg.task}-{kind}-{key}"


def _store(tmp: Path, d: Path, info: dict[str, Any], logits: np.ndarray) -> Path:
    """Finish a teacher written into ``tmp`` (its ``model/`` already there): logits and teacher.json, then one
    rename to ``d``, so that a reader finds a whole teacher or none. The caller holds ``d``'s lock. Returns ``d``."""
    np.save(tmp / "train_logits.npy", logits.astype(np.float32))
    info = info | {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / "teacher.json").write_text(json.dumps(info, indent=2))
    os.replace(tmp, d)
    return d


def _info(key: str, tcfg: "TrainConfig", model_path: str, n_train: int, score: float, train_time: float) -> dict:
    return {"key": key, "task": tcfg.task, "method": tcfg.method, "lr": tcfg.lr, "rank": tcfg.rank,
            "epochs": tcfg.epochs, "max_train": tcfg.max_train, "n_train": n_train, "seed": tcfg.seed,
            "model": model_path, "score": score, "train_time_s": train_time}


def get_teacher(cfg: "TrainConfig", model_path: str, train_rows: list[dict], collate) -> Teacher:
    """The cached teacher for this student config, trained first if there is none (under a lock)."""
    from finegates.train import logits_of, run

    tcfg = teacher_config(cfg)
    key = teacher_key(tcfg, model_path, train_rows)
    d = teacher_dir(cfg, cfg.teacher, key)
    with file_lock(d.parent / f".{d.name}.lock"):
        if (d / "teacher.json").is_file():
            log.info("teacher %s: reused", d)
            return _load(d, reused=True)
        log.info("teacher %s: training (%s, lr %g)", d, tcfg.method, tcfg.lr)
        tmp = d.parent / f".{d.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        result = run(replace(tcfg, output_dir=str(tmp), teacher_cache=None))  # no cache: it is being stored here
        train_time = time.perf_counter() - t0
        from finegates.export import load_compressed

        model = load_compressed(tmp / "model")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        logits = logits_of(model, train_rows, collate, max(tcfg.batch_size, 64), device)
        _store(tmp, d, _info(key, tcfg, model_path, len(train_rows), result["score"], train_time), logits)
        return _load(d, reused=False)


def teacher_of_run(cfg: "TrainConfig") -> "TrainConfig | None":
    """The teacher that the dense run ``cfg`` trains exactly (``teacher_config`` of a student of the same task,
    data and schedule: same method, rank, learning rates, seed, options), or None when it trains something else.
    What a teacher's weights do not depend on (where its outputs and latency go) is left out of the comparison."""
    if cfg.method not in TEACHER_LR:
        return None
    t = teacher_config(replace(cfg, teacher=cfg.method))
    as_run = replace(cfg, teacher=t.teacher, teacher_init=t.teacher_init, output_dir=t.output_dir,
                     latency_repeats=t.latency_repeats, latency_batch=t.latency_batch,
                     latency_length=t.latency_length, data_seed=None if cfg.data_seed in (None, cfg.seed)
                     else cfg.data_seed)
    return t if as_run == t else None


def publish_teacher(cfg: "TrainConfig", model_path: str, train_rows: list[dict], collate, model: torch.nn.Module,
                    tokenizer, score: float, train_time: float, device: torch.device | str = "cpu") -> Path | None:
    """A dense run that trained exactly a student's teacher (:func:`teacher_of_run`) puts its exported model into
    the teacher cache, with its logits on ``train_rows``, so that the students of that task and data reuse it
    instead of training the same model again (the LoRA baseline of a sweep or of the frontier is their teacher).
    Returns the teacher's folder; None where the run is not such a teacher, the teacher is already cached, or
    another process holds its lock (it is training it now: this run does not wait for it)."""
    from finegates.export import save_compressed
    from finegates.train import logits_of

    tcfg = teacher_of_run(cfg)
    if tcfg is None:
        return None
    key = teacher_key(tcfg, model_path, train_rows)
    d = teacher_dir(cfg, cfg.method, key)
    with file_lock(d.parent / f".{d.name}.lock", blocking=False) as locked:
        if not locked or (d / "teacher.json").is_file():
            return None
        tmp = d.parent / f".{d.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        save_compressed(model, tmp / "model", tokenizer, extra={"task": cfg.task, "method": cfg.method,
                                                                "score": score, "config": tcfg.recorded()})
        train_time += time.perf_counter() - t0  # its training and export; the logits pass not (as get_teacher)
        logits = logits_of(model, train_rows, collate, max(tcfg.batch_size, 64), device)
        info = _info(key, tcfg, model_path, len(train_rows), score, train_time) | {"published_by": "dense run"}
        log.info("teacher %s: published by this %s run", d, cfg.method)
        return _store(tmp, d, info, logits)


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                      attention_mask: torch.Tensor) -> torch.Tensor:
    """CoFi's layer distillation (Xia et al. 2022), each layer matched to the same layer of the teacher (pruning
    keeps every layer and the hidden width): the mean over the transformer layers of the mean squared difference
    of the hidden states, over the real tokens (``attention_mask``). ``student``, ``teacher``: the models'
    ``hidden_states`` (the embeddings' output first, left out: the student's embeddings are frozen)."""
    mask = attention_mask.unsqueeze(-1).float()
    n = mask.sum() * student[-1].shape[-1]
    return torch.stack([(((s.float() - t.float()) ** 2) * mask).sum() / n
                        for s, t in zip(student[1:], teacher[1:], strict=True)]).mean()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, regression: bool) -> torch.Tensor:
    """student, teacher: (batch, num_labels) logits."""
    student, teacher = student.float(), teacher.float()
    if regression:
        return F.mse_loss(student.view(-1), teacher.view(-1))
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                    log_target=True) * t * t
