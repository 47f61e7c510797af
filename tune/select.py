"""The budget selector: per task and budget, the sparsest finished trial within budget of the best.

    python -m tune.select --experiment finegates-glue --budget 0.01,0.02,0.05

Reads the finished trial runs of the experiment from MLflow. Per task: reference = the best score of
its finished trials; eligible = score >= reference * (1 - budget) (relative; ``--budget-mode
absolute`` for score points); chosen = the eligible trial with the highest sparsity, ties broken by
lower latency (``--select-by latency`` prefers speed). Every finished trial is considered, not the
first that passes. Writes ``<out>/<task>/budget-<b>/`` (the exported model), ``selection.json``, and
registers each choice as a version of the registered model ``finegates-<task>`` with alias
``budget-<b>`` (dots become underscores: ``budget-0_02``). Re-running changes only what new trials
justify: an unchanged choice keeps its model version and files.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from tune.pareto import BUDGET_MODES, SELECT_BY, check_budget, select
from tune.tracking import TAG_TASK, Tracker, TrackingError, check_reachable, default_tracking_uri, with_retry

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad command-line input: one line, exit code 2."""


def parse_budgets(spec: str, mode: str = "relative") -> list[float]:
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            b = float(part)
        except ValueError:
            raise UsageError(f"--budget {part!r} is not a number; accepted: numbers in [0, 1], comma-separated") from None
        try:
            check_budget(b, mode)
        except ValueError:
            raise UsageError(f"--budget {part} is out of range; accepted: numbers in [0, 1] "
                             "(0.02 = 2% below the reference score)") from None
        out.append(b)
    if not out:
        raise UsageError("--budget is empty; accepted: numbers in [0, 1], comma-separated")
    return out


def alias_for(budget: float) -> str:
    return "budget-" + f"{budget:g}".replace(".", "_")


def _copy_model(tracker: Tracker, run, dest: Path) -> None:
    """Copy the chosen trial's exported model to ``dest`` (from its local path, else from MLflow)."""
    src = run.data.tags.get("model_path", "")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        if src and Path(src).is_dir():
            shutil.copytree(src, tmp / "m")
        else:
            import mlflow

            uri = run.data.tags.get("model_uri")
            mlflow.set_tracking_uri(tracker.uri)
            got = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/artifacts/checkpoint", dst_path=str(tmp / "dl"))
            shutil.move(got, tmp / "m")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp / "m", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def register(tracker: Tracker, task: str, run, budget: float) -> str:
    """Register the run's logged model as a version of finegates-<task> with the budget's alias."""
    import mlflow

    name = f"finegates-{task}"
    client = tracker.client
    alias = alias_for(budget)
    try:
        current = client.get_model_version_by_alias(name, alias)
        if current.run_id == run.info.run_id:
            return current.version  # unchanged choice: nothing to do
    except Exception:  # noqa: BLE001 - no such model or alias yet
        pass
    mlflow.set_tracking_uri(tracker.uri)
    versions = with_retry(lambda: client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'"),
                          "search versions")
    if versions:
        version = versions[0].version
    else:
        version = with_retry(lambda: mlflow.register_model(run.data.tags["model_uri"], name), "register").version
    with_retry(lambda: client.set_registered_model_alias(name, alias, version), "alias")
    return version


def select_sweep(tracker: Tracker, tasks: list[str], budgets: list[float], out_dir: Path, mode: str = "relative",
                 select_by: str = "sparsity", sweep: str | None = None, do_register: bool = True) -> list[dict[str, Any]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in tasks:
        points = tracker.trial_points(task, sweep)
        if not points:
            log.warning("task %s has no finished trial: nothing to select", task)
            continue
        for b in budgets:
            s = select(points, b, mode, select_by)
            run = s.chosen.info["run"]
            dest = out_dir / task / f"budget-{b:g}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            sel_file = dest.parent / f"budget-{b:g}.selection.json"
            previous = json.loads(sel_file.read_text()) if sel_file.is_file() else None
            unchanged = previous is not None and previous.get("chosen_run_id") == run.info.run_id and dest.is_dir()
            if not unchanged:
                _copy_model(tracker, run, dest)
            version = register(tracker, task, run, b) if do_register and run.data.tags.get("model_uri") else None
            m = run.data.metrics
            record = {
                "task": task, "budget": b, "budget_mode": mode, "select_by": select_by,
                "reference_score": s.reference.score, "reference_run_id": s.reference.id, "threshold": s.threshold,
                "chosen_run_id": run.info.run_id, "chosen_trial_id": run.data.tags.get("ray_trial_id"),
                "method": run.data.tags.get("method"), "score": m.get("score"), "sparsity": m.get("sparsity"),
                "speedup": m.get("speedup"), "latency_ms": m.get("latency_ms"), "params": dict(run.data.params),
                "metrics": dict(m), "eligible": s.eligible, "considered": s.considered, "rule": s.to_dict()["rule"],
                "model_dir": str(dest.resolve()), "registered_model": f"finegates-{task}" if version else None,
                "model_version": version, "alias": alias_for(b) if version else None,
                "validation_source": run.data.tags.get("validation_source", ""),
            }
            tmp = sel_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2, default=str))
            os.replace(tmp, sel_file)
            rows.append(record)
    tmp = out_dir / ".selection.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2, default=str))
    os.replace(tmp, out_dir / "selection.json")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["task", "budget", "reference", "chosen", "sparsity", "speedup", "method", "validation", "path"]
    lines = [head]
    for r in rows:
        lines.append([r["task"], f"{r['budget']:g}", f"{r['reference_score']:.4f}", f"{r['score']:.4f}",
                      f"{r['sparsity']:.1%}", f"{(r['speedup'] or float('nan')):.2f}x", r["method"] or "",
                      r["validation_source"], r["model_dir"]])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.select", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment (= sweep name)")
    p.add_argument("--budget", default="0.02", help="comma list of budgets in [0, 1]")
    p.add_argument("--budget-mode", default="relative", choices=BUDGET_MODES)
    p.add_argument("--select-by", default="sparsity", choices=SELECT_BY)
    p.add_argument("--tasks", default=None, help="comma list (default: every task with trials)")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--out", default=None, help="output dir (default: runs/<experiment>/selection)")
    p.add_argument("--no-register", action="store_true", help="do not touch the model registry")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        budgets = parse_budgets(args.budget, args.budget_mode)
        uri = args.mlflow_uri or default_tracking_uri()
        check_reachable(uri)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            # opening a missing SQLite store would create an empty one: the selector only reads
            raise UsageError(f"no MLflow store at {uri}; give the sweep's --mlflow-uri")
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(args.experiment)
        if exp is None:
            raise UsageError(f"--experiment {args.experiment!r} does not exist in {uri}")
        tracker = Tracker(uri, experiment_id=exp.experiment_id)
        if args.tasks:
            from tasks import parse_tasks

            tasks = [t.name for t in parse_tasks(args.tasks)]
        else:
            runs = tracker.find_runs("tags.`finegates.role` = 'trial'")
            tasks = sorted({r.data.tags.get(TAG_TASK) for r in runs if r.data.tags.get(TAG_TASK)})
        out = Path(args.out or Path("runs") / args.experiment / "selection").resolve()
        rows = select_sweep(tracker, tasks, budgets, out, args.budget_mode, args.select_by,
                            do_register=not args.no_register)
    except (UsageError, TrackingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"\nselection: {out / 'selection.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
