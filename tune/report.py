"""Per-task Pareto plots and front tables, logged to the task's parent run."""
from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
from pathlib import Path

from tune.pareto import Point, pareto_front, threshold

log = logging.getLogger(__name__)


def plot_task(task: str, points: list[Point], budgets: list[float], mode: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(points)
    front_ids = {p.id for p in front}
    ref = max(p.score for p in points)
    trivial = recorded_trivial_score(points)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xkey, xlabel in ((axes[0], "sparsity", "sparsity (fraction of gated weights removed)"),
                             (axes[1], "speedup", "CPU speedup (dense / exported latency)")):
        methods = sorted({_method(p) for p in points})
        for m, marker in zip(methods, "osD^vP*X"):
            sel = [p for p in points if _method(p) == m]
            xs = [p.sparsity if xkey == "sparsity" else p.info.get("speedup", math.nan) for p in sel]
            colors = ["tab:red" if p.id in front_ids else "tab:gray" for p in sel]
            ax.scatter(xs, [p.score for p in sel], c=colors, marker=marker, s=30, zorder=3, label=m)
        if xkey == "sparsity" and front:
            ax.plot([p.sparsity for p in front], [p.score for p in front], "-", color="tab:red", lw=1, zorder=2,
                    label="Pareto front")
        if trivial is not None:  # a model at or near this line has not learned the task (docs/SELECTION.md)
            ax.axhline(trivial, ls=":", lw=1.0, color="black")
            ax.annotate("trivial predictor", (ax.get_xlim()[1], trivial), fontsize=7, va="bottom", ha="right")
        for b in budgets:
            ax.axhline(threshold(ref, b, mode), ls="--", lw=0.8, color="tab:blue")
            ax.annotate(f"budget {b:g}", (ax.get_xlim()[0], threshold(ref, b, mode)), fontsize=7, color="tab:blue",
                        va="bottom")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{task}: {len(points)} finished trials, {len(front)} on the front (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recorded_trivial_score(points: list[Point]) -> float | None:
    """The trials' recorded trivial score (majority class / constant mean on their eval examples): the
    median when they differ (different eval subsets), None when no trial recorded one."""
    vals = sorted(float(p.info["trivial_score"]) for p in points
                  if isinstance(p.info.get("trivial_score"), (int, float)) and math.isfinite(p.info["trivial_score"]))
    return vals[len(vals) // 2] if vals else None


def _method(p: Point) -> str:
    run = p.info.get("run")
    return run.data.tags.get("method", "?") if run is not None else "?"


def points_table(points: list[Point], front_only: bool = False) -> str:
    """CSV of the trials (or of the front only): what the plot shows."""
    return front_table(points) if front_only else _table(points)


def front_table(points: list[Point]) -> str:
    return _table(pareto_front(points))


def _table(points: list[Point]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run_id", "method", "score", "sparsity", "speedup", "latency_ms", "lam", "lr", "rank"])
    for p in points:
        run = p.info.get("run")
        params = run.data.params if run is not None else {}
        tags = run.data.tags if run is not None else {}
        w.writerow([p.id, tags.get("method", ""), f"{p.score:.4f}", f"{p.sparsity:.4f}",
                    f"{p.info.get('speedup', math.nan):.3f}", f"{p.latency_ms:.2f}", params.get("lam", ""),
                    params.get("lr", ""), params.get("rank", "")])
    return buf.getvalue()


def log_task_summary(tracker, parent_id: str, task: str, points: list[Point], budgets: list[float],
                     mode: str) -> None:
    """Pareto plot (PNG) and front table (CSV) as artifacts of the parent run."""
    from tune.tracking import with_retry

    if not points:
        return
    with tempfile.TemporaryDirectory() as d:
        plot_task(task, points, budgets, mode, Path(d) / f"pareto_{task}.png")
        (Path(d) / f"pareto_front_{task}.csv").write_text(front_table(points))
        (Path(d) / f"trials_{task}.csv").write_text(points_table(points))
        with_retry(lambda: tracker.client.log_artifacts(parent_id, d), "log task summary", tracker.retry_s)
