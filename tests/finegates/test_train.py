"""Real MiniLM, real GLUE: a short run learns, a large lambda prunes, the export matches and loads."""
import json

import pytest

from finegates import TrainConfig, load_compressed
from finegates.train import run

pytestmark = pytest.mark.slow  # trains the real model / starts Ray and MLflow (fast lane: -m 'not slow')



@pytest.fixture(scope="module")
def learned(glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("learned")
    epochs = []
    cfg = TrainConfig(task="sst2", max_train=400, max_eval=300, epochs=2, max_length=64, threads=2,
                      data_dir=str(glue_dir), output_dir=str(out), latency_repeats=3, latency_batch=4,
                      latency_length=32)
    return run(cfg, on_epoch=epochs.append), epochs, out


def test_short_run_clearly_beats_the_majority_class(learned):
    result, epochs, _ = learned
    majority = 0.509  # SST-2 validation: 444 of 872 positive
    assert result["score"] > majority + 0.12, result["score"]
    assert [e.metrics["epoch"] for e in epochs] == [1, 2]
    assert all("score" in e.metrics and "gate_sparsity" in e.metrics for e in epochs)
    assert any(".theta" in n for n in epochs[-1].trainable_state())


def test_result_fields_and_files(learned):
    result, _, out = learned
    for key in ("score", "eval_accuracy", "sparsity", "gate_sparsity", "params_total", "params_trainable",
                "latency_ms", "dense_latency_ms", "speedup", "model_path", "validation_source"):
        assert key in result, key
    assert result["params_total"] == 22_713_986  # MiniLM + 2-class head
    assert 0 < result["params_trainable"] < 0.01 * result["params_total"]
    assert result["export_max_abs_diff"] <= 1e-4
    # a CPU-only machine times on the CPU only, and says so
    assert result["latency_device"] == "cpu" and "CPU latency only" in result["latency_note"]
    assert result["latency_ms"] == result["cpu_latency_ms"] and result["speedup"] == result["cpu_speedup"]
    assert result["speedup_q25"] <= result["speedup"] <= result["speedup_q75"]
    assert not any(k.startswith("gpu_") for k in result)
    saved = json.loads((out / "result.json").read_text())
    assert saved["score"] == result["score"]
    assert load_compressed(result["model_path"]).config.num_labels == 2


def test_large_paper_lambda_gives_nonzero_exported_sparsity(glue_dir, tmp_path):
    cfg = TrainConfig(task="sst2", penalty="paper", lam=20.0, gate_lr=0.2, max_train=256, max_eval=64, epochs=2, max_length=48,
                      threads=2, data_dir=str(glue_dir), output_dir=str(tmp_path), latency_repeats=2,
                      latency_batch=2, latency_length=32)
    r = run(cfg)
    assert r["sparsity"] > 0.05, r["sparsity"]
    assert r["gate_sparsity"] > 0
    assert r["export_max_abs_diff"] <= 1e-4
    # the exported tensors really are smaller than the dense ones
    assert r["gated_params_after"] < r["gated_params_before"]
    assert r["params_exported"] < r["params_total"]


def test_same_seed_same_result(glue_dir):
    kw = dict(task="rte", max_train=48, max_eval=32, epochs=1, max_length=48, threads=2, data_dir=str(glue_dir),
              latency_repeats=1, latency_batch=1, latency_length=8)
    a, b = run(TrainConfig(**kw)), run(TrainConfig(**kw))
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert a["score"] == b["score"] and a["sparsity"] == b["sparsity"]
