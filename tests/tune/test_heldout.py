"""Held-out reporting and seed re-runs on a real MLflow store (SQLite in a tmp dir): the report part is scored
only when the split rebuilt where the selector runs is the trial's; a seed re-run keeps no model."""
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from finegates.config import TrainConfig
from tasks import get_task
from tune.heldout import TAG_CONFIG, config_tag, report_score
from tune.seeds import ROLE_RERUN
from tune.tracking import TAG_ROLE, Tracker
from tune.trial import trial_params

SWEEP = "heldout"


@pytest.fixture()
def tracker(tmp_path, template_db):
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment(SWEEP, artifact_location=(tmp_path / "artifacts").as_uri())
    return Tracker(uri, experiment_id=exp)


def small_config(glue_dir, **kw) -> TrainConfig:
    """A trial's config as tune.run makes it (selection part, data seed = seed), at a size that trains in seconds."""
    base = dict(task="rte", max_train=32, max_eval=80, epochs=1.0, max_length=32, threads=2, teacher="none",
                seed=3, data_seed=3, eval_part="selection", report_frac=0.5, latency_repeats=2, latency_batch=2,
                latency_length=16, data_dir=str(glue_dir))
    return TrainConfig(**(base | kw))


def trial_run(tracker: Tracker, cfg: TrainConfig, result: dict, trial_id: str = "t1") -> str:
    """A finished trial run written the way tune.trial writes one (params, config tag, final metrics and tags)."""
    parent = tracker.parent_run(SWEEP, cfg.task)
    run_id = tracker.trial_run(SWEEP, parent, trial_id, cfg.task, cfg.method, trial_params({}, cfg))
    tracker.tag(run_id, TAG_CONFIG, config_tag(cfg))
    tracker.finish_trial(run_id, result, None)
    return run_id


def recorded(cfg: TrainConfig, n_eval: int, source: str = "validation") -> dict:
    """What a finished trial recorded about its evaluation set (no model is needed to refuse a mismatch)."""
    return {"score": 0.6, "sparsity": 0.3, "n_eval": n_eval, "validation_source": source, "epochs_completed": 1}


def data_copy(glue_dir, tmp_path, task: str, validation_rows: int | None) -> str:
    """A data dir holding ``task``'s train split and the first ``validation_rows`` rows as its validation split
    (None: no validation split)."""
    root = tmp_path / "data"
    (root / task).mkdir(parents=True)
    (root / task / "train.parquet").symlink_to(glue_dir / task / "train.parquet")
    if validation_rows is not None:
        src = glue_dir / task / "validation.parquet"
        if src.is_file():
            pd.read_parquet(src).head(validation_rows).to_parquet(root / task / "validation.parquet")
        else:  # QQP has none in the offline copy: make one of train rows
            pd.read_parquet(glue_dir / task / "train.parquet").head(validation_rows).to_parquet(
                root / task / "validation.parquet")
    return str(root)


def test_other_data_where_the_selector_runs_gives_no_report_score(glue_dir, tmp_path, tracker):
    """The trial saw 40 selection examples of RTE's 277-row validation split; here the validation file has 60
    rows: the rebuilt split is another one, so nothing is scored and the note says why."""
    cfg = small_config(glue_dir)
    run_id = trial_run(tracker, cfg, recorded(cfg, 40))
    run = tracker.client.get_run(run_id)
    rep = report_score(tracker, run, get_task("rte"), tmp_path / "no-model", data_copy(glue_dir, tmp_path, "rte", 60))
    assert rep.score is None and "\n" not in rep.note
    assert "the split rebuilt here is not the trial's" in rep.note
    assert "30 selection examples here vs n_eval 40 in the trial" in rep.note
    assert "report_score" not in tracker.client.get_run(run_id).data.metrics  # never a silent wrong score


def test_a_validation_split_where_the_trial_held_out_train_rows_gives_no_report_score(glue_dir, tmp_path, tracker):
    cfg = small_config(glue_dir, task="qqp", max_eval=100)
    run_id = trial_run(tracker, cfg, recorded(cfg, 50, "train-holdout"))
    here = data_copy(glue_dir, tmp_path, "qqp", 100)
    rep = report_score(tracker, tracker.client.get_run(run_id), get_task("qqp"), tmp_path / "no-model", here)
    assert rep.score is None and "validation source validation here vs train-holdout in the trial" in rep.note


