"""Load: 8 trials at once (a quarter CPU each, 1 thread) writing to one MLflow tracking server (SQLite
backend, a separate process on 127.0.0.1), from a local sweep. Nothing may be lost or duplicated, no
trial may fail, and the 8 trials must really have overlapped. Prints a ``RELIABILITY`` line (pytest -s)."""
import json

import pytest

from tests.tune.conftest import run_cli
from tests.tune.test_cluster_local import Server, trial_runs


@pytest.fixture()
def server(loopback_only, tmp_path):
    s = Server(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    s.start()
    yield s
    s.stop()


def _peak_overlap(runs) -> int:
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs],
                    key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


@pytest.mark.slow
def test_eight_concurrent_trials_against_one_tracking_server(server, glue_dir, tmp_path):
    code, out, err = run_cli("tune.run", [
        "--smoke-test", "--tasks", "sst2,rte", "--trials-per-task", "4", "--teacher", "none",
        "--cpus-per-trial", "0.25", "--max-concurrent", "8", "--mlflow-uri", server.uri, "--experiment", "load",
        "--storage", str(tmp_path / "ray"), "--out", str(tmp_path / "out"), "--data-dir", str(glue_dir),
        "--verbose", "0"], cwd=tmp_path, timeout=1200)
    assert code == 0, err[-3000:]
    runs = trial_runs(server.uri, "load")
    ids = [r.data.tags["ray_trial_id"] for r in runs]
    peak = _peak_overlap(runs)
    print("RELIABILITY", json.dumps({"fault": "load: 8 concurrent trials, one MLflow server", "runs_in_mlflow": len(runs),
                                     "duplicates": len(ids) - len(set(ids)),
                                     "finished": sum(r.info.status == "FINISHED" for r in runs),
                                     "peak_concurrent_runs": peak}))
    assert len(runs) == 8 and len(set(ids)) == 8  # none lost, none duplicated
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:  # every write of every trial arrived: params, final metrics, the logged model
        assert {"max_length", "lr", "target_sparsity"} <= set(r.data.params)
        assert {"score", "sparsity", "latency_ms"} <= set(r.data.metrics) and r.data.tags.get("model_uri")
    assert peak == 8  # all 8 trials were logging at the same time
    assert (tmp_path / "out" / "selection" / "selection.json").is_file()
