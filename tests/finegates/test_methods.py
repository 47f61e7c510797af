"""Every method behind the same interface: parameter counts, init equivalence, learning, exact export."""
import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from finegates import TrainConfig, build_compressed, count_parameters, get_method
from finegates.methods import METHOD_NAMES

H, I, L, V = 16, 32, 2, 60  # hidden, FFN, layers, vocab of the tiny model
HEAD = (H * H + H) + (2 * H + 2)  # pooler + classifier


def tiny():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=2, intermediate_size=I,
                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def batch(n=4, length=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1] * (n // 2))}


def expected_trainable(name: str) -> int:
    lin = {"q": (H, H), "k": (H, H), "v": (H, H), "o": (H, H), "up": (H, I), "down": (I, H)}  # (in, out)
    bias_out = sum(o for _, o in lin.values())
    if name == "finegates":  # coupled: row gates of q, k, v, up; + the six biases
        return L * (3 * H + I + bias_out) + HEAD
    if name == "finegates-lora":  # + LoRA r=8 on all six: r * (in + out)
        return L * (3 * H + I + bias_out + sum(8 * (i + o) for i, o in lin.values())) + HEAD
    if name == "lora":  # peft r=8 on query and value
        return L * 2 * 8 * (H + H) + HEAD
    if name == "gift-sw":  # k = 4 salient columns of every linear: out * k
        return L * sum(o * 4 for _, o in lin.values()) + HEAD
    if name == "sparta":  # density 0.25 of each of W_v and W_o (scope "targets")
        return L * 2 * round(0.25 * H * H) + HEAD
    if name == "propulsion":  # one z per output of each linear, and its bias (the official code trains both)
        return L * 2 * bias_out + HEAD
    if name == "bitfit":  # every bias: the six linears, two LayerNorms per layer, the embeddings' LayerNorm
        return L * (bias_out + 2 * H) + H + HEAD
    if name == "full":
        return sum(p.numel() for p in tiny().parameters())
    raise AssertionError(name)


EXTRA = {"gift-sw": {"k": 4}, "sparta": {"density": 0.25, "scope": "targets"}}


def prepared(name: str, model=None):
    model = model if model is not None else tiny()
    cfg = TrainConfig(method=name, extra=EXTRA.get(name, {}), lr=1e-3)
    method = get_method(name)
    calib = [{k: v for k, v in batch().items()}]
    return method.prepare(model, cfg, 10, calib), method, cfg


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_trainable_count_from_formula(name):
    model, _, _ = prepared(name)
    assert count_parameters(model)[1] == expected_trainable(name)


def test_sparta_density_counts_the_whole_base_model_by_default():
    """The official code's count: density x the base model's parameters (embeddings in, head out), placed in
    W_v and W_o at the same fraction of each."""
    model = tiny()
    base = sum(p.numel() for p in model.bert.parameters())
    fraction = 0.05 * base / (L * 2 * H * H)
    prepared_model = get_method("sparta").prepare(model, TrainConfig(method="sparta", extra={"density": 0.05}), 10)
    deltas = count_parameters(prepared_model)[1] - HEAD
    assert deltas == L * 2 * round(fraction * H * H)
    assert abs(deltas - 0.05 * base) <= L * 2  # one rounding per matrix
    assert 0.05 * H * H < fraction * H * H  # more than 5% of each target: the embeddings count too


def test_finegates_lora_slots_put_lora_inside_the_named_gates_only():
    from finegates.gated_model import gated_layers

    model = get_method("finegates-lora").prepare(tiny(), TrainConfig(method="finegates-lora",
                                                                     extra={"lora_slots": ["q", "v"]}), 10)
    ranks = {s: gl.rank for s, gl in gated_layers(model)[0].items()}
    assert ranks == {"q": 8, "k": 0, "v": 8, "o": 0, "up": 0, "down": 0}
    lora_qv = L * 2 * 8 * (H + H)  # r * (in + out) on q and v: what peft LoRA trains there
    assert count_parameters(model)[1] == expected_trainable("finegates") + lora_qv


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_head_lr_gives_every_method_the_same_head_policy(name):
    from finegates.train import with_head_lr

    model, method, cfg = prepared(name)
    groups = with_head_lr(method.param_groups(model, cfg), model, ["classifier", "pooler"], 3e-4, 0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    head = groups[-1]
    assert head["lr"] == 3e-4 and sum(p.numel() for p in head["params"]) == HEAD  # pooler + classifier, once
    assert all(g["lr"] != 3e-4 for g in groups[:-1])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_at_init_the_model_computes_the_base_logits(name):
    base = tiny()
    x = {k: v for k, v in batch().items() if k != "labels"}
    ref = base(**x).logits
    model, _, _ = prepared(name, copy.deepcopy(base))
    model.eval()
    assert torch.allclose(model(**x).logits, ref, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_training_lowers_the_loss_and_export_reproduces_eval_logits(name, glue_dir, tokenizer, minilm_dir):
    from torch.utils.data import DataLoader

    from finegates.train import _collator, load_base
    from tasks import get_task, load_task_data

    torch.manual_seed(0)
    task = get_task("sst2")
    data = load_task_data(task, tokenizer, data_dir=glue_dir, max_train=16, max_eval=8, seed=0, max_length=48)
    b = next(iter(DataLoader(data.train, batch_size=16, collate_fn=_collator(tokenizer))))
    _, model = load_base(minilm_dir, 2, task.label_names)
    method = get_method(name)
    cfg = TrainConfig(method=name, lr=1e-4 if name == "full" else 3e-3, lam=0.0, extra=EXTRA.get(name, {}))
    model = method.prepare(model, cfg, 10, [b])
    opt = torch.optim.AdamW(method.param_groups(model, cfg))
    model.train()
    losses = []
    for step in range(6):
        loss = model(**b).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        method.after_step()
    model.eval()
    with torch.no_grad():
        eval_loss = model(**b).loss.item()
    assert eval_loss < losses[0], (losses, eval_loss)
    x = {k: v for k, v in b.items() if k != "labels"}
    trained = method.exportable(model).eval()
    with torch.no_grad():
        ref = trained(**x).logits
        small, stats = build_compressed(trained)
        assert (small(**x).logits - ref).abs().max().item() <= 1e-4
    if not method.prunes:
        assert stats.sparsity == 0.0


def test_gift_sw_noise_only_in_training_and_only_on_frozen_columns():
    from finegates.baselines import GiftLinear, quant_clip_scale

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    g = GiftLinear(lin, torch.tensor([1, 5]))
    g.eval()
    assert torch.equal(g._weight(), lin.weight)
    g.train()
    w = g._weight()
    assert torch.equal(w[:, [1, 5]], lin.weight[:, [1, 5]])
    assert not torch.equal(w[:, 0], lin.weight[:, 0])
    # alpha minimises the 4-bit error among p * max|w|, p = 1.00 ... 0.01
    alpha = quant_clip_scale(lin.weight.detach())
    assert torch.all(alpha <= lin.weight.abs().amax(1) + 1e-7) and torch.all(alpha > 0)


def test_the_optimiser_is_fused_and_makes_adamws_update():
    """``adamw`` (what finegates.train, the dual optimiser and the benchmarks build) fuses each tensor's update into
    one kernel; the update is torch's AdamW's, groups, weight decay and ``maximize`` included, up to rounding."""
    from finegates.methods.base import adamw

    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7), torch.randn(2)]
    runs = []
    for make in (adamw, torch.optim.AdamW):
        ps = [t.clone().requires_grad_() for t in start]
        groups = [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.1},
                  {"params": ps[2:], "lr": 3e-2, "weight_decay": 0.0}]
        opt = make(groups, maximize=True)
        for step in range(5):
            for i, p in enumerate(ps):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step + 10 * i).view_as(p)
            opt.step()
        runs.append((opt, [p.detach() for p in ps]))
    (fused, got), (plain, want) = runs
    assert fused.param_groups[0]["fused"] and not plain.param_groups[0]["fused"]
    for g, w, s in zip(got, want, start):
        assert not torch.equal(g, s)  # it moved
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
