"""The trial: a thin adapter from a Ray Tune config to one ``finegates.train.run`` call.

It opens (or, for a restarted trial, reopens) the trial's MLflow child run from the worker, reports
every epoch to Tune with a checkpoint of the trainable tensors, exports the smaller model, logs it,
and makes a final report with ``final=True`` that the searcher tells its Optuna study.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from finegates.config import TrainConfig
from finegates.train import EpochReport, run
from tune.heldout import TAG_CONFIG, config_tag

log = logging.getLogger(__name__)


def trial_config(config: dict[str, Any], fixed: dict[str, Any], output_dir: str) -> TrainConfig:
    """TrainConfig of a trial: the sweep's fixed settings + the searched ones (method options that are
    not TrainConfig fields, like GIFT-SW's ``k``, go to ``extra``)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = dict(fixed["train"])
    extra = dict(kw.pop("extra", {}) or {})
    for k, v in config.items():
        if k in ("reference",) or k.startswith("_"):
            continue
        if k in names:
            kw[k] = v
        else:
            extra[k] = v
    kw["output_dir"] = output_dir
    from finegates.methods import get_method

    if not get_method(kw.get("method", "finegates")).prunes:
        kw["teacher"] = "none"  # distillation is part of compressing; the dense baselines train as published
        kw["teacher_init"] = False
        kw["layer_distill"] = 0.0
    return TrainConfig(**kw, extra=extra)


def trial_params(config: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The trial's whole effective configuration (searched values, sweep settings, defaults, among them
    ``max_length``, which the registered pyfunc model tokenises with, and every option of its method): its MLflow
    params."""
    return {k: v for k, v in config.items() if not k.startswith("_")} | {
        k: v for k, v in cfg.to_dict().items() if k not in ("data_dir", "output_dir", "extra")} | cfg.options()


def trial_fn(config: dict[str, Any], fixed: dict[str, Any]) -> None:
    """Ray Tune function trainable. ``fixed``: sweep-wide settings (built in :func:`tune.run.sweep`)."""
    import ray
    from ray import tune
    from safetensors.torch import save_file

    from tune.tracking import Tracker

    trial_id = tune.get_context().get_trial_id() or config.get("_trial_id", "local")
    tracker = Tracker(fixed["mlflow_uri"], experiment_id=fixed["experiment_id"])
    task, method = config["task"], config["method"]
    out = Path(fixed["models_dir"]) / task / trial_id
    cfg = trial_config(config, fixed, str(out))
    params = trial_params(config, cfg)
    run_id = tracker.trial_run(fixed["sweep"], fixed["parents"][task], trial_id, task, method, params)
    # the exact config, for the selector's held-out scoring and seed re-runs (tune.heldout, tune.seeds)
    tracker.tag(run_id, TAG_CONFIG, config_tag(cfg))

    def on_epoch(rep: EpochReport) -> None:
        m = rep.metrics
        tracker.log_epoch(run_id, m, step=int(m["epoch"]))
        with tempfile.TemporaryDirectory() as d:
            save_file(rep.trainable_state(), os.path.join(d, "trainable.safetensors"))
            (Path(d) / "epoch.txt").write_text(str(m["epoch"]))
            tune.report({**_numbers(m), "final": False, "task": task, "method": method},
                        checkpoint=tune.Checkpoint.from_directory(d))

    try:
        result = run(cfg, on_epoch=on_epoch)
        tracker.finish_trial(run_id, result, result.get("model_path"))
    except SystemExit as e:
        if e.code in (0, None):  # Tune stopped the trial at a report (tune.scheduler): not a failure
            tracker.end_stopped(run_id)
        else:
            tracker.fail_trial(run_id, e)
        raise
    except BaseException as e:
        tracker.fail_trial(run_id, e)
        raise
    final = {k: v for k, v in result.items() if k not in ("history", "config", "layers")}
    tune.report({**_numbers(final), "final": True, "task": task, "method": method, "mlflow_run_id": run_id,
                 "node_id": ray.get_runtime_context().get_node_id(), "device": result["device"],
                 "model_path": result.get("model_path") or "", "validation_source": result["validation_source"]})


def _numbers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def seed_rerun(config_json: str, seed: int, trial_run_id: str, fixed: dict[str, Any]) -> float:
    """One seed re-run of a trial (tune.seeds): its exact config and data, another training seed; logged as an
    MLflow child run of the trial (metrics and eval predictions, no model). Returns the score."""
    from tune.tracking import Tracker

    tracker = Tracker(fixed["mlflow_uri"], experiment_id=fixed["experiment_id"])
    cfg = TrainConfig.from_dict(json.loads(config_json))
    out = Path(fixed["models_dir"]) / cfg.task / "seed-reruns" / f"{trial_run_id}-seed{seed}"
    cfg = dataclasses.replace(cfg, data_seed=cfg.subset_seed, seed=seed, output_dir=str(out), save_model=False)
    run_id = tracker.rerun_run(fixed["sweep"], trial_run_id, cfg.task, cfg.method, seed)
    try:
        result = run(cfg)
        tracker.finish_trial(run_id, result, None)
    except BaseException as e:
        tracker.fail_trial(run_id, e)
        raise
    return float(result["score"])
