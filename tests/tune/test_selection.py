"""The selector on real MLflow stores (SQLite in a tmp dir) holding runs shaped like the sweep's, with
synthetic per-example predictions: the trivial-predictor guard, the paired rule, intervals, the CLI."""
import json
import shutil

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from tasks import compute_metrics, get_task, trivial_score
from tune.pareto import Point, select
from tune.select import main, select_sweep
from tune.tracking import TAG_METHOD, TAG_PARETO, TAG_ROLE, TAG_SWEEP, TAG_TASK, TAG_TRIAL, Tracker

SWEEP = "synthetic"


class Store:
    """A sweep-shaped experiment: a parent run per task, one child run per trial (tags, params and metrics as
    tune.tracking writes them), the predictions as a file and as the run artifact, a model to register."""

    def __init__(self, root, template):
        self.root = root
        shutil.copy(template, root / "mlflow.db")
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.exp = self.client.create_experiment(SWEEP, artifact_location=(root / "artifacts").as_uri())
        self.parents = {}
        self.n = 0

    @property
    def tracker(self):
        return Tracker(self.uri, experiment_id=self.exp)

    def parent(self, task):
        if task not in self.parents:
            self.parents[task] = self.client.create_run(self.exp, run_name=task, tags={
                TAG_ROLE: "parent", TAG_TASK: task, TAG_SWEEP: SWEEP}).info.run_id
        return self.parents[task]

    def trial(self, task, preds, labels, sparsity, latency_ms=10.0, reference=False, method="finegates",
              save="both", record_trivial=True, cpu_latency_ms=None, latency_device=None):
        """``save``: both (file + artifact), artifact (the file is gone), file, none (an older run)."""
        self.n += 1
        spec = get_task(task)
        trial_id = f"t{self.n:03d}"
        run = self.client.create_run(self.exp, run_name=f"{task}-{method}-{trial_id}", tags={
            "mlflow.parentRunId": self.parent(task), TAG_ROLE: "trial", TAG_TASK: task, TAG_METHOD: method,
            TAG_TRIAL: trial_id, TAG_SWEEP: SWEEP, TAG_PARETO: "false"})
        rid = run.info.run_id
        out = self.root / "models" / task / trial_id
        (out / "model").mkdir(parents=True)
        (out / "model" / "model.safetensors").write_bytes(b"synthetic")
        (out / "mlmodel").mkdir()
        (out / "mlmodel" / "MLmodel").write_text("flavors: {}\n")
        self.client.log_artifacts(rid, str(out / "mlmodel"), "model")
        preds_path = out / "eval_predictions.npz"
        np.savez(preds_path, predictions=preds, labels=labels)
        if save in ("both", "artifact"):
            self.client.log_artifact(rid, str(preds_path))
        if save in ("artifact", "none"):
            preds_path.unlink()
        score = compute_metrics(spec, preds, labels)["score"]
        metrics = {"score": score, "sparsity": sparsity, "latency_ms": latency_ms, "speedup": 10.0 / latency_ms,
                   "n_eval": float(len(labels))}
        if record_trivial:
            metrics["trivial_score"] = trivial_score(spec, labels)
        if cpu_latency_ms is not None:
            metrics["cpu_latency_ms"] = cpu_latency_ms
        tags = {"validation_source": "validation", "model_path": str(out / "model"),
                "model_uri": f"runs:/{rid}/model"}
        if latency_device is not None:
            tags["latency_device"] = latency_device
        if save != "none":
            tags["predictions_path"] = str(preds_path)
        params = {"task": task, "method": method, "reference": str(reference),
                  "target_sparsity": "0.0" if reference else str(sparsity), "lr": "0.002"}
        self.client.log_batch(rid, metrics=[Metric(k, float(v), 0, 3) for k, v in metrics.items()],
                              params=[Param(k, v) for k, v in params.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def select(self, tasks, budgets, **kw):
        return select_sweep(self.tracker, tasks, budgets, self.root / "selection", sweep=SWEEP, **kw)

    def parent_tags(self, task):
        return self.client.get_run(self.parents[task]).data.tags

    def alias(self, task, budget_alias):
        try:
            return self.client.get_model_version_by_alias(f"finegates-{task}", budget_alias)
        except Exception:  # noqa: BLE001
            return None


@pytest.fixture()
def store(tmp_path, template_db):
    return Store(tmp_path, template_db)


def labelled(n, majority=0.6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(n) > majority).astype(np.int64)  # class 0 is the majority


def right_on(labels, fraction, seed=1):
    """Predictions right on the first ``fraction`` of a seeded permutation of the examples, wrong elsewhere."""
    order = np.random.default_rng(seed).permutation(len(labels))
    p = labels.copy()
    wrong = order[int(round(fraction * len(labels))):]
    p[wrong] = 1 - p[wrong]
    return p


def test_a_reference_at_chance_is_not_learned_and_nothing_is_registered(store):
    y = labelled(400)
    majority = np.zeros_like(y)  # the majority class everywhere: exactly the trivial score
    store.trial("rte", majority, y, 0.0, reference=True)
    store.trial("rte", right_on(y, 0.55, seed=2), y, 0.5)  # a pruned trial just above chance
    good = right_on(y, 0.9)
    store.trial("sst2", good, y, 0.0, reference=True)
    sparse = store.trial("sst2", good, y, 0.4, latency_ms=6.0)  # same predictions, pruned
    # an alias left by an earlier selection (before the guard) must not survive
    from mlflow import register_model, set_tracking_uri

    set_tracking_uri(store.uri)
    stale_run = store.client.search_runs([store.exp], "tags.task = 'rte' and params.reference = 'False'")[0]
    v = register_model(f"runs:/{stale_run.info.run_id}/model", "finegates-rte")
    store.client.set_registered_model_alias("finegates-rte", "budget-0_5", v.version)

    rows = store.select(["rte", "sst2"], [0.02, 0.5], rule="plain")

    rte = [r for r in rows if r["task"] == "rte"]
    assert len(rte) == 2 and {r["status"] for r in rte} == {"not_learned"}
    for r in rte:
        assert r["chosen_run_id"] is None and r["model_version"] is None and r["model_dir"] is None
        assert r["reason"].startswith("not learned: reference trial")
        assert f"vs trivial {trivial_score(get_task('rte'), y):.4f}" in r["reason"]
        assert "2 SE" in r["reason"] and "paired bootstrap" in r["reason"]
        assert r["guard"]["learned"] is False and r["guard"]["difference"] == 0
        assert not (store.root / "selection" / "rte" / f"budget-{r['budget']:g}").exists()
    on_disk = json.loads((store.root / "selection" / "selection.json").read_text())
    assert [r["status"] for r in on_disk if r["task"] == "rte"] == ["not_learned", "not_learned"]
    tags = store.parent_tags("rte")
    assert tags["selection_status"] == "not_learned" and "vs trivial" in tags["selection_reason"]
    assert store.alias("rte", "budget-0_02") is None and store.alias("rte", "budget-0_5") is None  # stale one gone
    # the clear learner passes the guard and is registered
    sst2 = [r for r in rows if r["task"] == "sst2"]
    assert {r["status"] for r in sst2} == {"selected"} and all(r["chosen_run_id"] == sparse for r in sst2)
    assert store.parent_tags("sst2")["selection_status"] == "learned"
    assert store.alias("sst2", "budget-0_02").run_id == sparse
    assert (store.root / "selection" / "sst2" / "budget-0.02" / "model.safetensors").is_file()


def test_the_paired_rule_rejects_a_loss_within_noise_and_accepts_a_twin(store):
    y = labelled(400, seed=3)
    ref_preds = right_on(y, 0.90, seed=4)  # right on 360 examples
    noisy = ref_preds.copy()
    right, wrong = np.flatnonzero(ref_preds == y), np.flatnonzero(ref_preds != y)
    noisy[right[:40]] = 1 - y[right[:40]]  # 40 new errors ...
    noisy[wrong[:32]] = y[wrong[:32]]  # ... 32 fixed: 0.88, within 5% of 0.90 but by a noisy margin
    ref = store.trial("sst2", ref_preds, y, 0.0, reference=True)
    twin = store.trial("sst2", ref_preds.copy(), y, 0.3, latency_ms=8.0)
    store.trial("sst2", noisy, y, 0.6, latency_ms=6.0)
    noisy_id = store.client.search_runs([store.exp], "params.target_sparsity = '0.6'")[0].info.run_id

    plain = store.select(["sst2"], [0.05], rule="plain", do_register=False)[0]
    assert plain["chosen_run_id"] == noisy_id and plain["score"] == pytest.approx(0.88)
    paired = store.select(["sst2"], [0.05], do_register=False)[0]  # paired is the default
    assert paired["selection_rule"] == paired["rule_applied"] == "paired"
    assert paired["chosen_run_id"] == twin  # identical to the reference: a paired difference of exactly 0
    assert paired["reference_run_id"] == twin  # (it ties the best score and is sparser: it is the reference)
    cands = {c["run_id"]: c for c in paired["candidates"]}
    lo, hi = cands[noisy_id]["diff_vs_reference_ci"]
    assert lo < -0.05 * 0.90 < -0.02 < hi  # the point loss is within budget, its interval is not
    assert not cands[noisy_id]["eligible"] and cands[ref]["eligible"] and cands[twin]["eligible"]
    assert cands[ref]["diff_vs_reference_ci"] == [0.0, 0.0]
    assert paired["diff_vs_reference"]["estimate"] == 0.0
    # the interval of every score is in the record, and covers it
    for c in paired["candidates"]:
        assert c["score_ci"][0] <= c["score"] <= c["score_ci"][1]
        assert c["beats_trivial"] is True and c["guard_method"] == "bootstrap"
    # ... and as metrics on the trial runs
    m = store.client.get_run(noisy_id).data.metrics
    assert m["score_ci_low"] == cands[noisy_id]["score_ci"][0] and m["score_ci_high"] == cands[noisy_id]["score_ci"][1]
    # a wide enough budget admits it under the paired rule too
    assert store.select(["sst2"], [0.2], do_register=False)[0]["chosen_run_id"] == noisy_id


def test_the_plain_rule_reproduces_the_selection_before_intervals(store):
    y = labelled(500, seed=5)
    specs = [(0.92, 0.0, 12.0, True), (0.915, 0.2, 11.0, False), (0.90, 0.35, 9.0, False), (0.88, 0.5, 8.0, False),
             (0.86, 0.5, 7.0, False), (0.80, 0.7, 5.0, False), (0.75, 0.8, 4.0, False)]
    for i, (acc, sp, lat, ref) in enumerate(specs):
        store.trial("qnli", right_on(y, acc, seed=10 + i), y, sp, latency_ms=lat, reference=ref)
    pts = [Point(p.id, p.score, p.sparsity, p.latency_ms) for p in store.tracker.trial_points("qnli", SWEEP)]
    budgets = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2]
    for mode in ("relative", "absolute"):
        for select_by in ("sparsity", "latency"):
            rows = store.select(["qnli"], budgets, rule="plain", mode=mode, select_by=select_by, do_register=False)
            for r in rows:
                before = select(pts, r["budget"], mode, select_by)  # the selector's rule before this change
                assert r["chosen_run_id"] == before.chosen.id, (mode, select_by, r["budget"])
                assert r["threshold"] == before.threshold and r["reference_score"] == before.reference.score
                assert r["rule_applied"] == "plain" and r["excluded"] == 0


def test_a_pick_that_is_not_clearly_above_the_trivial_predictor_is_never_registered(store):
    y = labelled(400, seed=6)
    store.trial("qnli", right_on(y, 0.9, seed=7), y, 0.0, reference=True)
    store.trial("qnli", right_on(y, 0.8, seed=8), y, 0.5, latency_ms=7.0)
    chance = store.trial("qnli", np.zeros_like(y), y, 0.9, latency_ms=3.0)  # majority class, sparsest, fastest
    pts = [Point(p.id, p.score, p.sparsity, p.latency_ms) for p in store.tracker.trial_points("qnli", SWEEP)]
    assert select(pts, 0.5).chosen.id == chance  # the rule without the guard would have picked it
    for rule in ("plain", "paired"):
        r = store.select(["qnli"], [0.5], rule=rule)[0]
        assert r["status"] == "selected" and r["chosen_run_id"] != chance and r["excluded"] == 1
        assert {c["run_id"]: c["beats_trivial"] for c in r["candidates"]}[chance] is False
        assert store.alias("qnli", "budget-0_5").run_id == r["chosen_run_id"]


def test_predictions_from_the_artifact_and_the_fallback_without_any(store):
    y = labelled(400, seed=9)
    good = right_on(y, 0.9, seed=2)
    store.trial("mrpc", good, y, 0.0, reference=True, save="artifact")  # the file stayed on a worker
    store.trial("mrpc", good, y, 0.3, save="artifact")
    r = store.select(["mrpc"], [0.02], do_register=False)[0]
    assert r["rule_applied"] == "paired" and r["score_ci"] and r["guard"]["method"] == "bootstrap"
    # an older sweep: no predictions anywhere
    store.trial("cola", right_on(y, 0.9), y, 0.0, reference=True, save="none", record_trivial=False)
    store.trial("cola", right_on(y, 0.88, seed=5), y, 0.4, save="none", record_trivial=False)
    store.trial("stsb", np.linspace(0, 5, 400), np.linspace(0, 5, 400), 0.0, reference=True, save="none")
    store.trial("rte", right_on(y, 0.9), y, 0.0, reference=True, save="none", record_trivial=False)
    rows = {r["task"]: r for r in store.select(["cola", "stsb", "rte"], [0.02], do_register=False)}
    cola = rows["cola"]
    assert cola["status"] == "selected" and cola["rule_applied"] == "plain" and cola["score_ci"] is None
    assert cola["guard"]["method"] == "fallback" and "1/sqrt(n)" in cola["reason"]  # MCC's trivial score is 0
    assert any("plain rule was applied" in n for n in cola["notes"])
    assert rows["stsb"]["status"] == "selected"
    rte = rows["rte"]  # accuracy without a recorded trivial score: nothing to check it against
    assert rte["status"] == "unverified" and rte["chosen_run_id"] is None and "trivial_score" in rte["reason"]
    assert store.parent_tags("rte")["selection_status"] == "unverified"


def test_a_stale_predictions_file_is_not_trusted(store, caplog):
    y = labelled(300, seed=11)
    rid = store.trial("sst2", right_on(y, 0.9), y, 0.0, reference=True, save="file")
    path = store.client.get_run(rid).data.tags["predictions_path"]
    np.savez(path, predictions=np.zeros_like(y), labels=y)  # overwritten by something else
    r = store.select(["sst2"], [0.02], do_register=False)[0]
    assert r["guard"]["method"] == "fallback" and r["reference_score_ci"] is None
    assert "not the recorded" in caplog.text


def test_reselecting_keeps_the_choice_and_the_records(store):
    y = labelled(300, seed=12)
    store.trial("sst2", right_on(y, 0.9), y, 0.0, reference=True)
    store.trial("sst2", right_on(y, 0.9), y, 0.5)
    first = store.select(["sst2"], [0.02])
    second = store.select(["sst2"], [0.02])
    assert first == second and len(store.client.search_model_versions("name='finegates-sst2'")) == 1


def test_cli_table_shows_intervals_and_reasons(store, capsys, monkeypatch):
    y = labelled(400, seed=13)
    store.trial("sst2", right_on(y, 0.9), y, 0.0, reference=True)
    store.trial("rte", np.zeros_like(y), y, 0.0, reference=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out_dir = store.root / "cli"
    code = main(["--experiment", SWEEP, "--mlflow-uri", store.uri, "--budget", "0.02", "--out", str(out_dir),
                 "--no-register", "--resamples", "200", "--bootstrap-seed", "3"])
    text = capsys.readouterr().out
    assert code == 0, text
    sst2 = next(line for line in text.splitlines() if line.startswith("sst2"))
    assert "0.9000 [0.8" in sst2 and "selected" in sst2 and "paired" in sst2
    assert next(line for line in text.splitlines() if line.startswith("rte ")).split()[2:4] == ["not", "learned"]
    assert "rte: not learned: reference trial" in text
    rows = json.loads((out_dir / "selection.json").read_text())
    assert rows[0]["bootstrap"] == {"resamples": 200, "seed": 3, "confidence": 0.95, "guard_z": 2.0}


@pytest.mark.parametrize("args,message", [
    (["--resamples", "5"], "--resamples 5 is too few; accepted: an integer >= 100"),
    (["--rule", "strict"], "argument --rule: invalid choice: 'strict'"),
])
def test_cli_bad_selection_options(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        code = main(["--experiment", "x", *args])
    except SystemExit as e:  # argparse's own choice check
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert list(tmp_path.iterdir()) == []


def test_a_smoke_sweep_never_touches_a_real_sweeps_aliases(store, capsys, monkeypatch):
    """The real sweep's choice holds finegates-sst2@budget-0_02; a smoke sweep (experiment tag written by
    ``tune.run --smoke-test``) selected by the CLI registers finegates-sst2-smoke and leaves it alone."""
    from tune.tracking import TAG_REGISTRY_SUFFIX

    y = labelled(300, seed=14)
    store.trial("sst2", right_on(y, 0.9), y, 0.0, reference=True)
    real = store.select(["sst2"], [0.02])[0]
    assert real["registered_model"] == "finegates-sst2"
    store.client.set_experiment_tag(store.exp, TAG_REGISTRY_SUFFIX, "-smoke")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["--experiment", SWEEP, "--mlflow-uri", store.uri, "--budget", "0.02", "--out",
                 str(store.root / "smoke-selection")])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((store.root / "smoke-selection" / "selection.json").read_text())
    assert rows[0]["registered_model"] == "finegates-sst2-smoke"
    assert store.client.get_model_version_by_alias("finegates-sst2-smoke", "budget-0_02").version == 1
    kept = store.client.get_model_version_by_alias("finegates-sst2", "budget-0_02")
    assert (str(kept.version), kept.run_id) == (str(real["model_version"]), real["chosen_run_id"])


def test_latencies_timed_on_different_devices_are_compared_on_the_cpu(store):
    """--select-by latency: a GPU worker's 2 ms beside a CPU worker's 20 ms says nothing about which model is
    faster; every trial also has its CPU latency, and the selector compares those, with a note in the row."""
    y = labelled(400)
    good = right_on(y, 0.9)
    gpu = "cuda-bf16 (NVIDIA H100 80GB HBM3)"
    store.trial("sst2", good, y, 0.0, latency_ms=40.0, cpu_latency_ms=40.0, latency_device="cpu", reference=True)
    on_gpu = store.trial("sst2", good, y, 0.5, latency_ms=2.0, cpu_latency_ms=30.0, latency_device=gpu)
    on_cpu = store.trial("sst2", good, y, 0.4, latency_ms=20.0, cpu_latency_ms=20.0, latency_device="cpu")
    [row] = store.select(["sst2"], [0.05], select_by="latency", do_register=False)
    assert row["chosen_run_id"] == on_cpu and row["latency_compared"] == "cpu_latency_ms"
    assert any("different devices (cpu, cuda-bf16 (NVIDIA H100 80GB HBM3)): latencies compared on the CPU" in n
               for n in row["notes"])
    assert {c["run_id"]: c["latency_ms"] for c in row["candidates"]}[on_gpu] == 30.0
    # one device for every trial: its own latency is compared, without a note
    [row] = store.select(["sst2"], [0.05], select_by="latency", do_register=False, latency_device="cpu")
    assert row["chosen_run_id"] == on_cpu and row["latency_compared"] == "cpu_latency_ms"
    assert not any("different devices" in n for n in row["notes"])


def test_latencies_on_one_device_are_compared_as_they_are(store):
    y = labelled(400)
    good = right_on(y, 0.9)
    gpu = "cuda-bf16 (NVIDIA H100 80GB HBM3)"
    store.trial("sst2", good, y, 0.0, latency_ms=4.0, cpu_latency_ms=40.0, latency_device=gpu, reference=True)
    fast = store.trial("sst2", good, y, 0.5, latency_ms=2.0, cpu_latency_ms=30.0, latency_device=gpu)
    store.trial("sst2", good, y, 0.4, latency_ms=3.0, cpu_latency_ms=20.0, latency_device=gpu)
    [row] = store.select(["sst2"], [0.05], select_by="latency", do_register=False)
    assert row["chosen_run_id"] == fast and row["latency_compared"] == "latency_ms"
    assert not any("different devices" in n for n in row["notes"])


def _held_out(store, rid, score, trivial, n=200):
    """The report part as tune.heldout logs it once a pick was scored there (read back, not recomputed)."""
    store.client.log_batch(rid, metrics=[Metric("report_score", score, 0, 0), Metric("report_n", float(n), 0, 0),
                                         Metric("report_trivial_score", trivial, 0, 0)])


def test_a_pick_the_held_out_part_does_not_confirm_is_not_registered(store):
    """The guard passed on the selection part, but on the held-out part the pick is no better than the majority
    class: no alias, no model directory, and the row says why (issue 11: no chance-level model registered)."""
    y = labelled(400, seed=21)
    good = right_on(y, 0.9)
    ref = store.trial("mrpc", good, y, 0.0, reference=True)
    sparse = store.trial("mrpc", good, y, 0.4, latency_ms=6.0)
    _held_out(store, ref, 0.70, 0.72)
    _held_out(store, sparse, 0.70, 0.72)  # below the majority class on the 200 held-out examples
    learned = store.trial("sst2", good, y, 0.0, reference=True)
    _held_out(store, learned, 0.88, 0.60)
    rows = store.select(["mrpc", "sst2"], [0.02])
    mrpc, sst2 = rows
    assert mrpc["status"] == "not_confirmed" and mrpc["refused_run_id"] == sparse
    assert mrpc["chosen_run_id"] is None and mrpc["model_version"] is None and mrpc["model_dir"] is None
    assert mrpc["report_score"] == 0.70 and mrpc["report_trivial_score"] == 0.72
    assert "not above the trivial predictor's 0.7200 there" in mrpc["reason"]
    assert store.alias("mrpc", "budget-0_02") is None
    assert not (store.root / "selection" / "mrpc" / "budget-0.02").exists()
    assert sst2["status"] == "selected" and sst2["report_trivial_score"] == 0.60 and sst2["refused_run_id"] is None
    assert store.alias("sst2", "budget-0_02").run_id == learned
