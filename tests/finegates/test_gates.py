import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from finegates.gated_model import (SparsityController, all_gates, apply_gates, count_parameters, expected_sparsity,
                                   gate_sparsity, penalty_code, penalty_paper)
from finegates.gates import PINNED_OPEN_MIN, Gate, GatedLinear, gate_values, keep_open_all_, p_open_all


def test_saturated_init_matches_the_official_code():
    torch.manual_seed(0)
    g = Gate(20000, init="saturated")
    assert g.theta.mean().item() == pytest.approx(1.0, abs=0.01)
    assert g.theta.std().item() == pytest.approx(0.1, abs=0.01)
    assert g.mu.mean().item() == pytest.approx(math.tanh(1.0), abs=0.01)  # ~0.76: gate fully open
    g.eval()
    assert torch.all(g() == 1.0)


def test_train_is_noisy_and_clamped_eval_is_deterministic():
    g = Gate(5)
    with torch.no_grad():
        g.theta.copy_(torch.tensor([-3.0, -0.3, 0.0, 0.3, 3.0]))
    mu = torch.tanh(g.theta.detach())
    g.eval()
    assert torch.allclose(g(), torch.clamp(mu + 0.5, 0, 1))
    assert torch.equal(g(), g())
    assert g.closed().tolist() == [True, False, False, False, False]  # closed iff mu <= -0.5
    g.train()
    torch.manual_seed(0)
    draws = torch.stack([g() for _ in range(2000)])
    assert draws.min() >= 0 and draws.max() <= 1
    # unclamped entries (theta=0: mu=0, z=0.5+eps) have the noise std 0.1
    assert draws[:, 2].std().item() == pytest.approx(0.1, abs=0.01)


