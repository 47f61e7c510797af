"""End to end: a real smoke sweep (real Ray, real MLflow store, real MiniLM, real GLUE)."""
import json
import math

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.tune.conftest import run_cli
from tune.pareto import Point, select

pytestmark = pytest.mark.slow  # trains the real model / starts Ray and MLflow (fast lane: -m 'not slow')


REQUIRED_PARAMS = {"task", "method", "target_sparsity", "lr", "rank", "reference", "max_train", "epochs", "teacher"}
REQUIRED_METRICS = {"score", "sparsity", "gate_sparsity", "params_total", "params_trainable", "latency_ms",
                    "dense_latency_ms", "speedup"}


@pytest.fixture(scope="module")
def sweep(loopback_only, glue_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    code, out, err = run_cli("tune.run", [
        # SST-2 learns at these sizes (its model is registered and served); RTE does not (the guard says so)
        "--smoke-test", "--tasks", "sst2,rte", "--trials-per-task", "3", "--budget", "0.02,0.5",
        # 400 eval examples: 200 for selection, 200 held out to report each pick once; picks re-run with 2 seeds
        "--max-train", "320", "--epochs", "2", "--max-eval", "400", "--rule", "plain", "--seeds", "2",
        "--mlflow-uri", uri, "--storage", str(d / "ray"), "--out", str(d / "out"), "--experiment", "e2e",
        "--data-dir", str(glue_dir), "--verbose", "0",
        # high targets and a fast gate lr so that gates close even in a 4-step smoke trial
        "--search-space", '{"target_sparsity": [0.6, 0.9]}', "--gate-lr", "0.5"], cwd=d)
    assert code == 0, err[-4000:]
    return d, uri, out


def trial_runs(uri):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("e2e")
    return c, exp, c.search_runs([exp.experiment_id], "tags.`finegates.role` = 'trial'")


def test_one_finished_child_run_per_trial_with_params_and_metrics(sweep):
    d, uri, out = sweep
    c, exp, runs = trial_runs(uri)
    assert len(runs) == 6  # 2 tasks x 3 trials
    assert len({r.data.tags["ray_trial_id"] for r in runs}) == 6
    assert {r.info.status for r in runs} <= {"FINISHED", "FAILED", "KILLED"}
    # KILLED only by the early-stopping scheduler (the default), which says so on the run
    assert all(r.data.tags.get("stopped_early") == "true" for r in runs if r.info.status == "KILLED")
    for r in runs:
        assert REQUIRED_PARAMS <= set(r.data.params), set(r.data.params)
        if r.info.status == "FINISHED":
            assert REQUIRED_METRICS <= set(r.data.metrics)
            assert r.data.tags["mlflow.parentRunId"]
            assert c.get_metric_history(r.info.run_id, "score")  # per-epoch + final
    assert sum(r.data.params["reference"] == "True" for r in runs) == 2  # one dense reference per task
    assert all(float(r.data.params["target_sparsity"]) == 0 for r in runs if r.data.params["reference"] == "True")


def test_parent_runs_hold_plots_and_are_finished(sweep):
    d, uri, _ = sweep
    c, exp, _ = trial_runs(uri)
    parents = c.search_runs([exp.experiment_id], "tags.`finegates.role` = 'parent'")
    assert sorted(p.data.tags["task"] for p in parents) == ["rte", "sst2"]
    for p in parents:
        assert p.info.status == "FINISHED"
        names = {a.path for a in c.list_artifacts(p.info.run_id)}
        task = p.data.tags["task"]
        assert {f"pareto_{task}.png", f"pareto_front_{task}.csv"} <= names


def test_pareto_tags(sweep):
    d, uri, _ = sweep
    _, _, runs = trial_runs(uri)
    for task in ("sst2", "rte"):
        tagged = [r for r in runs if r.data.tags["task"] == task and r.info.status == "FINISHED"]
        assert any(r.data.tags["pareto"] == "true" for r in tagged)
        # the tag agrees with the definition: no pareto=true run is dominated by another run
        for r in tagged:
            if r.data.tags["pareto"] == "true":
                s, sp = r.data.metrics["score"], r.data.metrics["sparsity"]
                assert not any(o.data.metrics["score"] >= s and o.data.metrics["sparsity"] >= sp and
                               (o.data.metrics["score"] > s or o.data.metrics["sparsity"] > sp) for o in tagged)


def test_selection_obeys_the_budget_rule_and_models_load(sweep):
    d, uri, out = sweep
    _, _, runs = trial_runs(uri)
    rows = json.loads((d / "out" / "selection" / "selection.json").read_text())
    assert {(r["task"], r["budget"]) for r in rows} == {(t, b) for t in ("sst2", "rte") for b in (0.02, 0.5)}
    client = MlflowClient(uri)
    for row in rows:
        alias = f"budget-{row['budget']:g}".replace(".", "_")
        model_dir = d / "out" / "selection" / row["task"] / f"budget-{row['budget']:g}"
        if row["status"] != "selected":  # the trivial-predictor guard: said in words, nothing registered
            assert row["task"] == "rte" and row["reason"], row
            assert not (model_dir / "model.safetensors").exists()
            with pytest.raises(Exception):
                client.get_model_version_by_alias(f"finegates-{row['task']}-smoke", alias)
            continue
        pts = [Point(r.info.run_id, r.data.metrics["score"], r.data.metrics["sparsity"], r.data.metrics["latency_ms"])
               for r in runs if r.data.tags["task"] == row["task"] and r.info.status == "FINISHED"]
        ref = max(p.score for p in pts)
        assert row["reference_score"] == pytest.approx(ref)
        assert row["score"] >= ref - row["budget"] * abs(ref) - 1e-9
        assert row["score"] > row["trivial_score"]
        # the plain rule (--rule plain) over the trials that pass the guard
        guarded = [c["run_id"] for c in row["candidates"] if not c["beats_trivial"]]
        assert row["chosen_run_id"] == select(pts, row["budget"], exclude=guarded).chosen.id
        assert (model_dir / "model.safetensors").is_file()
        assert client.get_model_version_by_alias(f"finegates-{row['task']}-smoke", alias).run_id == row["chosen_run_id"]
    assert {r["task"] for r in rows if r["status"] == "selected"} >= {"sst2"}
    assert "task" in out and "sparsity" in out  # the summary table
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/finegates-sst2-smoke@budget-0_02")
    pred = model.predict(pd.DataFrame({"text": ["a moving, funny film", "a dull mess"]}))
    assert len(pred) == 2 and set(pred["label"]) <= {"negative", "positive"}
    assert all(0 <= s <= 1 and not math.isnan(s) for s in pred["score"])


def test_rerunning_the_selector_changes_nothing(sweep):
    d, uri, _ = sweep
    before = json.loads((d / "out" / "selection" / "selection.json").read_text())
    code, out, err = run_cli("tune.select", ["--experiment", "e2e", "--mlflow-uri", uri, "--budget", "0.02,0.5",
                                             "--rule", "plain", "--seeds", "2", "--out", str(d / "out" / "selection")],
                             cwd=d)
    assert code == 0, err[-2000:]
    after = json.loads((d / "out" / "selection" / "selection.json").read_text())
    key = lambda rows: {(r["task"], r["budget"]): (r["chosen_run_id"], r["model_version"]) for r in rows}  # noqa: E731
    assert key(before) == key(after)
    assert "finegates-sst2-smoke" not in err  # no new model version was registered


def test_picks_are_scored_once_on_the_held_out_part_and_rerun_with_seeds(sweep):
    """Runs after the selector was run twice (the sweep's, then test_rerunning_the_selector_changes_nothing)."""
    d, uri, out = sweep
    c, exp, runs = trial_runs(uri)
    rows = json.loads((d / "out" / "selection" / "selection.json").read_text())
    picked = [r for r in rows if r["status"] == "selected"]
    assert picked
    for r in picked:
        assert r["selection_score"] == r["score"] and r["report_n"] == 200
        lo, hi = r["report_score_ci"]
        assert lo <= r["report_score"] <= hi
        assert isinstance(r["report_within_selection_ci"], bool)
        # where the report score should fall: around the selection score, wider than its interval
        plo, phi = r["report_prediction_interval"]
        assert plo < r["score_ci"][0] <= r["score"] <= r["score_ci"][1] < phi
        assert r["report_within_prediction_interval"] == (plo <= r["report_score"] <= phi)
        # re-run with a second training seed, logged as a child of the pick; the row reports mean +- std
        assert r["seeds"]["seeds"] == [1948, 1949] and len(r["seeds"]["scores"]) == 2
        assert r["seeds"]["mean"] == pytest.approx(sum(r["seeds"]["scores"]) / 2)
        reruns = c.search_runs([exp.experiment_id], "tags.`finegates.role` = 'seed-rerun' and "
                                                    f"tags.`mlflow.parentRunId` = '{r['chosen_run_id']}'")
        assert [(x.data.tags["seed"], x.info.status) for x in reruns] == [("1949", "FINISHED")]
        assert reruns[0].data.metrics["score"] == pytest.approx(r["seeds"]["scores"][1])
        mv = c.get_model_version_by_alias(f"finegates-{r['task']}-smoke", r["alias"])
        assert float(mv.tags["report_score"]) == pytest.approx(r["report_score"])
        assert float(mv.tags["selection_score"]) == pytest.approx(r["score"]) and mv.tags["seeds"] == "2"
    assert "report part" in out and "over seeds" in out
    # trials were scored on their 200-example selection part; only picks have a report score, made once
    picks = {r["chosen_run_id"] for r in picked}
    for run in runs:
        if run.info.status != "FINISHED":
            continue
        assert run.data.tags["task"] != "sst2" or run.data.metrics["n_eval"] == 200
        hist = c.get_metric_history(run.info.run_id, "report_score")
        assert len(hist) == (1 if run.info.run_id in picks else 0), run.info.run_id


def test_every_trial_is_in_its_optuna_study(sweep):
    """The studies e2e/<task>/finegates in the default storage (optuna.db beside mlflow.db): one trial per
    Ray trial, told with the MLflow run's score and sparsity (FAIL where the run failed)."""
    import optuna
    from optuna.trial import TrialState

    d, uri, _ = sweep
    _, _, runs = trial_runs(uri)
    storage = f"sqlite:///{d / 'optuna.db'}"
    assert sorted(optuna.get_all_study_names(storage)) == ["e2e/rte/finegates", "e2e/sst2/finegates"]
    for task in ("sst2", "rte"):
        trials = optuna.load_study(study_name=f"e2e/{task}/finegates", storage=storage).trials
        assert len(trials) == 3  # --trials-per-task, the reference included
        told = {t.user_attrs["ray_trial_id"]: (t.state, t.values) for t in trials}
        expected = {"FINISHED": TrialState.COMPLETE, "KILLED": TrialState.PRUNED, "FAILED": TrialState.FAIL}
        assert told == {r.data.tags["ray_trial_id"]: (
            (TrialState.COMPLETE, [r.data.metrics["score"], r.data.metrics["sparsity"]])
            if r.info.status == "FINISHED" else (expected[r.info.status], None))
            for r in runs if r.data.tags["task"] == task}
        assert sum(bool(t.user_attrs.get("reference")) for t in trials) == 1