def test_a_config_tag_that_contradicts_the_params_gives_no_report_score(glue_dir, tmp_path, tracker):
    cfg = small_config(glue_dir)
    run_id = trial_run(tracker, cfg, recorded(cfg, 40))
    other = {k: v for k, v in cfg.to_dict().items() if k != "output_dir"} | {"report_frac": 0.3, "data_seed": 4}
    tracker.tag(run_id, TAG_CONFIG, json.dumps(other))
    rep = report_score(tracker, tracker.client.get_run(run_id), get_task("rte"), tmp_path / "no-model")
    assert rep.score is None
    assert "data_seed 4 in its train_config tag vs 3 in its params" in rep.note
    assert "report_frac 0.3 in its train_config tag vs 0.5 in its params" in rep.note


def test_a_config_tag_with_an_option_this_version_lacks_gives_a_note_not_a_crash(glue_dir, tmp_path, tracker):
    """An option recorded then and removed since: the tag no longer reads as a config; the selector says so."""
    cfg = small_config(glue_dir)
    run_id = trial_run(tracker, cfg, recorded(cfg, 40))
    tag = json.loads(config_tag(cfg))
    tracker.tag(run_id, TAG_CONFIG, json.dumps(tag | {"extra": tag["extra"] | {"gone_option": 1}}))
    rep = report_score(tracker, tracker.client.get_run(run_id), get_task("rte"), tmp_path / "no-model")
    assert rep.score is None
    assert "does not read as a config here" in rep.note and "gone_option" in rep.note


def test_a_config_tag_written_before_a_field_existed_reads_as_that_run_trained(glue_dir, tracker):
    """A trial recorded by an older version lacks the fields added since; those whose default changed what a run
    does (finegates.config.BEFORE_THE_FIELD) read as the behaviour before them, so a seed re-run trains what the
    trial trained; a tag that has them keeps them."""
    from finegates.config import BEFORE_THE_FIELD
    from tune.heldout import trial_config

    cfg = small_config(glue_dir)
    run_id = trial_run(tracker, cfg, recorded(cfg, 40))
    assert trial_config(tracker.client.get_run(run_id)).recorded() == cfg.recorded()  # today's tag: as it was
    today = {k: getattr(cfg, k) for k in BEFORE_THE_FIELD}
    assert today == {"close_schedule": "gradual", "teacher_init": True, "dual_reset": "crossing",
                     "max_recovery_frac": 0.45}
    old = {k: v for k, v in cfg.to_dict().items() if k != "output_dir" and k not in BEFORE_THE_FIELD}  # extra: {}
    tracker.tag(run_id, TAG_CONFIG, json.dumps(old))
    read = trial_config(tracker.client.get_run(run_id))
    assert {k: getattr(read, k) for k in BEFORE_THE_FIELD} == {"close_schedule": "at-pin", "teacher_init": False,
                                                                "dual_reset": "none", "max_recovery_frac": None}
    assert {k: v for k, v in read.to_dict().items() if k not in BEFORE_THE_FIELD} == \
        {k: v for k, v in cfg.to_dict().items() if k not in BEFORE_THE_FIELD}


@pytest.mark.parametrize("method", ["finegates", "finegates-lora", "lora", "propulsion", "sparta", "gift-sw", "full",
                                    "bitfit"])
def test_a_config_tag_records_every_option_of_its_method(method):
    """A trial's tag holds every option of its method at the value it ran with, set or not, so that a later change of
    an option's default does not change what the tag reads as; read back, it is the same run."""
    from finegates.methods import get_method_class

    cls = get_method_class(method)
    given = {"propulsion": {"degree": 5}, "sparta": {"scope": "targets"}, "finegates": {"lora_slots": ["q", "v"]},
             "lora": {"lora_dropout": 0.1}, "gift-sw": {"k": 4}}.get(method, {})
    cfg = TrainConfig(method=method, extra=given)
    tag = json.loads(config_tag(cfg))
    assert set(tag["extra"]) == {f.name for f in dataclasses.fields(cls.Options)}
    assert {k: tag["extra"][k] for k in given} == given
    read = TrainConfig.from_dict(tag)
    assert cls.parse_options(read.extra) == cls.parse_options(cfg.extra)
    assert read.recorded() == cfg.recorded()