def test_p_open_value_and_gradient():
    g = Gate(3)
    with torch.no_grad():
        g.theta.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    p = g.p_open()
    mu = torch.tanh(g.theta.detach())
    assert torch.allclose(p, torch.tensor(norm.cdf(((mu + 0.5) / 0.5).numpy()), dtype=torch.float32), atol=1e-6)
    p.sum().backward()
    # d/dtheta Phi((tanh(theta)+0.5)/0.5) = phi(.) / 0.5 * (1 - tanh^2)
    expected = norm.pdf(((mu + 0.5) / 0.5).numpy()) / 0.5 * (1 - mu.numpy() ** 2)
    assert torch.allclose(g.theta.grad, torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_edge_init_is_open_and_exact_and_bad_init_is_named():
    g = Gate(1000)
    g.eval()
    assert torch.all(g() == 1.0)  # the model starts as the pretrained one
    assert torch.allclose(g.mu + 0.5, torch.ones(1000), atol=1e-4)
    with pytest.raises(ValueError, match="gate init 'open' is invalid; accepted: edge, saturated"):
        Gate(3, init="open")


def test_edge_gates_get_a_task_gradient_at_step_zero():
    """Liveness: with no penalty at all, a training forward pass gives most gates a task gradient."""
    torch.manual_seed(0)
    grads = {}
    for init in ("edge", "saturated"):
        gl = GatedLinear(nn.Linear(64, 64), gate_init=init)
        gl.train()
        gl(torch.randn(8, 64)).pow(2).sum().backward()
        grads[init] = torch.cat([gl.row_gate.theta.grad, gl.col_gate.theta.grad])
    live = (grads["edge"] != 0).float().mean().item()
    assert 0.3 < live < 0.7, live  # the draws below the clamp: about half
    assert (grads["saturated"] != 0).float().mean().item() < 0.05  # the official init: above the clamp


def test_pinned_gates_keep_their_structure_while_training():
    torch.manual_seed(0)
    gl = GatedLinear(nn.Linear(16, 16), row=True, col=False)
    with torch.no_grad():
        gl.row_gate.theta[:5] = -3.0  # closed
        gl.row_gate.theta[5:8] = -0.5  # open, close to closing
    closed_before = gl.row_gate.closed().clone()
    gl.row_gate.pin()
    opt = torch.optim.SGD(gl.parameters(), lr=5.0)
    gl.train()
    for sign in (1.0, -1.0):  # push every gate up, then down hard
        for _ in range(20):
            (sign * -gl(torch.randn(4, 16)).abs().sum()).backward()
            opt.step()
            opt.zero_grad()
            gl.row_gate.keep_open_()
        assert torch.equal(gl.row_gate.closed(), closed_before)
        assert torch.all(gl(torch.randn(3, 16))[:, :5] == 0)  # closed rows output exactly 0, even in training
        assert torch.all(gl.row_gate.eval_values()[5:] >= 0.05 - 1e-6)


def test_keeping_many_pinned_gates_open_at_once_is_keeping_each_open():
    """``keep_open_all_`` (one op for all gates, after each recovery step) leaves what ``keep_open_`` leaves: open units
    at an eval value of at least PINNED_OPEN_MIN, pinned-closed units and unpinned gates untouched, NaN kept."""
    torch.manual_seed(0)
    gates = [Gate(n) for n in (7, 12, 5)]
    for g in gates:
        with torch.no_grad():
            g.theta.copy_(torch.randn(g.theta.shape) * 2)
    for g in gates[:2]:
        g.pin()
    with torch.no_grad():  # what an optimiser step may do: anything, below the floor, for open and closed units
        for g in gates:
            g.theta.copy_(torch.randn(g.theta.shape) * 3)
        gates[1].theta[0] = float("nan")
    before = [g.theta.detach().clone() for g in gates]
    floor = math.atanh(PINNED_OPEN_MIN - 0.5)
    want = [torch.where(g.pinned_closed, t, t.clamp(min=floor)) if g.pinned else t for g, t in zip(gates, before)]
    keep_open_all_(gates)
    for g, w, b in zip(gates, want, before):
        assert torch.allclose(g.theta.detach(), w, equal_nan=True, rtol=0, atol=0)
        if g.pinned:
            kept = g.eval_values()[~g.pinned_closed]
            assert torch.all(kept[~kept.isnan()] >= PINNED_OPEN_MIN - 1e-6)
            assert torch.equal(g.theta.detach()[g.pinned_closed], b[g.pinned_closed])
            assert g.pinned_closed.any() and (b[~g.pinned_closed] < floor).any()  # both kinds were there to test
    assert torch.equal(gates[2].theta.detach(), before[2])
    one = [g.theta.detach().clone() for g in gates]
    for g, b in zip(gates, before):  # the one-gate form agrees
        with torch.no_grad():
            g.theta.copy_(b)
        g.keep_open_()
    assert all(torch.allclose(g.theta.detach(), o, equal_nan=True, rtol=0, atol=0) for g, o in zip(gates, one))


def test_clamped_open_gate_gets_no_task_gradient():
    """The reason the official defaults are slow: at init the gate sits above the clamp."""
    torch.manual_seed(0)
    gl = GatedLinear(nn.Linear(4, 3), gate_init="saturated")
    gl.eval()
    gl(torch.randn(2, 4)).sum().backward()
    assert torch.all(gl.row_gate.theta.grad == 0) and torch.all(gl.col_gate.theta.grad == 0)


def test_gated_linear_forward_formula_with_lora():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    gl = GatedLinear(base, rank=2, lora_alpha=4.0)
    with torch.no_grad():
        gl.lora_B.normal_()
        gl.row_gate.theta.uniform_(-2, 2)
        gl.col_gate.theta.uniform_(-2, 2)
    gl.eval()
    x = torch.randn(5, 6)
    zr, zc = gl.row_gate.eval_values(), gl.col_gate.eval_values()
    w = base.weight + 2.0 * gl.lora_B @ gl.lora_A
    expected = zr * ((x * zc) @ w.T + base.bias)
    assert torch.allclose(gl(x), expected, atol=1e-6)
    wf, bf = gl.folded()
    assert torch.allclose(x @ wf.T + bf, expected, atol=1e-5)
    # a closed row outputs exactly zero, bias included
    with torch.no_grad():
        gl.row_gate.theta[0] = -5.0
    assert torch.all(gl(x)[:, 0] == 0)


def test_lora_starts_at_the_base_function_and_rejects_negative_rank():
    base = nn.Linear(6, 4)
    gl = GatedLinear(base, row=False, col=False, rank=3)
    x = torch.randn(2, 6)
    assert torch.allclose(gl(x), base(x))
    with pytest.raises(ValueError, match="rank"):
        GatedLinear(base, rank=-1)


def _tiny_bert(num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def test_penalties_values_and_gradients():
    torch.manual_seed(0)
    m = _tiny_bert()
    layers = apply_gates(m, layout="independent")
    gates = [g for lg in layers for _, gl in lg.items() for g in gl.gates()]
    all_p = torch.cat([g.p_open() for g in gates])
    assert penalty_paper(m).item() == pytest.approx(all_p.mean().item())
    # code form: per gated linear 0.5 (|mean_r - keep| + |mean_c - keep|), averaged over linears
    keep = 0.6
    per = [0.5 * (abs(gl.row_gate.p_open().mean().item() - keep) + abs(gl.col_gate.p_open().mean().item() - keep))
           for lg in layers for _, gl in lg.items()]
    assert penalty_code(m, 0.4).item() == pytest.approx(sum(per) / len(per), rel=1e-5)
    penalty_paper(m).backward()
    # lowering P(open) lowers the penalty: gradient on theta is positive everywhere
    assert all(torch.all(g.theta.grad > 0) for g in gates)


def test_code_penalty_has_one_sign_for_any_target_until_reached():
    m = _tiny_bert()
    apply_gates(m, layout="independent")
    grads = []
    for t in (0.2, 0.4):
        m.zero_grad()
        penalty_code(m, t).backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in m.named_parameters() if "theta" in n]))
    assert torch.allclose(grads[0], grads[1])


