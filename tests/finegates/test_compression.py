"""Issue 9 mechanics on the real MiniLM and real GLUE, at tiny sizes: live gates, the teacher cache,
distillation wiring, recovery. What they buy in accuracy is measured by benchmarks/compression_frontier.py."""
import dataclasses
import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from finegates import TrainConfig
from finegates import gated_model as gm
from finegates.distill import distill_loss
from finegates.train import run

TINY = dict(task="sst2", max_train=48, max_eval=32, epochs=1, batch_size=16, max_length=32, threads=2,
            latency_repeats=1, latency_batch=1, latency_length=8)


def test_the_teacher_trains_as_published_whatever_the_student_options():
    from finegates.distill import teacher_config

    student = TrainConfig(method="finegates-lora", head_lr=3e-4, extra={"lora_slots": ["q", "v"]}, teacher="lora")
    t = teacher_config(student)
    assert (t.method, t.head_lr, t.extra, t.lr) == ("lora", None, {}, 1e-3)  # its cache key cannot miss these


def test_distill_loss_values_and_gradient():
    t = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    assert distill_loss(t.clone(), t, 2.0, regression=False).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.zeros(2, 2, requires_grad=True)
    distill_loss(s, t, 2.0, regression=False).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]  # descent moves the student towards the teacher's preference
    r = distill_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]), 2.0, regression=True)
    assert r.item() == pytest.approx((1 + 4) / 2)


def test_hidden_state_loss_matches_layers_one_to_one_on_real_tokens():
    from finegates.distill import hidden_state_loss

    g = torch.Generator().manual_seed(0)
    teacher = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(3))  # embeddings, then two layers
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert hidden_state_loss(teacher, teacher, mask).item() == 0.0
    student = (teacher[0] + 5.0, teacher[1] + 1.0, teacher[2].clone())  # the embeddings' output is not matched
    student[2][0, 2] += 100.0  # a padded token is not matched either
    student[2][1, 0, 0] += 2.0  # one real token, one dim: (2^2 / (3 tokens x 4 dims)) in layer 2
    assert hidden_state_loss(student, teacher, mask).item() == pytest.approx((1.0 + 4.0 / 12) / 2)
    s = tuple(t.clone().requires_grad_() for t in student)
    hidden_state_loss(s, teacher, mask).backward()
    assert s[0].grad is None or not s[0].grad.any()
    assert s[1].grad[0, :2].gt(0).all() and not s[1].grad[0, 2].any()  # pulled towards the teacher, real tokens


def test_layer_distillation_needs_a_teacher_and_a_weight_at_least_0():
    from finegates.distill import teacher_config
    from finegates.errors import ConfigError

    with pytest.raises(ConfigError, match="layer_distill=1.0 is invalid; accepted: 0 without a teacher"):
        TrainConfig(teacher="none", layer_distill=1.0)
    with pytest.raises(ConfigError, match="layer_distill=-1.0 is invalid; accepted: a finite number >= 0"):
        TrainConfig(layer_distill=-1.0)
    assert teacher_config(TrainConfig(layer_distill=1.0)).layer_distill == 0.0  # the teacher trains on its own


def _fraction_scaling(cfg: TrainConfig) -> float:
    """Fraction of gates whose eval value is below 1 after the run (gates that scale their unit)."""
    seen = {}

    def on_epoch(rep):
        vals = torch.cat([g.eval_values().flatten() for g in gm.all_gates(rep.model)])
        seen["below_one"] = float((vals < 1).float().mean())

    run(cfg, on_epoch=on_epoch)
    return seen["below_one"]


@pytest.mark.slow
def test_a_no_penalty_run_trains_its_gates_only_with_the_edge_init(glue_dir):
    edge = _fraction_scaling(TrainConfig(**TINY, data_dir=str(glue_dir), target_sparsity=0.0, teacher="none"))
    # the official init: above the clamp, a gate moves only where the noise put it below 1
    saturated = _fraction_scaling(TrainConfig(**TINY, data_dir=str(glue_dir), target_sparsity=0.0,
                                              gate_init="saturated", teacher="none"))
    assert edge > 0.25, edge  # after 3 steps, a large share of the units is already rescaled
    assert saturated < 0.01, saturated  # a head + biases finetune in all but name