def test_an_option_added_later_reads_as_the_behaviour_before_it_where_a_record_lacks_it(monkeypatch):
    """A method's ``options_before``: a record without the option (written before it existed) reads as the behaviour
    before it; a record with it keeps its value; a config made now takes the default."""
    from finegates.methods.propulsion import Propulsion

    monkeypatch.setattr(Propulsion, "options_before", {"train_bias": False})
    old = {k: v for k, v in TrainConfig(method="propulsion").to_dict().items() if k != "output_dir"}
    assert old["extra"] == {}
    assert TrainConfig.from_dict(old).options()["train_bias"] is False
    assert TrainConfig.from_dict(old | {"extra": {"train_bias": True}}).options()["train_bias"] is True
    assert TrainConfig(method="propulsion").options()["train_bias"] is True


def test_a_new_method_option_is_judged_for_the_records_written_before_it():
    """The methods' options as of session 22. An option added since fails this test until someone decides whether a run
    recorded without it trained as its default says; if not, it goes into the method's ``options_before`` with the old
    behaviour, then into this list."""
    from finegates.methods import METHOD_NAMES, get_method_class

    assert {m: sorted(f.name for f in dataclasses.fields(get_method_class(m).Options)) for m in METHOD_NAMES} == {
        "bitfit": [], "finegates": ["compact_recovery", "lora_slots"], "finegates-lora": ["compact_recovery", "lora_slots"],
        "full": [],
        "gift-sw": ["bits", "k", "targets"], "lora": ["lora_dropout", "target_modules"],
        "propulsion": ["degree", "targets", "train_bias"], "sparta": ["density", "scope", "targets"]}


def test_a_new_config_field_is_judged_for_the_tags_written_before_it():
    """The fields as of session 21. A field added since fails this test until someone decides whether a run
    recorded without it trained as its default says; if not, it goes into BEFORE_THE_FIELD with the old behaviour,
    then into this list."""
    from dataclasses import fields

    assert sorted(f.name for f in fields(TrainConfig)) == [
        "batch_size", "close_schedule", "data_dir", "data_seed", "distill_alpha", "distill_temperature", "dual_lr",
        "dual_reset", "epochs", "eval_part", "extra", "gate_init", "gate_lr", "head_lr", "lam", "latency_batch",
        "latency_length", "latency_repeats", "layer_distill", "layout", "lora_alpha", "lr", "max_eval", "max_length",
        "max_recovery_frac", "max_train", "method", "model", "output_dir", "penalty", "precision", "rank",
        "recovery_frac", "recovery_lr", "report_frac", "save_model", "seed", "target_sparsity", "task", "teacher",
        "teacher_cache", "teacher_epochs", "teacher_init", "teacher_lr", "threads", "train_bias", "warmup_frac",
        "weight_decay"]


@pytest.fixture(scope="module")
def trained(glue_dir, tmp_path_factory):
    from finegates.train import run

    out = tmp_path_factory.mktemp("trial")
    cfg = small_config(glue_dir, output_dir=str(out))
    return cfg, run(cfg)


