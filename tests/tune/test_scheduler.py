"""The budget-aware early-stopping scheduler (tune.scheduler): its rule, and its state across a resume."""
from __future__ import annotations

import math
import pickle

import pytest

from tune.scheduler import BudgetStopper, EpochPoint, StopRule, decide, parse_rungs

REL = StopRule(budget=0.02, budget_mode="relative", margin=0.05, k=2)


def p(tid: str, score: float, sparsity: float = 0.0, reference: bool = False) -> EpochPoint:
    return EpochPoint(tid, score, sparsity, reference)


def test_a_trial_far_below_the_budget_threshold_is_stopped_and_one_within_the_margin_is_not():
    ref = p("ref", 0.80, reference=True)
    # threshold 0.80 * 0.98 = 0.784; minus the margin 0.05: 0.734
    assert decide(REL, p("t", 0.70, 0.3), [ref]).startswith("budget: score 0.7000 < 0.7840")
    assert decide(REL, p("t", 0.74, 0.3), [ref]) is None
    absolute = StopRule(budget=0.10, budget_mode="absolute", margin=0.0)
    assert decide(absolute, p("t", 0.69, 0.3), [ref]) is not None  # below 0.80 - 0.10
    assert decide(absolute, p("t", 0.71, 0.3), [ref]) is None


def test_the_threshold_comes_from_the_best_trial_at_the_epoch_also_below_zero():
    # CoLA's MCC can be negative early: relative budgets scale with |best|
    rule = StopRule(budget=0.5, margin=0.0)
    assert rule.threshold(-0.2) == pytest.approx(-0.3)
    assert decide(rule, p("t", -0.31), [p("a", -0.2), p("b", -0.6)]) is not None
    assert decide(rule, p("t", -0.29), [p("a", -0.2), p("b", -0.6)]) is None
    # the best is another searched trial, not only the reference
    assert decide(REL, p("t", 0.60, 0.5), [p("ref", 0.55, reference=True), p("a", 0.75, 0.2)]) is not None


def test_a_trial_dominated_by_k_trials_is_stopped_and_by_fewer_is_not():
    me = p("t", 0.70, 0.30)
    better = [p("a", 0.72, 0.30), p("b", 0.70, 0.40)]
    assert decide(REL, me, better).startswith("dominated: 2 trials (k=2)")
    assert decide(REL, me, better[:1]) is None
    # equal on both objectives is not dominating; higher sparsity at a lower score is not either
    assert decide(REL, me, [p("a", 0.70, 0.30), p("b", 0.69, 0.9)]) is None
    assert decide(StopRule(budget=0.02, k=1), me, better[:1]) is not None


def test_the_reference_and_the_best_trial_are_never_stopped():
    worst_ref = p("ref", 0.10, reference=True)
    assert decide(REL, worst_ref, [p("a", 0.9, 0.5), p("b", 0.9, 0.6)]) is None
    assert decide(REL, p("t", 0.9, 0.1), [p("ref", 0.85, reference=True)]) is None
    assert decide(REL, p("t", 0.5), []) is None  # alone at its epoch: nothing to compare with
    assert decide(REL, p("t", math.nan), [p("ref", 0.85, reference=True)]) is None  # a NaN trial fails by itself


def test_rungs_and_the_last_epoch():
    rule = StopRule(budget=0.02, epochs=3.0)
    assert [e for e in range(1, 5) if rule.decides_at(e)] == [1, 2]  # never at the last epoch
    assert [e for e in range(1, 5) if StopRule(budget=0.02, rungs=(2,), epochs=3.0).decides_at(e)] == [2]
    assert parse_rungs("all") is None
    assert parse_rungs("2, 1,2") == (1, 2)
    for bad in ("", "0,1", "one", "1.5"):
        with pytest.raises(ValueError, match="--stop-rungs .* is invalid; accepted: 'all' or a comma list"):
            parse_rungs(bad)


def test_the_scheduler_pickles_with_its_history_and_reloads_it_from_mlflow_when_restored(tmp_path):
    """Ray pickles the scheduler with the Tuner; a restored one reads the epochs back from MLflow."""
    from tune.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "sw")
    parent = tracker.parent_run("sw", "rte")
    logged = {"ref": (True, [0.70, 0.75], [0.0, 0.0]), "t1": (False, [0.50], [0.2]), "t2": (False, [0.66, 0.72], [0.1, 0.3])}
    for tid, (reference, scores, sparsity) in logged.items():
        run = tracker.trial_run("sw", parent, tid, "rte", "finegates", {"reference": reference})
        for epoch, (s, g) in enumerate(zip(scores, sparsity), start=1):
            tracker.log_epoch(run, {"score": s, "gate_sparsity": g}, step=epoch)
        if tid == "t1":  # stopped at epoch 1 by an earlier driver
            tracker.tag(run, "stopped_early", "true")
            tracker.tag(run, "stopped_epoch", "1")
            tracker.tag(run, "stop_reason", "budget: ...")

    stopper = BudgetStopper(REL, tracking=(uri, tracker.experiment_id, "sw"))
    restored = pickle.loads(pickle.dumps(stopper))
    assert not restored._loaded
    restored._load_history()
    hist = restored.history[("rte", "finegates")]
    assert sorted(hist) == [1, 2]
    assert hist[1]["ref"] == EpochPoint("ref", 0.70, 0.0, True)
    assert hist[2]["t2"] == EpochPoint("t2", 0.72, 0.3, False)
    assert set(hist[1]) == {"ref", "t1", "t2"} and set(hist[2]) == {"ref", "t2"}
    assert restored.stopped == {"t1": (1, "budget: ...")}
    # decisions after the resume see the trials of before it
    assert decide(REL, p("new", 0.60, 0.2), list(hist[1].values())) is not None