def test_expected_sparsity_bounds_and_controller():
    m = _tiny_bert()
    apply_gates(m, layout="coupled")
    s0 = expected_sparsity(m).item()
    assert 0 < s0 < 0.2  # all gates open: P(open) ~ 0.99
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "theta" in n:
                p.fill_(-5.0)
    # P(open) floors at Phi(-1) = 0.159: QK dims need Q and K open (P^2), V/O and FFN one gate (P)
    p = norm.cdf(-1.0)
    h, inter = 16, 32
    kept = 2 * h * (h * p * p + h * p) + 2 * h * inter * p
    assert expected_sparsity(m).item() == pytest.approx(1 - kept / (4 * h * h + 2 * h * inter), rel=1e-4)
    c = SparsityController(target=0.4, warmup_steps=10)
    assert c.current_target(0) == 0 and c.current_target(5) == pytest.approx(0.2) and c.current_target(50) == 0.4
    assert gate_sparsity(m) == 1.0


def test_freezing_and_trainable_counts():
    m = _tiny_bert()
    total_before, _ = count_parameters(m)
    layers = apply_gates(m, layout="independent", rank=2)
    h, inter, L = 16, 32, 2
    gates = L * (4 * 2 * h + 2 * (h + inter))
    lora = L * (4 * 2 * (h + h) + 2 * 2 * (h + inter))
    biases = L * (3 * h + h + inter + h)
    head = (h * h + h) + (2 * h + 2)  # pooler + classifier
    _, trainable = count_parameters(m)
    assert trainable == gates + lora + biases + head
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert not any("embeddings" in n or n.endswith(".weight") and "layer." in n and "lora" not in n for n in names)
    assert len(layers) == 2
    coupled = _tiny_bert()
    apply_gates(coupled, layout="coupled", train_bias=False)
    assert count_parameters(coupled)[1] == L * (3 * h + inter) + head


def test_pin_to_target_closes_the_least_open_units_up_to_the_target_and_never_reopens():
    from finegates.gated_model import all_gates, closure_sparsity, pin_to_target, structural_sparsity

    torch.manual_seed(0)
    m = _tiny_bert()
    apply_gates(m, layout="coupled")
    with torch.no_grad():
        for g in all_gates(m):
            g.theta.uniform_(-0.4, 1.0)
        all_gates(m)[0].theta[:3] = -2.0  # already closed
    mus_before = torch.cat([g.mu for g in all_gates(m)])
    threshold = pin_to_target(m, 0.4)
    closed = torch.cat([g.closed() for g in all_gates(m)])
    removed = float(structural_sparsity(m, lambda g: (~g.closed()).float()))
    assert removed >= 0.4 and closure_sparsity(m, -0.5) == removed
    # minimal: the units closed are exactly those at or below the threshold, the closed ones stay closed
    assert torch.equal(closed, mus_before <= threshold)
    assert closed[:3].all() and all(g.pinned for g in all_gates(m))
    # a lower target than what is closed already closes nothing more
    m2 = _tiny_bert()
    apply_gates(m2)
    with torch.no_grad():
        all_gates(m2)[0].theta[:] = -2.0
    before = torch.cat([g.closed() for g in all_gates(m2)])
    pin_to_target(m2, 0.0)
    assert torch.equal(torch.cat([g.closed() for g in all_gates(m2)]), before)


