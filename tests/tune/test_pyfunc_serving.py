"""What is registered serves what was evaluated: the MLflow pyfunc model of a trial, loaded from a real
MLflow store, predicts on the trial's own evaluation examples exactly what the trial scored
(eval_predictions.npz), because it tokenises with the trial's max_length; max_length is a run param."""
import json

import mlflow
import numpy as np
import pandas as pd

from finegates.config import TrainConfig
from finegates.train import run
from tasks import get_task
from tasks.data import select_frames
from tune.tracking import Tracker
from tune.trial import trial_params


def test_pyfunc_predicts_what_the_trial_scored(glue_dir, tokenizer, tmp_path):
    task = get_task("rte")
    # max_length 32: most RTE pairs are longer, so a model served with another truncation disagrees
    cfg = TrainConfig(task="rte", max_train=128, max_eval=150, epochs=1.0, max_length=32, teacher="none",
                      target_sparsity=0.3, gate_lr=0.5, data_dir=str(glue_dir), threads=2, latency_repeats=1,
                      latency_batch=1, latency_length=16, output_dir=str(tmp_path / "trial"))
    result = run(cfg)
    with np.load(result["predictions_path"]) as z:
        trial_preds, labels = z["predictions"], z["labels"]

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "serving")
    parent = tracker.parent_run("serving", "rte")
    params = trial_params({"task": "rte", "method": "finegates", "reference": False}, cfg)
    run_id = tracker.trial_run("serving", parent, "t1", "rte", "finegates", params)
    tracker.finish_trial(run_id, result, result["model_path"])
    r = tracker.client.get_run(run_id)
    assert r.data.params["max_length"] == "32"
    assert json.loads((tmp_path / "trial" / "model" / "finegates.json").read_text())["config"]["max_length"] == 32

    _, eval_df, _, _ = select_frames(task, data_dir=glue_dir, max_train=128, max_eval=150, seed=cfg.seed)
    assert len(eval_df) == len(trial_preds) == 150
    assert np.array_equal(eval_df["label"].to_numpy(), labels)  # the same examples, in the same order
    longer = sum(len(ids) > 32 for ids in tokenizer(eval_df["sentence1"].tolist(),
                                                    eval_df["sentence2"].tolist())["input_ids"])
    assert longer > 100

    mlflow.set_tracking_uri(tracker.uri)
    model = mlflow.pyfunc.load_model(r.data.tags["model_uri"])
    out = model.predict(pd.DataFrame({"text": eval_df["sentence1"].tolist(), "text_pair": eval_df["sentence2"].tolist()}))
    served = np.array([task.label_names.index(name) for name in out["label"]])
    assert np.array_equal(served, trial_preds), int((served != trial_preds).sum())
    # the check is sensitive: served with the old fixed 512 tokens, the model's outputs change (its class
    # probabilities; a model this small may predict one class for every pair either way)
    model.unwrap_python_model().max_length = 512
    out512 = model.predict(pd.DataFrame({"text": eval_df["sentence1"].tolist(),
                                         "text_pair": eval_df["sentence2"].tolist()}))
    assert not np.allclose(out512["score"].to_numpy(), out["score"].to_numpy(), atol=1e-6)