@pytest.mark.slow
def test_teacher_is_trained_once_and_reused_and_alpha_0_equals_no_teacher(glue_dir, tmp_path):
    kw = dict(TINY, data_dir=str(glue_dir), target_sparsity=0.0, teacher="lora", teacher_cache=str(tmp_path))
    first = run(TrainConfig(**kw))
    assert first["teacher_reused"] is False
    (tdir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    info = json.loads((tdir / "teacher.json").read_text())
    assert info["method"] == "lora" and info["n_train"] == 48 and first["teacher_path"] == str(tdir)
    stamp = (tdir / "train_logits.npy").stat().st_mtime_ns
    second = run(TrainConfig(**kw | {"lr": 1e-3}))  # another trial of the task: other hyperparameters
    assert second["teacher_reused"] is True and second["teacher_path"] == str(tdir)
    assert (tdir / "train_logits.npy").stat().st_mtime_ns == stamp  # no second teacher training
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
    # wiring: alpha 0 from the pretrained model is exactly the plain run; alpha > 0 changes the training loss
    plain = run(TrainConfig(**TINY, data_dir=str(glue_dir), target_sparsity=0.0, teacher="none"))
    alpha0 = run(TrainConfig(**kw | {"distill_alpha": 0.0, "teacher_init": False}))
    assert alpha0["history"][0]["train_loss"] == plain["history"][0]["train_loss"]
    kd = run(TrainConfig(**kw | {"teacher_init": False}))
    assert kd["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
    # another training subset is another teacher
    run(TrainConfig(**kw | {"seed": 7}))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


@pytest.mark.slow
def test_recovery_pins_the_structure_and_export_keeps_it(glue_dir):
    cfg = TrainConfig(**TINY | {"max_train": 128, "epochs": 2}, data_dir=str(glue_dir), target_sparsity=0.5,
                      gate_lr=0.2, warmup_frac=0.3, recovery_frac=0.5)
    state = {}

    def on_epoch(rep):
        gates = gm.all_gates(rep.model)
        state["pinned"] = all(g.pinned for g in gates)
        state["same"] = all(torch.equal(g.closed(), g.pinned_closed) for g in gates)
        state["closed"] = gm.gate_sparsity(rep.model)
        state["compacted"] = all(gl.compacted for lg in gm.gated_layers(rep.model) for _, gl in lg.items())

    r = run(cfg, on_epoch=on_epoch)
    assert r["history"][-1]["pinned_at_step"] == 8  # 16 steps, the last half in recovery
    assert state["compacted"]  # the recovery computes the open units only ...
    compacted_state = dict(state)
    full = run(dataclasses.replace(cfg, extra={"compact_recovery": False}), on_epoch=on_epoch)
    assert not state["compacted"]
    state = compacted_state  # the checks below are the compacted run's
    # ... and trains as the full widths do (float rounding apart), to the same exported structure
    assert [h["train_loss"] for h in r["history"]] == pytest.approx([h["train_loss"] for h in full["history"]],
                                                                     rel=1e-4)
    assert r["layers"] == full["layers"]
    assert state["pinned"] and state["same"]  # closed at the pin = closed at the end, no more, no fewer
    assert state["closed"] > 0 and r["gate_sparsity"] == state["closed"]
    # the pin keeps the structure the aligned exporter writes: the export removes the target, not less
    assert 0.5 <= r["sparsity"] <= 0.55 and r["export_max_abs_diff"] <= 1e-4
    assert 0 <= r["history"][-1]["expected_sparsity_at_pin"] <= 1


def test_a_pin_far_below_the_target_is_recorded_and_warned(glue_dir, caplog):
    """4 steps of a slow controller that leaves all the closing to the pin: the expected sparsity at the pin is
    far below the 50% target, and the run says so (the pin then closes the rest at once: docs/COMPRESSION.md)."""
    cfg = TrainConfig(**TINY | {"max_train": 64}, data_dir=str(glue_dir), target_sparsity=0.5, dual_lr=1e-3,
                      warmup_frac=0.25, recovery_frac=0.5, close_schedule="at-pin")
    with caplog.at_level("WARNING", logger="finegates.methods.finegates"):
        r = run(cfg)
    at_pin = r["expected_sparsity_at_pin"]
    assert at_pin == r["history"][-1]["expected_sparsity_at_pin"] < 0.4
    assert r["pinned_at_step"] == r["history"][-1]["pinned_at_step"] == 2  # the summary says where the recovery began
    assert any("of the 50% target by the pin at step 2" in m for m in caplog.messages)


@pytest.mark.parametrize("recovery_lr", ["constant", "linear"])
def test_an_annealed_recovery_decays_every_learning_rate_to_zero_from_the_pin(glue_dir, recovery_lr):
    """--recovery-lr linear: the main optimiser's learning rates (gates, and LoRA/biases/head) are the run's until the
    pin, then fall on a line to 0 after the last step; constant keeps them. The lrs are read at each real step."""
    cfg = TrainConfig(**TINY | {"max_train": 64, "epochs": 2}, data_dir=str(glue_dir), target_sparsity=0.5,
                      teacher="none", warmup_frac=0.25, recovery_frac=0.5, recovery_lr=recovery_lr)
    seen = []

    def record(opt, args, kwargs):
        if len(opt.param_groups) == 2:  # the main optimiser (the controller's has one group)
            seen.append([g["lr"] for g in opt.param_groups])

    hook = register_optimizer_step_pre_hook(record)
    try:
        r = run(cfg)
    finally:
        hook.remove()
    assert r["history"][-1]["pinned_at_step"] == 4  # 8 steps, the last half in recovery
    factors = [1, 1, 1, 1, 1, 3 / 4, 2 / 4, 1 / 4] if recovery_lr == "linear" else [1] * 8
    assert [lr for step in seen for lr in step] == pytest.approx([lr for f in factors for lr in (cfg.gate_lr * f,
                                                                                                 cfg.lr * f)])


@pytest.mark.slow
def test_teacher_init_prunes_the_teachers_weights(glue_dir, tmp_path):
    """--teacher-init (the default): the student's frozen weights are the teacher's finetuned ones (LoRA merged
    into Q and V); with --no-teacher-init they are the pretrained ones."""
    from finegates.export import load_compressed

    seen = {}

    def frozen(rep):
        layer = gm.family_of(rep.model).layers(rep.model)[0]
        seen["q"] = layer.attention.self.query.weight.detach().clone()
        seen["k"] = layer.attention.self.key.weight.detach().clone()

    kw = dict(TINY, data_dir=str(glue_dir), method="finegates-lora", target_sparsity=0.3, teacher="lora",
              teacher_cache=str(tmp_path))
    result = run(TrainConfig(**kw), on_epoch=frozen)  # the default
    teacher = load_compressed(result["teacher_path"] + "/model")
    assert torch.equal(seen["q"], teacher.layers[0].query.weight)  # the teacher's LoRA merged in
    assert torch.equal(seen["k"], teacher.layers[0].key.weight)
    assert result["sparsity"] > 0.2  # and it still prunes
    run(TrainConfig(**kw, teacher_init=False), on_epoch=frozen)
    assert not torch.allclose(seen["q"], teacher.layers[0].query.weight)  # pretrained: LoRA's delta is missing
    assert torch.equal(seen["k"], teacher.layers[0].key.weight)  # K has no LoRA: pretrained = teacher


def test_a_dense_run_is_a_teacher_only_when_it_trains_exactly_one():
    from finegates.distill import teacher_config, teacher_of_run

    lora = TrainConfig(task="mrpc", method="lora", rank=8, lr=1e-3, seed=7, latency_repeats=3, output_dir="/x")
    assert teacher_of_run(lora) == teacher_config(TrainConfig(task="mrpc", method="finegates-lora", seed=7))
    assert teacher_of_run(dataclasses.replace(lora, data_seed=7)) is not None  # the same data seed, said twice
    full = TrainConfig(task="mrpc", method="full", lr=5e-5, seed=7)
    assert teacher_of_run(full) == teacher_config(TrainConfig(task="mrpc", seed=7, teacher="full"))
    for other in (dict(rank=4), dict(lr=2e-3), dict(head_lr=1e-3), dict(lora_alpha=16.0), dict(data_seed=8),
                  dict(method="bitfit")):
        assert teacher_of_run(dataclasses.replace(lora, **other)) is None, other
    assert teacher_of_run(dataclasses.replace(lora, epochs=2.0)).epochs == 2.0  # the teacher of 2-epoch students
    # and of a 1-epoch student whose teacher trains 3 (--teacher-epochs): the same teacher as a 3-epoch student's
    short = TrainConfig(task="mrpc", method="finegates-lora", seed=7, epochs=1.0, teacher_epochs=3.0)
    assert teacher_config(short) == teacher_config(dataclasses.replace(short, epochs=3.0, teacher_epochs=None))
    assert teacher_of_run(lora) == teacher_config(short) != teacher_config(dataclasses.replace(short, teacher_epochs=None))
    assert teacher_of_run(dataclasses.replace(lora, teacher_epochs=2.0)) is None  # a dense run trains its own epochs
    assert teacher_of_run(TrainConfig(method="finegates-lora", lr=1e-3, rank=8)) is None  # not dense
    # a sweep's LoRA reference trial is one (tune.run seeds its trials' data with the sweep seed); a seed re-run not
    from finegates.methods import get_method_class
    from tune.trial import trial_config

    fixed = {"train": dict(seed=3, data_seed=3, eval_part="selection", threads=2, teacher_cache="/t", max_train=64)}
    ref = trial_config({"method": "lora", **get_method_class("lora").reference, "reference": True}, fixed, "/o")
    assert teacher_of_run(ref) == teacher_config(dataclasses.replace(ref, method="finegates", teacher="lora"))
    assert teacher_of_run(dataclasses.replace(ref, seed=4)) is None


def test_a_lock_held_elsewhere_is_not_waited_for(tmp_path):
    from finegates.locking import file_lock

    with file_lock(tmp_path / "l") as held:
        assert held is True
        with file_lock(tmp_path / "l", blocking=False) as got:  # another open file: flock says it is taken
            assert got is False
    with file_lock(tmp_path / "l", blocking=False) as got:
        assert got is True


@pytest.mark.slow
def test_the_lora_baseline_is_the_teacher_its_students_reuse(glue_dir, tmp_path):
    """A LoRA run given the teacher cache, trained as a teacher is, puts itself there; a distilled student of the
    same task and data then reuses it (no teacher training) and starts from its weights."""
    kw = dict(TINY, data_dir=str(glue_dir), teacher_cache=str(tmp_path))
    lora = run(TrainConfig(**kw, method="lora", rank=8, lr=1e-3))
    tdir = lora["published_teacher_path"]
    assert tdir is not None and [str(p) for p in tmp_path.iterdir() if p.is_dir()] == [tdir]
    info = json.loads((tmp_path / tdir / "teacher.json").read_text())
    assert info["published_by"] == "dense run" and info["score"] == lora["score"] and info["n_train"] == 48
    student = run(TrainConfig(**kw, method="finegates-lora", target_sparsity=0.0))
    assert student["teacher_reused"] is True and student["teacher_path"] == tdir
    assert student["teacher_score"] == lora["score"]
    again = run(TrainConfig(**kw, method="lora", rank=8, lr=1e-3))  # already cached: nothing written
    assert again["published_teacher_path"] is None
    other = run(TrainConfig(**kw, method="lora", rank=4, lr=1e-3))  # not a teacher: nothing written
    assert other["published_teacher_path"] is None and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


@pytest.mark.slow
def test_layer_distillation_runs_the_teacher_beside_the_student(glue_dir, tmp_path):
    """--layer-distill: the hidden-state loss is added to the training loss, against the hidden states of the
    teacher, which runs beside the student. One step: the student starts from its teacher, so the two differ by
    the student's dropout only, and the rest of the step's loss is the run's without it."""
    kw = dict(TINY | {"max_train": 16}, data_dir=str(glue_dir), method="finegates-lora", target_sparsity=0.3,
              teacher="lora", teacher_cache=str(tmp_path))
    plain = run(TrainConfig(**kw))
    seen = []
    from finegates import distill

    real = distill.hidden_state_loss

    def spy(student, teacher, mask):
        seen.append(float(real(student, teacher, mask)))
        return real(student, teacher, mask)

    distill.hidden_state_loss = spy
    try:
        ld = run(TrainConfig(**kw, layer_distill=1.0))
    finally:
        distill.hidden_state_loss = real
    assert len(seen) == ld["steps"] == plain["steps"] == 1 and 0 < seen[0] < 1
    assert ld["history"][0]["train_loss"] == pytest.approx(plain["history"][0]["train_loss"] + seen[0], rel=1e-5)
    assert ld["teacher_reused"] is True and ld["teacher_path"] == plain["teacher_path"]