@pytest.mark.parametrize("layout", ["coupled", "independent"])
@pytest.mark.parametrize("closed_mean", [0.2, -0.6])  # gates that closed less than the target, or more
def test_aligned_pin_exports_the_target_without_padding(layout, closed_mean):
    """With ``align`` the pinned structure is the one the aligned exporter writes: its exported sparsity is
    what the gates remove (no padding lost) and it is the target within one width step, whether the gates
    had closed less than the target (the least open are closed) or more (the least closed are reopened)."""
    from transformers import BertConfig, BertForSequenceClassification

    from finegates.export import build_compressed
    from finegates.gated_model import all_gates, pin_to_target, structural_sparsity
    from finegates.gates import PINNED_OPEN_MIN

    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=2)
    m = BertForSequenceClassification(cfg).eval()
    apply_gates(m, layout=layout)
    with torch.no_grad():
        for g in all_gates(m):
            g.theta.copy_(torch.randn_like(g.theta) * 0.6 + closed_mean)
    closed_before = torch.cat([g.closed() for g in all_gates(m)])
    removed_before = float(structural_sparsity(m, lambda g: (~g.closed()).float()))
    pin_to_target(m, 0.4, align=8)
    _, stats = build_compressed(m, align=8)
    gates_removed = float(structural_sparsity(m, lambda g: (~g.closed()).float()))
    assert stats.sparsity == pytest.approx(gates_removed, abs=1e-9)
    # one head width step of one layer (8 Q/K and 8 V/O dims in 4 heads, each 2 * 64 weights): the target is
    # met within a step
    step = 2 * 8 * 4 * 2 * 64 / (2 * (4 * 64 * 64 + 2 * 64 * 128))
    assert 0.4 <= stats.sparsity <= 0.4 + step
    closed_after = torch.cat([g.closed() for g in all_gates(m)])
    reopened = closed_before & ~closed_after
    # units come back gently (eval gate 0.05, recovery trains them), and only when the gates closed too many
    z = torch.cat([g.eval_values() for g in all_gates(m)])
    assert torch.allclose(z[reopened], torch.full_like(z[reopened], PINNED_OPEN_MIN), atol=1e-4)
    assert bool(reopened.any()) == (removed_before > 0.4 + step)


def test_speedup_spread_comes_from_interleaved_rounds():
    from finegates.latency import speedup_stats

    st = speedup_stats(dense=[10.0, 12.0, 11.0, 30.0], exported=[5.0, 6.0, 11.0, 10.0])
    assert st["latency_ms"] == 8.0 and st["dense_latency_ms"] == 11.5
    assert st["speedup"] == 2.0  # ratios 2, 2, 1, 3: median 2
    assert st["speedup_q25"] <= 2.0 <= st["speedup_q75"] and st["speedup_q25"] < st["speedup_q75"]
    two = speedup_stats(dense=[10.0, 12.0], exported=[5.0, 20.0])  # ratios 2 and 0.6: no extrapolation
    assert 0.6 <= two["speedup_q25"] <= two["speedup"] <= two["speedup_q75"] <= 2.0


@pytest.mark.parametrize("schedule", ["gradual", "at-pin"])
def test_the_gradual_schedule_closes_what_the_gates_have_not_least_open_first(schedule):
    """Gates that do not move (no optimiser here): with the gradual schedule the closed fraction follows a line
    from 0 at the end of the warmup to the target at the pin, closing the least open units first and never
    reopening one; with at-pin nothing closes before the pin, and the pin closes it all."""
    from finegates.config import TrainConfig
    from finegates.gated_model import closure_sparsity
    from finegates.methods import get_method

    torch.manual_seed(0)
    m = _tiny_bert()
    method = get_method("finegates")
    method.prepare(m, TrainConfig(target_sparsity=0.5, warmup_frac=0.2, recovery_frac=0.5,
                                  close_schedule=schedule), 20)  # 20 steps: warmup to step 4, the pin at 10
    with torch.no_grad():
        for g in all_gates(m):
            g.theta.uniform_(-0.4, 1.0)
    mus = torch.cat([g.mu for g in all_gates(m)]).detach()
    closed_before = torch.zeros_like(mus, dtype=torch.bool)
    for step in range(10):
        method.regularizer(m, step)
        method.after_step()
        closed = torch.cat([g.closed() for g in all_gates(m)])
        removed = closure_sparsity(m, -0.5)
        if schedule == "at-pin":
            assert not closed.any()
            continue
        line = 0.5 * max(0, step + 1 - 4) / 6
        assert line <= removed <= line + 32 / 4096  # on the line, and at most one unit (2 x 16 weights) above it
        assert closed.any() == (step + 1 > 4)  # the gates alone choose during the warmup
        assert closed[closed_before].all()  # nothing reopens
        assert not closed.any() or mus[closed].max() < mus[~closed].min()  # the least open close first
        closed_before = closed
    if schedule == "gradual":  # by the pin: the target (the loop's last line), all of it closed by the schedule
        assert removed >= 0.5 and method.metrics(m)["schedule_closed"] == pytest.approx(removed)
    method.regularizer(m, 10)  # the pin
    assert all(g.pinned for g in all_gates(m)) and closure_sparsity(m, -0.5) >= 0.5


