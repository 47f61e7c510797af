"""The sweep: finetune and compress every task with FineGates (and the other methods) in one Ray Tune
run, Optuna searching target sparsity, learning rate and LoRA rank per task, MLflow recording every trial;
then select, per task and budget, the best compressed model.

    python -m tune.run --tasks glue --budget 0.02              # local Ray, embedded MiniLM, local MLflow
    python -m tune.run --smoke-test                            # 2 tasks x 2 trials, tiny data
    python -m tune.run --address auto --gpus-per-trial 0.25    # on a Ray cluster

Caveats:
* Defaults follow the hardware: with ``--gpus-per-trial 0`` (the default) trials are sized for a
  small CPU machine (256 train examples, 3 epochs, 5 trials per task, 3 with ``--scheduler none``:
  early stopping pays for the other two); with GPUs (``--scale gpu``,
  implied by ``--gpus-per-trial > 0``) 2000 train examples, 5 epochs, 12 trials per task. Every size
  option overrides its default.
* The sweep's results live in ``--storage``/``--experiment`` (Ray), in the MLflow experiment of
  the same name and in its Optuna studies ``<experiment>/<task>/<method>`` in ``--optuna-storage``
  (default: ``optuna.db`` beside the MLflow SQLite database; ``optuna-dashboard <storage>`` shows each
  study's Pareto front and trials); ``--resume`` continues all three. A fresh sweep whose studies
  already have trials in that storage is refused: resume it, or give another ``--experiment`` or
  ``--optuna-storage``.
* Exit codes: 2 when the input is refused before anything starts (every problem on its own ``error:``
  line: data, model, paths, tracking store, ``--address``, ``--optuna-storage``, ``--resume`` without a
  sweep); 1 when some task got no finished trial (per task, the first line of its trials' error); 0
  otherwise.
* When a task has no validation split in the data directory (QQP offline), a seeded train hold-out is
  used and recorded as ``validation_source=train-holdout``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finegates.config import RECOVERY_LRS, SMOKE_SIZES, parse_frac_or_none, teacher_init_problem
from finegates.methods import METHOD_NAMES
from tune.errors import UsageError
from tune.tracking import TAG_REGISTRY_SUFFIX

if TYPE_CHECKING:
    from tune.tracking import Tracker

log = logging.getLogger("tune.run")

SCALES = {
    # 5 trials per task on a CPU fit the ~20 minutes that 3 took before early stopping (docs/BENCHMARKS.md);
    # with --scheduler none the CPU default stays 3 (UNSCHEDULED_TRIALS)
    "cpu": dict(trials_per_task=5, max_train=256, max_eval=300, epochs=3.0, latency_repeats=5),
    "gpu": dict(trials_per_task=12, max_train=2000, max_eval=None, epochs=5.0, latency_repeats=20),
    "smoke": dict(trials_per_task=2, **SMOKE_SIZES),  # the same per-run preset as finegates.train --smoke-test
}
UNSCHEDULED_TRIALS = {"cpu": 3}  # default trials per task when every trial runs all its epochs
SMOKE_TASKS = "sst2,rte"
#: registered models of a --smoke-test sweep are named finegates-<task>-smoke: never a real sweep's aliases
SMOKE_REGISTRY_SUFFIX = "-smoke"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    a = p.add_argument
    a("--tasks", default="glue", help="'glue' (the 8 GLUE tasks without WNLI) or a comma list (default: glue)")
    a("--budget", default="0.02", help="accuracy budget(s), comma list in [0, 1]; one selection each (default: 0.02)")
    a("--budget-mode", default="relative", choices=["relative", "absolute"], help="default: relative")
    a("--select-by", default="sparsity", choices=["sparsity", "latency"], help="default: sparsity")
    a("--latency-device", default="trial", choices=["trial", "cpu"], help="latency compared by --select-by latency: "
      "the trial's device (its GPU in bf16, fp16 where bf16 is unsupported, when it had one; CPU otherwise) or "
      "the CPU (default: trial)")
    a("--rule", default="paired", choices=["paired", "plain"], help="selection rule: paired = the 95%% paired "
      "bootstrap interval of (trial - reference) must show the loss within budget; plain = point scores "
      "(docs/SELECTION.md; default: paired)")
    a("--methods", default="finegates", help="comma list of: " + ", ".join(METHOD_NAMES) + " (default: finegates)")
    a("--model", default=None, help="HF model dir or hub id (default: the embedded all-MiniLM-L6-v2)")
    a("--trials-per-task", type=int, default=None, help="trials per task and method, reference included "
      "(default: 5 cpu (3 with --scheduler none), 12 gpu, 2 smoke)")
    a("--max-concurrent", type=int, default=None, help="concurrent trials (default: as many as resources allow)")
    a("--cpus-per-trial", type=float, default=None, help="CPUs per trial (default: 2, or all CPUs of a local "
      "machine with fewer)")
    a("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractional allowed (default: 0)")
    a("--scale", default="auto", choices=["auto", "cpu", "gpu"], help="default sizes (auto: gpu if "
      "--gpus-per-trial > 0)")
    a("--mlflow-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
      "sqlite:///<cwd>/mlflow.db)")
    a("--experiment", default=None, help="sweep name = MLflow experiment = Ray run name (default: "
      "finegates-<tasks>)")
    a("--storage", default=None, help="Ray results: absolute path or URI (default: <cwd>/runs/ray)")
    a("--optuna-storage", default=None, help="Optuna RDB storage of the sweep's studies "
      "(<experiment>/<task>/<method>): sqlite:///<path> or a database server's URL, e.g. "
      "postgresql://user:pw@host/db (default: $FINEGATES_OPTUNA_STORAGE, else optuna.db beside the MLflow SQLite "
      "database, else <cwd>/optuna.db)")
    a("--out", default=None, help="selection output dir (default: <cwd>/runs/<experiment>)")
    a("--address", default=None, help="attach to a Ray cluster ('auto' or host:port; default: start a local Ray)")
    a("--resume", action="store_true", help="continue an interrupted sweep of the same --experiment/--storage; "
      "refused (exit 2) when there is none")
    a("--resume-or-start", action="store_true", help="continue the sweep when there is one, else start it")
    a("--smoke-test", action="store_true", help="2 tasks (sst2, rte), 2 trials each, tiny subsets; models are "
      "registered as finegates-<task>-smoke")
    a("--seed", type=int, default=1948, help="seed of data subsets, training and the samplers (default: 1948)")
    a("--data-dir", default=None, help="local GLUE Parquet dir (default: $FINEGATES_GLUE_DIR, else the HF hub)")
    a("--max-train", default=None, help="train examples per trial: a positive integer or 'all'")
    a("--max-eval", default=None, help="eval examples per trial: a positive integer or 'all'")
    a("--epochs", type=float, default=None, help="epochs per trial")
    a("--batch-size", type=int, default=16, help="default: 16")
    a("--max-length", type=int, default=None, help="max tokens per example (default: 128)")
    a("--gate-lr", type=float, default=None, help="gate learning rate (default: finegates' default)")
    a("--head-lr", type=float, default=None, help="one learning rate for the classification head of every method "
      "and trial (default: each trial's searched --lr trains its head too)")
    a("--teacher", default=None, choices=["none", "lora", "full"], help="distil every trial from a dense teacher "
      "finetuned on the task's data, trained once per task (and node) and cached in <out>/teachers "
      "(default: finegates' default)")
    a("--teacher-init", action=argparse.BooleanOptionalAction, default=None, help="start every distilled trial "
      "from its task's teacher (--no-teacher-init: from the pretrained model; default: finegates' default)")
    a("--teacher-epochs", type=float, default=None, help="epochs of each task's teacher (default: the trials' "
      "epochs)")
    a("--recovery-frac", type=float, default=None, help="last fraction of each FineGates trial's steps with its "
      "pruned structure fixed and the kept weights training (default: finegates' default)")
    a("--max-recovery-frac", type=parse_frac_or_none, default=None, help="start each FineGates trial's recovery "
      "early, when its gates have reached the target, with at most this fraction of the steps left (finegates.train "
      "--max-recovery-frac); none: always at --recovery-frac (default: finegates' default)")
    a("--recovery-lr", default=None, choices=list(RECOVERY_LRS), help="learning rates during the recovery "
      "(default: finegates' default)")
    a("--search-space", default=None, help='JSON overrides of search ranges, e.g. \'{"target_sparsity": [0.2, 0.6], '
      '"rank": {"choices": [0, 8]}}\' (log-uniform [low, high] or categorical choices)')
    a("--report-frac", type=float, default=0.5, help="fraction of each task's evaluation set held out as its report "
      "part: trials and the selector see the rest; each pick is scored once on it (docs/SELECTION.md; default: 0.5)")
    a("--seeds", type=int, default=1, help="re-run the reference and each pick with this many seeds in all before "
      "registration; report mean +- std and drop a pick whose mean is not within budget (default: 1 = no re-runs)")
    a("--scheduler", default="budget", choices=["budget", "none"], help="early stopping at each epoch: budget = stop a "
      "trial below its task's budget threshold by more than --stop-margin, or dominated in (score, sparsity) by "
      "--stop-k trials, at the same epoch (references never; docs/SCHEDULER.md); none = every trial runs all its "
      "epochs (default: budget)")
    a("--stop-margin", type=float, default=0.05, help="score points below the budget threshold before a trial is "
      "stopped (default: 0.05)")
    a("--stop-k", type=int, default=2, help="stop a trial dominated by at least this many trials (default: 2)")
    a("--stop-rungs", default="all", help="epochs at which the scheduler decides: 'all' or a comma list such as 1,2 "
      "(default: all)")
    a("--max-failures", type=int, default=1, help="retries of a trial whose worker died (default: 1)")
    a("--verbose", type=int, default=1, help="Ray Tune verbosity 0-3 (default: 1)")
    return p


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Check every input before anything starts or is written. Raises one-line errors."""
    from finegates.config import ConfigError, TrainConfig, parse_count
    from finegates.train import resolve_model
    from tasks import parse_tasks, resolve_data_dir
    from tune.select import parse_budgets
    from tune.space import SPACES
    from tune.studies import StorageError, default_storage, normalise
    from tune.tracking import check_reachable, default_tracking_uri

    if args.smoke_test and args.tasks == "glue":
        args.tasks = SMOKE_TASKS
    tasks = [t.name for t in parse_tasks(args.tasks)]
    budgets = parse_budgets(args.budget, args.budget_mode)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in SPACES for m in methods):
        bad = [m for m in methods if m not in SPACES] or [args.methods]
        raise UsageError(f"--methods {','.join(bad)!r} is invalid; accepted: {', '.join(SPACES)}")
    scale = "smoke" if args.smoke_test else (args.scale if args.scale != "auto" else
                                             ("gpu" if args.gpus_per_trial > 0 else "cpu"))
    sizes = dict(SCALES[scale])
    default_trials = sizes.pop("trials_per_task")
    if args.scheduler == "none":
        default_trials = UNSCHEDULED_TRIALS.get(scale, default_trials)
    trials = args.trials_per_task if args.trials_per_task is not None else default_trials
    if trials < 1:
        raise UsageError(f"--trials-per-task {trials} must be >= 1 (the first trial is the reference)")
    if not 0 < args.report_frac < 1:
        raise UsageError(f"--report-frac {args.report_frac:g} is out of range; accepted: a number in (0, 1) "
                         "(0.5 = half of each evaluation set is held out for reporting)")
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds} is invalid; accepted: an integer >= 1 (1 = no re-runs)")
    if problem := teacher_init_problem(args.teacher_init, args.teacher):
        raise UsageError(problem)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent {args.max_concurrent} must be >= 1")
    if args.max_failures < 0:  # Ray reads -1 as "retry for ever": a trial that fails every time would never end
        raise UsageError(f"--max-failures {args.max_failures} is invalid; accepted: an integer >= 0 (retries of a "
                         "trial whose worker died)")
    if args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial} must be >= 0 (fractions like 0.25 allowed)")
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else float(min(2, os.cpu_count() or 1))
    if cpus <= 0:
        raise UsageError(f"--cpus-per-trial {cpus} must be > 0")
    storage = args.storage or str(Path("runs/ray").resolve())
    if "://" not in storage and not os.path.isabs(storage):
        raise UsageError(f"--storage {storage!r} must be an absolute path or a URI (s3://..., gs://..., file:///...)")
    data_dir = resolve_data_dir(args.data_dir)
    model = resolve_model(args.model)
    uri = args.mlflow_uri or default_tracking_uri()
    check_reachable(uri)
    try:
        optuna_storage = normalise(args.optuna_storage or default_storage(uri))
    except StorageError as e:
        raise UsageError(str(e)) from None
    for name in ("max_train", "max_eval"):
        if getattr(args, name) is not None:
            sizes[name] = parse_count(getattr(args, name), "--" + name.replace("_", "-"))
    for name in ("epochs", "max_length", "gate_lr", "head_lr", "teacher", "teacher_init", "teacher_epochs",
                 "recovery_frac", "max_recovery_frac", "recovery_lr"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if sizes.get("max_recovery_frac") == "none":
        sizes["max_recovery_frac"] = None  # given as none: the recovery always starts at --recovery-frac
    train = dict(model=model, data_dir=str(data_dir) if data_dir else None, batch_size=args.batch_size,
                 seed=args.seed, data_seed=args.seed, eval_part="selection", report_frac=args.report_frac,
                 threads=max(1, int(cpus)), **sizes)
    try:
        TrainConfig(task=tasks[0], **train)  # validates the shared training settings
    except ConfigError as e:
        raise UsageError(str(e)) from None
    space_spec: dict[str, Any] = {}
    if args.search_space:
        import json

        try:
            space_spec = json.loads(args.search_space)
            assert isinstance(space_spec, dict)
        except (ValueError, AssertionError):
            raise UsageError(f"--search-space {args.search_space!r} is not a JSON object; accepted: "
                             '\'{"target_sparsity": [0.2, 0.6], "rank": {"choices": [0, 8]}}\'') from None
    from tune.space import check_names, get_space, override

    try:
        check_names(space_spec, methods)  # a key no selected method searches is a typo or a wrong --methods
        spaces = [override(get_space(m), space_spec) for m in methods]
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_space_values(spaces, space_spec, train, tasks[0])
    experiment = args.experiment or ("finegates-smoke" if args.smoke_test else
                                     "finegates-" + ("glue" if args.tasks == "glue" else "-".join(tasks)))
    out = Path(args.out).resolve() if args.out else Path("runs", experiment).resolve()
    train["teacher_cache"] = str(out / "teachers")
    rule = _stop_rule(args, budgets, float(train["epochs"]))
    return dict(tasks=tasks, budgets=budgets, methods=methods, trials=trials, cpus=cpus, storage=storage, uri=uri,
                train=train, experiment=experiment, out=out, scale=scale, spaces=spaces,
                optuna_storage=optuna_storage, stop_rule=rule)


def _stop_rule(args: argparse.Namespace, budgets: list[float], epochs: float):
    """The scheduler's rule from the options (None for ``--scheduler none``); one-line UsageErrors."""
    from tune.scheduler import StopRule, parse_rungs

    if not (args.stop_margin >= 0 and args.stop_margin < 1):
        raise UsageError(f"--stop-margin {args.stop_margin:g} is out of range; accepted: a number in [0, 1) "
                         "(score points below the budget threshold)")
    if args.stop_k < 1:
        raise UsageError(f"--stop-k {args.stop_k} is invalid; accepted: an integer >= 1")
    try:
        rungs = parse_rungs(args.stop_rungs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    last = math.ceil(epochs)  # a trial reports once per (started) epoch: a later rung would never be reached
    if rungs is not None and rungs[-1] > last:
        raise UsageError(f"--stop-rungs {args.stop_rungs!r} has an epoch past the trials' last ({last}); accepted: "
                         f"'all' or epochs in 1..{last}")
    if args.scheduler == "none":
        return None
    return StopRule(budget=max(budgets), budget_mode=args.budget_mode, margin=args.stop_margin, k=args.stop_k,
                    rungs=rungs, epochs=epochs)


def _check_space_values(spaces: list, spec: dict[str, Any], train: dict[str, Any], task: str) -> None:
    """Every value that --search-space lets a trial draw (each choice, each end of a range) must make a valid trial
    configuration of each method that searches it; otherwise its trials would fail one by one in the sweep."""
    from optuna.distributions import CategoricalDistribution

    from finegates.config import ConfigError
    from tune.trial import trial_config

    for space in spaces:
        for name, dist in space.distributions.items():
            if name not in spec:
                continue
            values = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
            for value in values:
                try:
                    trial_config({**space.fixed, "method": space.method, "task": task, name: value}, {"train": train},
                                 output_dir="")
                except ConfigError as e:
                    raise UsageError(f"--search-space {name}: {e} (method {space.method})") from None


def _local_ray_resources() -> dict[str, float] | None:
    """The CPUs and GPUs that a local Ray started here would have, by Ray's own detection (cgroup CPU quotas,
    CUDA_VISIBLE_DEVICES), without starting it; None where this Ray version does not expose it."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource
        from ray._private.utils import get_num_cpus

        gpus = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
        return {"CPU": float(get_num_cpus()), "GPU": float(gpus)}
    except Exception:  # noqa: BLE001 - a private API: without it the check is skipped, Tune then warns as it waits
        return None


def _check_local_resources(v: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """A sweep without --address starts a Ray of its own, which has no autoscaler: a trial asking for more than the
    machine has would never start, and Tune would wait for it forever. Checked before Ray starts."""
    if args.address:
        return []  # a cluster may add nodes
    resources = _local_ray_resources()
    problem = resources and _local_resources_problem(resources, v["cpus"], args.gpus_per_trial)
    return [problem] if problem else []


def _local_resources_problem(resources: dict[str, float], cpus: float, gpus: float) -> str | None:
    """What is wrong with trials of ``cpus`` and ``gpus`` on a Ray of ``resources``; None when one trial fits."""
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if gpus > have_gpu:
        here = "0 here (no GPU)" if have_gpu == 0 else f"at most {have_gpu:g} here"
        return (f"--gpus-per-trial {gpus:g} asks for more than this machine's Ray has ({have_gpu:g} GPUs): no trial "
                f"could start; accepted: {here}, or --address of a cluster with GPU nodes")
    if cpus > have_cpu:
        return (f"--cpus-per-trial {cpus:g} asks for more than this machine's Ray has ({have_cpu:g} CPUs): no trial "
                f"could start; accepted: a number in (0, {have_cpu:g}] here, or --address of a larger cluster")
    return None


def sweep(v: dict[str, Any], args: argparse.Namespace) -> tuple[Tracker, dict[str, str]]:
    """Run (or resume) the Tuner; tag, plot and close each task's parent run. Returns the tracker and,
    for every task without a finished trial, a one-line reason (the first line of its trials' error)."""
    import ray
    from ray import tune

    from tune.callbacks import ParetoCallback
    from tune.searcher import MultiTaskOptunaSearch
    from tune.tracking import TAG_ROLE, TAG_SWEEP, Tracker, with_retry
    from tune.trial import trial_fn

    if not ray.is_initialized():  # before any MLflow run exists: a failure here leaves nothing RUNNING
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:  # always a Ray of its own, never a cluster that happens to run on this machine
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    tracker = Tracker(v["uri"], v["experiment"])
    if args.smoke_test:
        with_retry(lambda: tracker.client.set_experiment_tag(tracker.experiment_id, TAG_REGISTRY_SUFFIX,
                                                             SMOKE_REGISTRY_SUFFIX), "tag experiment")
    parents = {t: tracker.parent_run(v["experiment"], t) for t in v["tasks"]}
    fixed = dict(mlflow_uri=v["uri"], experiment_id=tracker.experiment_id, sweep=v["experiment"], parents=parents,
                 models_dir=str(v["out"] / "models"), train=v["train"])
    v["fixed"] = fixed
    trainable = tune.with_resources(tune.with_parameters(trial_fn, fixed=fixed),
                                    {"cpu": v["cpus"], "gpu": args.gpus_per_trial})
    if v.get("restore"):
        log.warning("resuming sweep %s from %s", v["experiment"], v["restore"])
        tuner = tune.Tuner.restore(v["restore"], trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        _restored_searcher(tuner).use_storage(v["optuna_storage"])  # the studies are read from this storage
    else:
        searcher = MultiTaskOptunaSearch(v["tasks"], v["spaces"], v["trials"], storage=v["optuna_storage"],
                                         experiment=v["experiment"], seed=args.seed)
        n = v["trials"] * len(v["tasks"]) * len(v["methods"])
        scheduler = None
        if v["stop_rule"] is not None:
            from tune.scheduler import BudgetStopper

            scheduler = BudgetStopper(v["stop_rule"], tracking=(v["uri"], tracker.experiment_id, v["experiment"]),
                                      methods=tuple(v["methods"]))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n, reuse_actors=True,
                                        max_concurrent_trials=args.max_concurrent),
            run_config=tune.RunConfig(
                name=v["experiment"], storage_path=v["storage"], verbose=args.verbose,
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                callbacks=[ParetoCallback(v["uri"], tracker.experiment_id, v["experiment"])]),
        )
    grid = tuner.fit()
    errors = sum(1 for r in grid if r.error is not None)
    trial_ids = {r.metrics.get("trial_id") for r in grid if r.metrics}
    trial_ids |= {t.trial_id for t in getattr(getattr(grid, "_experiment_analysis", None), "trials", [])}
    v["trial_ids"] = trial_ids  # for the reconcile after the seed re-runs (main)
    closed = tracker.reconcile(v["experiment"], trial_ids)
    v["stopped"] = len(tracker.find_runs(f"tags.`{TAG_ROLE}` = 'trial'", f"tags.`{TAG_SWEEP}` = '{v['experiment']}'",
                                         "tags.`stopped_early` = 'true'"))
    summary = (f"sweep {v['experiment']}: {len(grid)} trials, {errors} failed, {v['stopped']} stopped early; "
               f"{closed} stale MLflow runs closed")
    if errors or closed:  # something for the user to look at: a warning; else a status line, not labelled WARNING
        log.warning(summary)
    else:
        print(summary, flush=True)
    from tune.report import log_task_summary

    failed: dict[str, str] = {}
    for task in v["tasks"]:
        pts = tracker.update_pareto_tags(task, v["experiment"])
        log_task_summary(tracker, parents[task], task, pts, v["budgets"], args.budget_mode)
        with_retry(lambda: tracker.client.set_terminated(parents[task], status="FINISHED" if pts else "FAILED"),
                   "close parent run")
        if not pts:
            failed[task] = _task_failure(tracker, grid, task, v["experiment"])
    return tracker, failed


def _restored_searcher(tuner):
    """The searcher that ``Tuner.restore`` unpickled from the sweep's tuner.pkl (Ray has no public accessor)."""
    from tune.searcher import MultiTaskOptunaSearch

    searcher = tuner._local_tuner._tune_config.search_alg
    assert isinstance(searcher, MultiTaskOptunaSearch), type(searcher)
    return searcher


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def _task_failure(tracker: Tracker, grid, task: str, experiment: str) -> str:
    """One line: how many of the task's trials failed and the first line of their (first) error, from the
    MLflow runs' ``error`` tag, else from Ray's record of the trial."""
    from tune.tracking import TAG_ROLE, TAG_SWEEP, TAG_TASK

    runs = tracker.find_runs(f"tags.`{TAG_ROLE}` = 'trial'", f"tags.`{TAG_TASK}` = '{task}'",
                             f"tags.`{TAG_SWEEP}` = '{experiment}'")
    errors = [_first_line(r.data.tags["error"]) for r in sorted(runs, key=lambda r: r.info.start_time or 0)
              if r.data.tags.get("error")]
    ray_errors = [r.error for r in grid if r.error is not None and (r.config or {}).get("task") == task]
    if not errors and ray_errors:  # the trial failed before its MLflow run existed
        e = ray_errors[0]
        cause = getattr(e, "cause", None) or e
        errors = [f"{type(cause).__name__}: {_first_line(str(cause).splitlines()[-1] if str(cause) else '')}"]
    n = max(len(runs), len(ray_errors))
    first = errors[0] if errors else "no error was recorded"
    return f"task {task}: no trial finished ({n} failed); first error: {first}"


def _ray_launcher(v: dict[str, Any], args: argparse.Namespace):
    """Seed re-runs on the sweep's Ray, with a trial's resources, all at once (tune.seeds)."""
    import ray

    from tune.heldout import TAG_CONFIG
    from tune.trial import seed_rerun

    remote = ray.remote(seed_rerun).options(num_cpus=v["cpus"], num_gpus=args.gpus_per_trial, max_retries=1)

    def launch(jobs: list[tuple[Any, int]]) -> None:
        refs = []
        for run, seed in jobs:
            cfg = run.data.tags.get(TAG_CONFIG)
            if not cfg:
                log.warning("trial run %s has no %s tag (made before seed re-runs existed): not re-run",
                            run.info.run_id, TAG_CONFIG)
                continue
            refs.append((run.info.run_id, seed, remote.remote(cfg, seed, run.info.run_id, v["fixed"])))
        for run_id, seed, ref in refs:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the row says which seeds are missing
                log.warning("seed re-run of %s with seed %d failed: %s", run_id, seed, str(e).splitlines()[0][:300])

    return launch


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from finegates.config import ConfigError
    from tasks import TaskError
    from tune.preflight import check_sweep
    from tune.select import format_table, select_sweep
    from tune.tracking import TrackingError

    try:
        v = validate(args)
    except (UsageError, TaskError, ConfigError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = check_sweep(v, args.address)  # data, model, paths, tracking store, address: nothing written yet
    if not problems:
        problems = _check_local_resources(v, args)
    if not problems:
        problems = _check_eval_splits(v)
    if not problems:
        problems = _check_resume(v, args)
    if not problems:
        problems = _check_studies(v)
    if problems:
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tracker, failed = sweep(v, args)
    seeds = None
    if args.seeds > 1:
        from tune.seeds import SeedReruns

        seeds = SeedReruns(tracker, args.seeds, launch=_ray_launcher(v, args))
    rows = select_sweep(tracker, v["tasks"], v["budgets"], v["out"] / "selection", args.budget_mode,
                        args.select_by, sweep=v["experiment"], rule=args.rule, data_dir=v["train"]["data_dir"],
                        seeds=seeds, latency_device=args.latency_device,
                        registry_suffix=SMOKE_REGISTRY_SUFFIX if args.smoke_test else "")
    if seeds is not None:  # a re-run whose worker died is left RUNNING: close it
        tracker.reconcile(v["experiment"], v["trial_ids"])
    print(format_table(rows))
    if v.get("stopped"):
        print(f"\n{v['stopped']} trials were stopped early by the scheduler (tag stopped_early; docs/SCHEDULER.md)")
    print(f"\nsweep {v['experiment']} ({v['scale']} sizes) took {time.perf_counter() - t0:.0f} s; "
          f"selection: {v['out'] / 'selection' / 'selection.json'}; MLflow: {v['uri']}")
    if failed:
        for msg in failed.values():
            print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


def _check_eval_splits(v: dict[str, Any]) -> list[str]:
    """Each task's evaluation set must split into a selection and a report part (tasks.split_eval): the parts
    the split makes of the eval subset the trials will get (same seed, sizes and data)."""
    from finegates.config import TrainConfig
    from tasks import TaskError, check_split_size, eval_labels, get_task

    problems = []
    for t in v["tasks"]:
        cfg = TrainConfig(task=t, **v["train"])
        try:
            labels = eval_labels(get_task(t), cfg.data_dir, cfg.max_train, cfg.max_eval, cfg.subset_seed)
            if labels is not None:
                check_split_size(get_task(t), labels, cfg.report_frac)
        except TaskError as e:
            problems.append(str(e))
    return problems


def _check_resume(v: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """--resume needs a saved sweep; --resume-or-start takes one when there is one. Sets ``v["restore"]``."""
    v["restore"] = None
    if not (args.resume or args.resume_or_start):
        return []
    if args.resume and args.resume_or_start:
        return ["--resume and --resume-or-start exclude each other; accepted: one of them"]
    from ray import tune

    path = v["storage"].rstrip("/") + "/" + v["experiment"]
    if tune.Tuner.can_restore(path):
        v["restore"] = path
        return []
    if args.resume:
        return [f"--resume: there is no sweep {v['experiment']!r} to resume in {v['storage']}; accepted: the "
                "--experiment and --storage of an interrupted sweep, or --resume-or-start to start it when absent"]
    return []


def _check_studies(v: dict[str, Any]) -> list[str]:
    """A fresh sweep does not mix into studies that already have trials; a resumed one finds its own."""
    from tune.studies import check_studies, study_name

    names = [study_name(v["experiment"], t, m) for t in v["tasks"] for m in v["methods"]]
    return check_studies(v["optuna_storage"], names, resuming=v["restore"] is not None)


if __name__ == "__main__":
    sys.exit(main())
