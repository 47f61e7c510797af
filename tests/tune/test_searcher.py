"""The multi-task searcher driven directly (no Ray cluster): what each kind of trial end becomes in its
study, in a real Optuna SQLite storage; what survives a checkpoint/restore; the pre-start checks of a
storage (tune.studies)."""
from __future__ import annotations

import pickle

import optuna
import pytest
from optuna.trial import TrialState

from tune.searcher import MultiTaskOptunaSearch
from tune.space import get_space
from tune.studies import check_storage, check_studies, normalise, study_name, trial_counts


def _searcher(storage: str, trials: int = 4, tasks=("rte",)) -> MultiTaskOptunaSearch:
    return MultiTaskOptunaSearch(list(tasks), [get_space("finegates")], trials, storage=storage, experiment="exp",
                                 seed=7)


def _final(score: float, sparsity: float) -> dict:
    return {"final": True, "score": score, "sparsity": sparsity, "epoch": 2}


def test_complete_fail_and_pruned_trials_in_the_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _searcher(storage, trials=5)
    cfgs = {f"t{i}": s.suggest(f"t{i}") for i in range(5)}
    assert cfgs["t0"]["reference"] and not any(c["reference"] for k, c in cfgs.items() if k != "t0")
    assert s.suggest("t5") == MultiTaskOptunaSearch.FINISHED
    s.on_trial_complete("t0", _final(0.61, 0.0))
    s.on_trial_complete("t1", _final(0.58, 0.42))
    s.on_trial_complete("t2", {"final": False, "score": 0.55, "epoch": 1}, error=True)  # crashed
    # stopped early by a scheduler: no error, its last result is an epoch report (final False)
    s.on_trial_complete("t3", {"final": False, "score": 0.52, "gate_sparsity": 0.3, "epoch": 1})
    s.on_trial_complete("t4", _final(float("nan"), 0.5))  # diverged
    assert s.live == {}

    study = optuna.load_study(study_name="exp/rte/finegates", storage=storage)  # another connection
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert set(by_ray) == set(cfgs)
    assert by_ray["t0"].state == TrialState.COMPLETE and by_ray["t0"].values == [0.61, 0.0]
    assert by_ray["t0"].user_attrs["reference"] is True and by_ray["t0"].user_attrs["ref_target_sparsity"] == 0.0
    assert by_ray["t1"].state == TrialState.COMPLETE and by_ray["t1"].values == [0.58, 0.42]
    assert by_ray["t1"].params == {k: cfgs["t1"][k] for k in ("target_sparsity", "lr", "rank")}
    assert by_ray["t2"].state == TrialState.FAIL and by_ray["t4"].state == TrialState.FAIL
    pruned = by_ray["t3"]
    assert pruned.state == TrialState.PRUNED and pruned.values is None
    assert {k: pruned.user_attrs[k] for k in ("stopped_epoch", "last_score", "last_sparsity")} == {
        "stopped_epoch": 1.0, "last_score": 0.52, "last_sparsity": 0.3}
    assert {t.number for t in study.best_trials} == {by_ray["t0"].number, by_ray["t1"].number}  # the Pareto front