@pytest.mark.parametrize("reset", ["none", "crossing"])
def test_a_restarted_multiplier_holds_the_gates_near_the_target_after_a_lagging_ramp(reset):
    """The gates follow the controller alone (no task loss, no schedule, no pin). They lag behind the ramp, so l1
    sums that lag; without a restart it then holds them far past the target (integral wind-up). With
    ``dual_reset="crossing"`` l1 and its optimiser state restart from 0 each time the expected sparsity crosses the
    target, and the gates stay near it."""
    from finegates.config import TrainConfig
    from finegates.methods import get_method

    torch.manual_seed(0)
    m = _tiny_bert()
    method = get_method("finegates")
    cfg = TrainConfig(target_sparsity=0.4, warmup_frac=0.3, recovery_frac=0.0, close_schedule="at-pin",
                      dual_reset=reset, dual_lr=0.15)  # the lr of sessions 4-16, at which the gates lag the ramp here
    method.prepare(m, cfg, 120)
    opt = torch.optim.AdamW(method.param_groups(m, cfg)[:1])  # the gates' group, at the gate lr
    path = []
    for step in range(120):
        resets = method.dual_resets
        method.regularizer(m, step).backward()
        opt.step()
        opt.zero_grad()
        method.after_step()
        if method.dual_resets > resets:  # restarted after this step's multiplier update
            assert float(method.controller.l1.detach()) == 0.0 and method.controller.l1 not in method.dual_opt.state
        path.append(float(expected_sparsity(m).detach()))
    after_ramp = path[36:]
    if reset == "none":
        assert method.dual_resets == 0 and "dual_resets" not in method.metrics(m)
        assert max(after_ramp) > 0.7  # wind-up: the gates are held near twice the target
    else:
        assert method.metrics(m)["dual_resets"] == method.dual_resets >= 2
        assert max(after_ramp) < 0.55  # past the target by less than 0.15
        assert abs(sum(path[-40:]) / 40 - 0.4) < 0.05  # and around it at the end


def test_no_recovery_means_no_early_recovery_either():
    """``recovery_frac=0`` (no recovery) with the default ``max_recovery_frac``: the gates that reach the target are
    never pinned, and the penalty runs to the last step."""
    from finegates.config import TrainConfig
    from finegates.methods import get_method

    torch.manual_seed(0)
    m = _tiny_bert()
    method = get_method("finegates")
    cfg = TrainConfig(target_sparsity=0.4, warmup_frac=0.3, recovery_frac=0.0)
    assert cfg.max_recovery_frac is not None
    method.prepare(m, cfg, 60)
    opt = torch.optim.AdamW(method.param_groups(m, cfg)[:1])
    for step in range(60):
        reg = method.regularizer(m, step)
        assert reg is not None
        reg.backward()
        opt.step()
        opt.zero_grad()
        method.after_step()
    assert float(expected_sparsity(m).detach()) >= 0.3  # the gates got to the target's neighbourhood ...
    assert method.pinned_at is None and method.recovery_start is None  # ... and were never pinned


def test_the_aligned_schedule_closes_into_the_structure_the_pin_exports():
    """With the aligned schedule the closed units follow the line as the aligned exporter counts them (per layer one
    head width, widths in multiples of 8), never reopening one, so the pin changes few units; the gradual schedule
    closes the least open units wherever they are, and its pin moves many more (it reshapes heads to one width)."""
    from transformers import BertConfig, BertForSequenceClassification

    from finegates.config import TrainConfig
    from finegates.export import build_compressed
    from finegates.methods import get_method

    def run(schedule):
        torch.manual_seed(0)
        m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128)).eval()
        method = get_method("finegates")
        method.prepare(m, TrainConfig(target_sparsity=0.5, warmup_frac=0.2, recovery_frac=0.5,
                                      close_schedule=schedule), 40)  # warmup to step 8, the pin at 20
        with torch.no_grad():
            for g in all_gates(m):
                g.theta.uniform_(-0.2, 1.0)  # all open, in no aligned order
        closed_before = torch.zeros(sum(g.theta.numel() for g in all_gates(m)), dtype=torch.bool)
        for step in range(20):
            method.regularizer(m, step)
            method.after_step()
            closed = torch.cat([g.closed() for g in all_gates(m)])
            assert closed[closed_before].all()  # nothing reopens before the pin
            closed_before = closed
            if schedule == "aligned":
                line = 0.5 * max(0, step + 1 - 8) / 12
                exported = build_compressed(m, align=8)[1].sparsity
                assert line - 0.005 - 0.07 <= exported  # the last plan's line, within one width step of the export
        method.regularizer(m, 20)  # the pin
        moved = int((torch.cat([g.closed() for g in all_gates(m)]) != closed_before).sum())
        return moved, build_compressed(m, align=8)[1].sparsity

    aligned, gradual = run("aligned"), run("gradual")
    assert 0.5 <= aligned[1] < 0.57 and 0.5 <= gradual[1] < 0.57  # both export the target
    assert aligned[0] < gradual[0] / 4, (aligned, gradual)