def test_a_task_is_not_learned_only_when_every_methods_reference_fails_the_guard(tmp_path, template_db):
    """The selector's guard on finished references (real MLflow runs with their predictions): the task's other
    trials are stopped only once no method's reference clearly beats the trivial predictor."""
    import numpy as np

    from tests.tune.test_selection import SWEEP, Store

    store = Store(tmp_path, template_db)
    labels = np.array([0, 1] * 60)
    chance = store.trial("rte", np.zeros_like(labels), labels, 0.0, reference=True)  # the majority class
    learned = store.trial("rte", labels.copy(), labels, 0.0, reference=True, method="lora")
    stopper = BudgetStopper(REL, tracking=(store.uri, store.exp, SWEEP), methods=("finegates", "lora"))
    run = store.client.get_run
    stopper._record_guard(store.tracker, "rte", "finegates", run(chance))
    assert stopper.reference_learned == {("rte", "finegates"): False}
    assert stopper.not_learned == {}  # LoRA's reference has not finished yet
    stopper._record_guard(store.tracker, "rte", "lora", run(learned))
    assert stopper.not_learned == {}  # one learned reference: the selector can pick from this task
    alone = BudgetStopper(REL, tracking=(store.uri, store.exp, SWEEP), methods=("finegates",))
    alone._record_guard(store.tracker, "rte", "finegates", run(chance))
    assert alone.not_learned["rte"].startswith("reference trial") and "trivial" in alone.not_learned["rte"]
    assert alone.not_learned["rte"].endswith("the selector picks nothing for this task")


@pytest.mark.slow
def test_a_sweep_stops_hopeless_trials_keeps_the_reference_and_leaves_them_out_of_the_front(loopback_only, glue_dir,
                                                                                            tmp_path):
    """Real small trials on SST-2 and CoLA, 2 epochs: the searched trials get a learning rate of 1e-7 (they stay
    near chance) and are stopped after epoch 1; the references finish. SST-2's reference learns, so its trials
    are stopped by their scores; CoLA's does not (MCC ~0 at 256 examples), so the selector can pick nothing
    there and its trials are stopped as not learned."""
    import json

    from mlflow import MlflowClient

    from tests.tune.conftest import run_cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = run_cli("tune.run", [
        "--tasks", "sst2,cola", "--trials-per-task", "3", "--max-train", "256", "--max-eval", "400", "--epochs", "2",
        "--max-length", "64", "--teacher", "none", "--mlflow-uri", uri, "--storage", str(tmp_path / "ray"),
        "--out", str(tmp_path / "out"), "--experiment", "stop", "--data-dir", str(glue_dir), "--verbose", "0",
        "--search-space", '{"lr": [1e-7, 1e-7]}'], cwd=tmp_path)
    assert code == 0, err[-3000:]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("stop").experiment_id], "tags.`finegates.role` = 'trial'")
    ref = [r for r in runs if r.data.params["reference"] == "True"]
    searched = [r for r in runs if r.data.params["reference"] == "False"]
    assert len(ref) == 2 and len(searched) == 4
    for r in ref:
        assert r.info.status == "FINISHED" and r.data.tags.get("stopped_early") is None
        assert r.data.tags["pareto"] == "true"
    for r in searched:  # stopped at the first rung, KILLED, with their epoch-1 point kept
        assert r.info.status == "KILLED", r.data.tags
        assert r.data.tags["stopped_early"] == "true" and r.data.tags["stopped_epoch"] == "1"
        reason = r.data.tags["stop_reason"]
        if r.data.tags["task"] == "cola":
            assert reason.startswith("not learned: reference trial") and "trivial" in reason, reason
        else:
            assert reason.startswith(("budget:", "dominated:", "not learned:")), reason
        assert [m.step for m in c.get_metric_history(r.info.run_id, "score")] == [1]
        assert r.data.tags["pareto"] == "false"
        assert "model_uri" not in r.data.tags
    picked = json.loads((tmp_path / "out" / "selection" / "selection.json").read_text())
    assert {r.info.run_id for r in searched}.isdisjoint(json.dumps(picked))
    assert "2 trials were stopped early" not in out and "4 trials were stopped early by the scheduler" in out