def test_a_stopped_reference_is_pruned_too(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _searcher(storage, trials=1)
    s.suggest("r")
    s.on_trial_complete("r", {"final": False, "score": 0.5, "sparsity": 0.0, "epoch": 0})
    (t,) = optuna.load_study(study_name="exp/rte/finegates", storage=storage).trials
    assert t.state == TrialState.PRUNED and t.user_attrs["last_score"] == 0.5 and t.user_attrs["reference"]


def test_restore_reads_the_studies_back_and_fails_a_lost_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _searcher(storage, trials=4, tasks=("rte", "sst2"))
    for i in range(4):
        s.suggest(f"t{i}")  # rte ref, sst2 ref, rte searched, sst2 searched
    s.on_trial_complete("t0", _final(0.6, 0.0))
    s.on_trial_complete("t2", _final(0.57, 0.35))
    ckpt = tmp_path / "searcher.pkl"
    s.save(str(ckpt))  # Ray's last checkpoint: t1 and t3 live
    s.suggest("t4")  # asked after the checkpoint: lost when the driver dies
    lost_number = s.live["t4"][1]
    assert pickle.loads(pickle.dumps(s)).__dict__["_studies"] == {}  # tuner.pkl: no open studies or connections
    state = pickle.loads(ckpt.read_bytes())
    assert set(state) == {"suggested", "live", "keys"} and ckpt.stat().st_size < 2000

    before = {n: [(t.number, t.state, t.values) for t in optuna.load_study(study_name=n, storage=storage).trials]
              for n in ("exp/rte/finegates", "exp/sst2/finegates")}
    r = _searcher(storage, trials=4, tasks=("rte", "sst2"))
    r.restore(str(ckpt))
    r.on_trial_complete("t3", _final(0.8, 0.5))  # a live trial Ray resumed finishes
    rte = optuna.load_study(study_name="exp/rte/finegates", storage=storage)
    sst2 = optuna.load_study(study_name="exp/sst2/finegates", storage=storage)
    # the finished trials are unchanged: same numbers, states and values
    assert [(t.number, t.state, t.values) for t in rte.trials if t.number != lost_number] == \
        [x for x in before["exp/rte/finegates"] if x[0] != lost_number]
    lost = rte.trials[lost_number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["lost"] is True
    assert [t.values for t in sst2.trials if t.state == TrialState.COMPLETE] == [[0.8, 0.5]]
    # the searcher goes on where the checkpoint left it: rte gets its third trial anew
    cfg = r.suggest("t5")
    assert cfg["task"] == "rte" and not cfg["reference"]
    assert trial_counts(storage) == {"exp/rte/finegates": 4, "exp/sst2/finegates": 1}  # sst2: its reference is live
    # a study told twice (a trial Ray re-runs after it was told) keeps its first values
    r.live["t3"] = s.live["t3"]
    r.on_trial_complete("t3", _final(0.1, 0.1))
    assert [t.values for t in optuna.load_study(study_name="exp/sst2/finegates", storage=storage).trials
            if t.state == TrialState.COMPLETE] == [[0.8, 0.5]]


def test_storage_checks_read_only(tmp_path):
    storage = normalise(f"sqlite:///{tmp_path / 'sub' / 'optuna.db'}")
    assert check_storage(storage) == [] and trial_counts(storage) == {}
    assert not (tmp_path / "sub").exists()  # nothing created by a check
    names = [study_name("exp", "rte", "finegates")]
    assert check_studies(storage, names, resuming=False) == []
    assert check_studies(storage, names, resuming=True)[0].startswith("--resume: the sweep's Optuna studies")
    s = _searcher(storage, trials=2)
    s.suggest("a")
    s.on_trial_complete("a", _final(0.5, 0.0))
    (msg,) = check_studies(storage, names, resuming=False)
    assert msg.startswith("Optuna study 'exp/rte/finegates' already has 1 trials in 'sqlite:///") and \
        "--resume" in msg and "another --experiment or --optuna-storage" in msg
    assert check_studies(storage, names, resuming=True) == []
    assert check_studies(storage, [study_name("other", "rte", "finegates")], resuming=False) == []


@pytest.mark.parametrize("url,message", [
    ("optuna.db", "--optuna-storage 'optuna.db' is not a database URL; accepted: sqlite:///"),
    ("sqlite://", "is an in-memory database"),
    ("nosuchdb://h/x", "unknown database 'nosuchdb'"),
])
def test_malformed_storage_urls(url, message):
    from tune.studies import StorageError

    with pytest.raises(StorageError) as e:
        normalise(url)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_storage_that_is_another_applications_database(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        con.execute("CREATE TABLE experiments (id INTEGER)")
    (msg,) = check_storage(normalise(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert "holds tables of another application (experiments" in msg and "not an Optuna storage" in msg
    (tmp_path / "junk.db").write_text("not sqlite at all, " * 100)
    (msg,) = check_storage(normalise(f"sqlite:///{tmp_path / 'junk.db'}"))
    assert "is not a readable SQLite database" in msg