def _gated_tiny_bert(layout="independent"):
    m = _tiny_bert()
    apply_gates(m, layout=layout)
    with torch.no_grad():
        for g in all_gates(m):
            g.theta.copy_(torch.randn_like(g.theta))  # gates open, fractional and closed
    return m


def test_batched_gate_values_follow_the_law_of_the_one_by_one_values():
    torch.manual_seed(0)
    m = _gated_tiny_bert()
    gates = all_gates(m)
    gates[0].pin()  # a pinned gate's closed units stay exactly 0 in the batch too
    m.eval()
    values = gate_values(gates)
    for i, g in enumerate(gates):
        assert torch.equal(values.get(i), g())
    m.train()
    torch.manual_seed(3)
    batched = gate_values(gates).flat
    torch.manual_seed(3)
    mu = torch.tanh(torch.cat([g.theta for g in gates]))
    expect = torch.clamp(mu + 0.5 + 0.1 * torch.randn_like(mu), 0, 1)
    expect[: gates[0].theta.numel()].masked_fill_(gates[0].pinned_closed, 0.0)
    assert torch.allclose(batched, expect, atol=1e-6)
    assert not torch.equal(batched, gate_values(gates).flat)  # a fresh draw per evaluation
    for g, p in zip(gates, p_open_all(gates)):
        assert torch.allclose(p, g.p_open(), atol=1e-7)
    values = gate_values(gates)  # one cast for all gates, made when a first gate asks for the dtype
    halves = [values.get(i, torch.bfloat16) for i in range(len(values))]
    assert [z.dtype for z in halves] == [torch.bfloat16] * len(gates)
    assert len({z.untyped_storage().data_ptr() for z in halves}) == 1
    assert torch.equal(torch.cat(halves), values.flat.to(torch.bfloat16))


def test_compacted_gates_return_their_kept_units_batched_or_one_by_one():
    """A gate whose linear is compacted returns the units it computes (Gate.index); a batched evaluation
    gathers all of them in one op, with the same values, and the full-width views stay full."""
    torch.manual_seed(0)
    m = _gated_tiny_bert()
    gates = all_gates(m)
    for g in gates:
        g.pin()
    m.eval()
    full = [g() for g in gates]
    gates[0].index = torch.tensor([3, 0, 5])
    gates[2].index = torch.tensor([1])
    values = gate_values(gates)
    assert len(values.flat) == sum(g.width for g in gates) == sum(len(z) for z in full) - (gates[0].theta.numel() - 3) \
        - (gates[2].theta.numel() - 1)
    for i, g in enumerate(gates):
        expect = full[i] if g.index is None else full[i][g.index]
        assert torch.equal(values.get(i), expect) and torch.equal(g(), expect)
    assert _count(lambda: gate_values(gates), "aten.index") == 1
    assert gates[0].eval_values().numel() == gates[0].theta.numel()  # what export folds: every unit


def _count(fn, op: str) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += str(func.overloadpacket) == op
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_a_forward_evaluates_all_gates_in_one_chain_and_forgets_them_after():
    torch.manual_seed(0)
    m = _gated_tiny_bert().train()
    x = torch.randint(0, 50, (2, 8))
    # clamp appears only in the gates: one for all of them (one by one it would be one per gate)
    assert _count(lambda: m(input_ids=x).logits.sum().backward(), "aten.clamp") == 1
    assert all(g.batched is None for g in all_gates(m))
    assert sum(int(g.theta.grad.abs().sum() > 0) for g in all_gates(m)) == len(all_gates(m))  # the task reaches every gate
    m.eval()
    with torch.no_grad():
        a = m(input_ids=x).logits
        b = m.forward(input_ids=x).logits  # no hooks: each gate evaluated on its own
    assert torch.equal(a, b)
    with pytest.raises(Exception):
        m(input_ids=torch.full((2, 8), 10_000))  # out of the vocabulary: the forward fails midway
    assert all(g.batched is None for g in all_gates(m))  # and the gate values are not left behind
    assert _count(lambda: expected_sparsity(m), "aten.erf") == 1