@pytest.mark.slow
def test_a_matching_split_is_scored_once_and_logged(glue_dir, tmp_path, tracker, trained):
    cfg, result = trained
    assert result["n_eval"] == 40 and result["model_path"]
    run_id = trial_run(tracker, cfg, result)
    # the real model on other data (60 validation rows here): it could be scored, but on another split: it is not
    other = data_copy(glue_dir, tmp_path, "rte", 60)
    rep = report_score(tracker, tracker.client.get_run(run_id), get_task("rte"), result["model_path"], other)
    assert rep.score is None and "30 selection examples here vs n_eval 40" in rep.note
    assert "report_score" not in tracker.client.get_run(run_id).data.metrics
    rep = report_score(tracker, tracker.client.get_run(run_id), get_task("rte"), result["model_path"], str(glue_dir))
    assert rep.score is not None and rep.note == "" and rep.n == 40 and rep.computed_now
    assert tracker.client.get_run(run_id).data.metrics["report_score"] == pytest.approx(rep.score)
    # the majority class on the same 40 held-out examples, logged with it and read back with it
    from tune.stats import Bootstrap

    labels = np.load(tracker.client.download_artifacts(run_id, "report_predictions.npz"))["labels"]
    bs = Bootstrap(get_task("rte"), labels)
    assert rep.trivial == pytest.approx(bs.point(bs.trivial())) and rep.confirms == (rep.score > rep.trivial)
    again = report_score(tracker, tracker.client.get_run(run_id), get_task("rte"), result["model_path"], str(glue_dir))
    assert not again.computed_now and again.trivial == pytest.approx(rep.trivial)


@pytest.mark.slow
def test_a_seed_rerun_keeps_predictions_and_no_model(glue_dir, tmp_path, tracker, trained):
    """tune.trial.seed_rerun on a real trial: a FINISHED child run with its eval predictions (file and artifact,
    for the paired statistics), and no exported model written or logged."""
    from tune.trial import seed_rerun

    cfg, result = trained
    run_id = trial_run(tracker, cfg, result)
    fixed = {"mlflow_uri": tracker.uri, "experiment_id": tracker.experiment_id, "sweep": SWEEP,
             "models_dir": str(tmp_path / "models")}
    config_json = tracker.client.get_run(run_id).data.tags[TAG_CONFIG]
    score = seed_rerun(config_json, 4, run_id, fixed)
    out = tmp_path / "models" / "rte" / "seed-reruns" / f"{run_id}-seed4"
    assert (out / "eval_predictions.npz").is_file() and (out / "result.json").is_file()
    assert not (out / "model").exists() and not list(out.rglob("*.safetensors"))
    saved = json.loads((out / "result.json").read_text())
    assert saved["model_path"] is None and saved["score"] == score and saved["n_eval"] == result["n_eval"]
    rerun = tracker.find_runs(f"tags.`{TAG_ROLE}` = '{ROLE_RERUN}'")
    assert len(rerun) == 1 and rerun[0].info.status == "FINISHED"
    assert rerun[0].data.tags["mlflow.parentRunId"] == run_id and not rerun[0].data.tags.get("model_uri")
    assert {a.path for a in tracker.client.list_artifacts(rerun[0].info.run_id)} == {"eval_predictions.npz"}


def test_reconcile_closes_seed_reruns_a_dead_worker_left_running(glue_dir, tracker):
    """A re-run whose worker died stays RUNNING (tune.trial.seed_rerun never reached fail_trial): reconcile, which
    tune.run calls again after the re-runs, closes it as FAILED; finished re-runs and other sweeps are untouched."""
    cfg = small_config(glue_dir)
    trial = trial_run(tracker, cfg, recorded(cfg, 40))
    dead = tracker.rerun_run(SWEEP, trial, "rte", cfg.method, 4)
    done = tracker.rerun_run(SWEEP, trial, "rte", cfg.method, 5)
    tracker.finish_trial(done, recorded(cfg, 40), None)
    other_parent = tracker.parent_run("other-sweep", "rte")
    other_trial = tracker.trial_run("other-sweep", other_parent, "t9", "rte", cfg.method, {})
    other = tracker.rerun_run("other-sweep", other_trial, "rte", cfg.method, 4)

    assert tracker.reconcile(SWEEP, {"t1"}) == 1
    status = lambda r: tracker.client.get_run(r).info.status  # noqa: E731
    assert status(dead) == "FAILED" and "seed-rerun" in tracker.client.get_run(dead).data.tags["error"]
    assert status(done) == "FINISHED" and status(trial) == "FINISHED"
    assert status(other) == "RUNNING" and status(other_trial) == "RUNNING"
    assert tracker.reconcile(SWEEP, {"t1"}) == 0