def test_training_with_batched_gates_is_training_with_gates_one_by_one():
    """Dropout off, so only the gates draw: the one noise draw of the batched pass is the same numbers as
    the per-gate draws, and 12 steps (controller, pin at step 8, LoRA inside) end bit-identical."""
    from transformers import BertConfig, BertForSequenceClassification

    from finegates import TrainConfig, get_method

    def train(batched: bool):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        tc = TrainConfig(method="finegates", target_sparsity=0.4, teacher="none", rank=4, warmup_frac=0.3)
        method = get_method("finegates")
        model = method.prepare(BertForSequenceClassification(cfg), tc, 12)
        opt = torch.optim.AdamW(method.param_groups(model, tc))
        x, y = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 1, 0])
        for step in range(12):
            out = model(input_ids=x, labels=y) if batched else model.forward(input_ids=x, labels=y)  # forward: no hooks
            reg = method.regularizer(model, step)
            (out.loss if reg is None else out.loss + reg).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.after_step()
        return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])

    assert torch.equal(train(batched=True), train(batched=False))


def _casts(fn) -> list[torch.Tensor]:
    """The tensors that ``fn`` casts (the inputs of ``aten._to_copy``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[torch.Tensor] = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) == "aten._to_copy":
                seen.append(args[0])
            return func(*args, **(kwargs or {}))

    with Casts():
        fn()
    return seen


@pytest.mark.parametrize("layout", ["coupled", "independent"])
def test_under_autocast_no_gated_parameter_is_cast_one_by_one(layout):
    """On a GPU a step is bound by the ops it launches. Under autocast a gated linear's frozen weight is cast
    once and kept, the gated biases and LoRA factors are cast in one op for the whole model, not one per
    linear, and the hidden states that Q, K and V read are cast once for the three; the logits are those of
    casting each on its own, the gradients equal within bf16 rounding, and a weight loaded anew is cast anew."""
    torch.manual_seed(0)
    m = _tiny_bert()
    apply_gates(m, layout=layout, rank=2)
    linears = [gl for lg in m.finegates_layers for _, gl in lg.items()]
    with torch.no_grad():
        for gl in linears:
            gl.bias.normal_()
            gl.lora_B.normal_()
            for g in gl.gates():
                g.theta.copy_(torch.randn_like(g.theta))
    m.eval()  # deterministic gates: the hooked and the plain forward compute the same function
    x = torch.randint(0, 50, (2, 8))
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.inference_mode(), amp():
        m(input_ids=x)  # the first forward makes the weights' copies (under inference mode: still usable to train)
    own = {p.data_ptr() for gl in linears for p in (gl.weight, gl.bias, gl.lora_A, gl.lora_B)}

    def run(forward, casts=None):
        m.zero_grad()
        with amp():
            out = []
            cast = _casts(lambda: out.append(forward(input_ids=x).logits))
        out[0].float().square().sum().backward()
        if casts is not None:
            casts += cast
        return out[0].detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    cast: list[torch.Tensor] = []
    logits, grads = run(m, cast)
    assert not {t.data_ptr() for t in cast} & own
    hidden_in = [t for t in cast if t.dtype == torch.float32 and t.shape == (2, 8, m.config.hidden_size)]
    if layout == "coupled":  # per layer: the attention's input (for Q, K, V and their LoRA) and the FFN's, once each
        assert len(hidden_in) == 2 * m.config.num_hidden_layers
    logits_plain, grads_plain = run(m.forward)  # m.forward: no hooks, every linear casts what it uses
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, logits_plain)
    assert grads.keys() == grads_plain.keys()
    for k in grads:
        scale = grads_plain[k].abs().max().item()
        assert (grads[k] - grads_plain[k]).abs().max().item() <= 0.05 * scale + 1e-6, k  # bf16: ~2^-8 a rounding

    for assign in (False, True):
        other = _tiny_bert()
        apply_gates(other, layout=layout, rank=2)
        with torch.no_grad():
            other.load_state_dict(m.state_dict())
            for gl in [gl for lg in other.finegates_layers for _, gl in lg.items()]:
                gl.weight.mul_(1.5)
            m.load_state_dict(other.state_dict(), assign=assign)
        other.eval()
        with torch.no_grad(), amp():
            assert torch.equal(m(input_ids=x).logits, other(input_ids=x).logits)
            assert not torch.equal(m(input_ids=x).logits, logits)
        logits = m(input_ids=x).logits


@pytest.mark.parametrize("layout", ["coupled", "independent"])
def test_expected_sparsity_of_alike_layers_is_computed_for_all_layers_at_once(layout):
    """The controller's penalty runs every step: layers alike are stacked, so it costs a few ops whatever the
    depth, and it is the sum over layers one by one (the family's generic path), gradient included."""
    from finegates.arch import Family
    from finegates.gated_model import family_of, gated_layers

    torch.manual_seed(0)
    m = _gated_tiny_bert(layout)
    fam, lgs = family_of(m), gated_layers(m)
    p = {id(g): g.p_open() for g in all_gates(m)}
    kept, total = fam.layers_kept(lgs, lambda g: p[id(g)])
    kept_loop, total_loop = Family.layers_kept(fam, lgs, lambda g: p[id(g)])
    assert total == total_loop and kept.item() == pytest.approx(kept_loop.item(), rel=1e-6)
    thetas = [g.theta for g in all_gates(m)]  # (residual-side gates of the paper layout remove nothing: no gradient)
    g_stacked = torch.autograd.grad(kept, thetas, retain_graph=True, allow_unused=True)
    g_loop = torch.autograd.grad(kept_loop, thetas, allow_unused=True)
    assert [a is None for a in g_stacked] == [b is None for b in g_loop] != [True] * len(thetas)
    assert all(a is None or torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g_stacked, g_loop))
    sums = {"coupled": 3, "independent": 3}[layout]  # one per pair of gates (Q/K, V/O, FFN), not one per layer
    assert _count(lambda: expected_sparsity(m), "aten.sum") == sums


@pytest.mark.parametrize("max_recovery,gates_train,earliest", [
    (None, True, None),  # no early recovery: the pin is fixed
    (0.1, True, 108),    # at most recovery_frac (0.2): the window would open after the fixed pin (96)
    (0.6, True, 48),     # the window opens at 40% of the steps; the gates reach the target after it opens
    (0.9, True, 36),     # a window that would open before the target's ramp is over opens when it is over
    (0.6, False, 48),    # gates that never reach the target are pinned at the fixed step
])
def test_an_early_recovery_starts_when_the_gates_reach_the_target(max_recovery, gates_train, earliest):
    """``max_recovery_frac``: the recovery starts at the first step from the earliest pin (40% of the steps here, and
    never before the ramp is over) at which the gates' expected sparsity has reached the target; gates that never
    reach it are pinned at the fixed step (1 - recovery_frac), as without the option. The gates follow the
    controller alone (no task loss)."""
    from finegates.config import TrainConfig
    from finegates.methods import get_method

    torch.manual_seed(0)
    m = _tiny_bert()
    method = get_method("finegates")
    cfg = TrainConfig(target_sparsity=0.4, warmup_frac=0.3, recovery_frac=0.2, max_recovery_frac=max_recovery,
                      close_schedule="at-pin", recovery_lr="linear")
    method.prepare(m, cfg, 120)  # the ramp ends at step 36; the pin comes at step 96, or from `earliest` on
    assert method.earliest_pin == earliest
    early = earliest is not None and earliest < 96 and gates_train
    opt = torch.optim.AdamW(method.param_groups(m, cfg)[:1])  # the gates' group, at the gate lr
    reached = None  # the first step from the earliest pin on that starts with the expected sparsity at the target
    for step in range(120):
        s = float(expected_sparsity(m).detach())
        if reached is None and early and step >= earliest and s >= 0.4:
            reached = step
        reg = method.regularizer(m, step)
        if reg is not None and gates_train:
            reg.backward()
            opt.step()
            opt.zero_grad()
        method.after_step()
        if method.pinned_at is not None:
            assert reg is None  # no penalty in the recovery
    pinned = method.metrics(m)["pinned_at_step"]
    if not early:
        assert pinned == method.recovery_start == 96
    else:
        assert reached is not None and earliest <= reached < 96
        if max_recovery == 0.6:
            assert earliest < reached  # the window opened before the gates were done: it waited for them
        assert pinned == method.recovery_start == reached
        assert method.expected_at_pin >= 0.4
    assert method.lr_factor(pinned) == 1.0 and method.lr_factor(119) == pytest.approx(1 / (120 - pinned))
