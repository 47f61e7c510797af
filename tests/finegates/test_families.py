"""Every model family (finegates/arch) on tiny random configs: gated, exported exactly, loaded both ways.

Adding a family = one entry in ``TINY`` (a tiny random ``*ForSequenceClassification``)."""
import json

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          LlamaConfig, LlamaForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from finegates import apply_gates, build_compressed, load_compressed, save_compressed
from finegates.arch import UnsupportedModelError, get_family, supported_model_types
from finegates.gated_model import (all_gates, compact, expected_sparsity, gated_layers, pin_to_target,
                                   structural_sparsity, uncompact)
from tests.finegates._gating import randomize_gates

KW = dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
          num_labels=3, max_position_embeddings=80)
TINY = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**KW)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **KW)),
    "llama-mha": lambda: LlamaForSequenceClassification(LlamaConfig(num_key_value_heads=4, pad_token_id=0, **KW)),
    "llama-gqa": lambda: LlamaForSequenceClassification(LlamaConfig(num_key_value_heads=2, pad_token_id=0, **KW)),
    "llama-mqa": lambda: LlamaForSequenceClassification(LlamaConfig(num_key_value_heads=1, pad_token_id=0,
                                                                    attention_bias=True, mlp_bias=True, **KW)),
}


def tiny(name: str, seed: int, layout: str = "coupled", closed_frac: float = 0.5):
    torch.manual_seed(seed)
    m = TINY[name]()
    apply_gates(m, layout=layout, rank=2)
    return randomize_gates(m, closed_frac)


def inputs(pad_id: int, side: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (4, 17), generator=g)
    mask = torch.ones_like(ids)
    if side == "right":
        mask[1, 11:], mask[3, 5:] = 0, 0
    elif side == "left":
        mask[1, :6], mask[3, :12] = 0, 0
    ids[mask == 0] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def sides(name: str) -> list[str]:
    return ["right", "left", "none"] if name.startswith("llama") else ["right", "none"]  # encoders: right-padded


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("layout", ["coupled", "independent"])
def test_export_reproduces_gated_logits(name, layout):
    seed = 1 if layout == "coupled" else 2
    m = tiny(name, seed, layout)
    for align in (1, 8):
        small, stats = build_compressed(m, align=align)
        for side in sides(name):
            x = inputs(m.config.pad_token_id, side, seed)
            assert (small(**x).logits - m(**x).logits).abs().max().item() <= 1e-4, (align, side)
        assert 0 < stats.sparsity < 1
        assert stats.sparsity <= stats.sparsity_minimal + 1e-12


@pytest.mark.parametrize("name", list(TINY))
def test_a_dense_export_loads_back_into_the_hf_model(name):
    """--teacher-init: the teacher's export, copied into a fresh pretrained-shape model, is the teacher."""
    torch.manual_seed(3)
    teacher = TINY[name]().eval()
    exported, stats = build_compressed(teacher)
    assert stats.sparsity == 0
    torch.manual_seed(4)
    student = TINY[name]().eval()  # other weights
    x = inputs(student.config.pad_token_id, "right")
    assert (student(**x).logits - teacher(**x).logits).abs().max().item() > 1e-2
    get_family(student).load_exported(student, exported)
    assert (student(**x).logits - teacher(**x).logits).abs().max().item() <= 1e-5
    # every parameter came across (the head and the norms too, not just the gated linears)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("name", ["bert", "llama-gqa"])
def test_a_pruned_export_is_refused_and_nothing_is_copied(name):
    exported, _ = build_compressed(tiny(name, 5))  # half the units closed
    torch.manual_seed(6)
    student = TINY[name]()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match="only an export that removed nothing"):
        get_family(student).load_exported(student, exported)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa"])
def test_llama_whole_kv_groups_heads_and_ffn_can_go(name):
    m = tiny(name, 3, closed_frac=0.0)
    H, Hkv, d = gated_layers(m)[0].meta["shape"]
    G = H // Hkv
    layers = m.model.layers
    with torch.no_grad():
        layers[0].self_attn.v_proj.row_gate.theta.fill_(-3.0)  # every V row: no head left in layer 0
        layers[0].mlp.up_proj.row_gate.theta.fill_(-3.0)  # every SwiGLU neuron
        layers[1].self_attn.v_proj.row_gate.theta[:d] = -3.0  # kv head 0: its whole query group goes
        layers[2].self_attn.k_proj.row_gate.theta[:d] = -3.0  # K of kv head 0: its group attends uniformly
    small, _ = build_compressed(m, align=1)
    s0, s1, s2 = small.config.layers
    assert s0["num_heads"] == 0 and s0["intermediate_size"] == 0
    assert s1["num_kv_heads"] == Hkv - 1 and s1["num_heads"] == H - G
    assert s2["num_heads"] == H and s2["num_kv_heads"] == Hkv
    for side in ("right", "left"):
        x = inputs(0, side)
        assert (small(**x).logits - m(**x).logits).abs().max().item() <= 1e-4


def test_llama_rotary_pairs_are_the_qk_unit():
    """Closing one element of a rotary pair removes nothing; closing both removes the pair's Q rows (for
    every query head of the group) and its K rows."""
    m = tiny("llama-gqa", 4, closed_frac=0.0)
    H, Hkv, d = gated_layers(m)[0].meta["shape"]
    k = m.model.layers[0].self_attn.k_proj.row_gate
    full, _ = build_compressed(m, align=1)
    with torch.no_grad():
        k.theta[0] = -3.0  # first element of pair 0 of kv head 0
    one, _ = build_compressed(m, align=1)
    assert one.config.layers[0]["qk_dim"] == full.config.layers[0]["qk_dim"] == d
    with torch.no_grad():
        k.theta[d // 2] = -3.0  # and its partner: pair 0 of kv head 0 is gone (head 1 keeps every pair)
    both, _ = build_compressed(m, align=1)
    assert both.config.layers[0]["rope_pairs"][0] == list(range(1, d // 2)) + [0]  # padded to the widest
    x = inputs(0, "left")
    assert (both(**x).logits - m(**x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(TINY))
def test_expected_sparsity_is_differentiable_and_zero_when_open(name):
    torch.manual_seed(0)
    m = TINY[name]()
    apply_gates(m, layout="coupled")
    assert float(structural_sparsity(m, lambda g: (~g.closed()).float())) == 0.0
    s = expected_sparsity(m)
    s.backward()
    assert all(g.theta.grad is not None for g in all_gates(m))


@pytest.mark.parametrize("name", ["bert", "llama-gqa"])
def test_both_loaders_on_a_saved_checkpoint(name, tmp_path):
    m = tiny(name, 5)
    small, _ = build_compressed(m)
    path = save_compressed(small, tmp_path / "ckpt", dtype="fp32")
    fam = get_family(m)
    assert (path / fam.modeling_file.name).is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForSequenceClassification"] == f"{fam.modeling_file.stem}.{fam.model_class_name}"
    a = load_compressed(path)
    b = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=True).eval()
    for side in sides(name):
        x = inputs(m.config.pad_token_id, side)
        ref = m(**x).logits
        for loaded in (a, b):
            assert (loaded(**x).logits - ref).abs().max().item() <= 1e-4, (type(loaded).__name__, side)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("layout", ["coupled", "independent"])
@pytest.mark.parametrize("align", [1, 8])
def test_compacted_recovery_computes_the_same_logits_and_gradients(name, layout, align):
    """After the pin a layer computes only its pinned-open units (gated_model.compact): the same logits and
    the same gradient on every trainable parameter as at full widths, in training mode (gate noise, dropout),
    with a whole FFN, one head's V/O and a layer's every Q/K closed and heads keeping different widths.
    Families that do not compact say so and change nothing."""
    m = tiny(name, 6, layout)
    lgs = gated_layers(m)
    with torch.no_grad():
        lgs[0].up.row_gate.theta.fill_(-3.0)
        lgs[1].v.row_gate.theta[:lgs[1].v.out_features // 4].fill_(-3.0)
        lgs[2].q.row_gate.theta.fill_(-3.0)
    pin_to_target(m, 0.4, align=align)
    m.train()
    x = inputs(m.config.pad_token_id, "right") | {"labels": torch.tensor([0, 1, 2, 1])}

    def step():
        torch.manual_seed(5)
        out = m(**x)
        m.zero_grad()
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    logits, grads = step()
    compacts = compact(m)
    assert compacts == (name in ("bert", "roberta"))
    if compacts:
        assert all(gl.compacted for lg in lgs for _, gl in lg.items())
        assert lgs[0].up.out_index.numel() == 1  # the closed FFN: one (closed, zero) unit left
    logits_c, grads_c = step()
    assert (logits_c - logits).abs().max().item() <= 1e-5
    assert grads_c.keys() == grads.keys()
    assert max((grads_c[k] - grads[k]).abs().max().item() for k in grads) <= 1e-5
    if compacts:  # the compaction state is made of buffers: it converts (and moves) with the model
        m.eval()
        with torch.no_grad():
            ref = m(**x).logits
            assert (m.double()(**x).logits.float() - ref).abs().max().item() <= 1e-5
        m.float()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # kept biases / LoRA: gathered, then cast
            half_compacted = m(**x).logits.float()
        m.train()
    uncompact(m)
    assert not any(gl.compacted for lg in lgs for _, gl in lg.items())
    assert torch.equal(step()[0], logits)
    if compacts:
        m.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            half = m(**x).logits.float()
        assert (half_compacted - half).abs().max().item() <= 0.02 * max(1.0, half.abs().max().item())


def test_compaction_needs_pinned_gates():
    m = tiny("bert", 7)
    with pytest.raises(RuntimeError, match="pinned"):
        compact(m)


def test_compressed_llama_modeling_imports_only_torch_and_transformers():
    import ast

    src = get_family("llama").modeling_file.read_text()
    roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert roots <= {"__future__", "math", "torch", "transformers"}, roots


def test_unsupported_model_type_is_one_line_naming_the_accepted_ones():
    from transformers import ElectraConfig, ElectraForSequenceClassification

    m = ElectraForSequenceClassification(ElectraConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32, embedding_size=16))
    with pytest.raises(UnsupportedModelError) as e:
        apply_gates(m)
    msg = str(e.value)
    assert "\n" not in msg and "'electra'" in msg and all(t in msg for t in supported_model_types())
    with pytest.raises(UnsupportedModelError):
        build_compressed(m)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A saved random Llama classifier (GQA) with the MiniLM tokenizer: offline, ~1 M parameters."""
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("method,teacher", [("finegates", "none"), ("lora", "none"), ("finegates", "init")])
def test_train_cli_runs_a_tiny_llama(tiny_llama_dir, glue_dir, tmp_path, capsys, method, teacher):
    from finegates.train import main

    out = tmp_path / "run"
    flags = ["--teacher", "none"] if teacher == "none" else \
        ["--teacher", "lora", "--teacher-init", "--teacher-cache", str(tmp_path / "teachers")]
    rc = main(["--model", str(tiny_llama_dir), "--task", "sst2", "--method", method, *flags,
               "--max-train", "32", "--max-eval", "32", "--max-length", "32", "--epochs", "1", "--batch-size", "8",
               "--target-sparsity", "0.3", "--threads", "1", "--latency-repeats", "1", "--latency-batch", "2",
               "--latency-length", "16", "--no-progress", "--output-dir", str(out), "--data-dir", str(glue_dir)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["export_max_abs_diff"] <= 1e-4
    assert (out / "model" / "modeling_finegates_llama.py").is_file()
    loaded = load_compressed(out / "model")
    assert type(loaded).__name__ == "FineGatesLlamaForSequenceClassification"
    if method == "finegates":
        assert res["sparsity"] > 0


def test_train_cli_refuses_an_unsupported_family_before_training(tmp_path, capsys):
    from transformers import ElectraConfig, ElectraForSequenceClassification

    from finegates.train import main

    ElectraForSequenceClassification(ElectraConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   embedding_size=16)).save_pretrained(str(tmp_path / "electra"))
    capsys.readouterr()  # the save's own progress bar is not the command's output
    assert main(["--model", str(tmp_path / "electra"), "--task", "sst2", "--no-progress",
                 "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model type 'electra' is not supported; accepted:" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("layout", ["coupled", "independent"])
def test_a_row_gate_applied_on_its_pair_changes_nothing_the_model_computes(name, layout):
    """BERT-family models apply K's row gate on Q's output (Family.row_gate_pairs: the scores are sums over dims of
    products); Llama's rotary positions mix Q's dims, so there the gates stay apart. Paired or not, a train step
    (noisy gates, dropout, the same seed) gives the same loss and the same gradients, gates' included, also with
    the structure pinned and compacted."""
    import copy

    from finegates.gated_model import separate_row_gates

    m = tiny(name, 5, layout, closed_frac=0.3)
    paired = [(lg.q.row_gate_also is lg.k.row_gate, lg.k.row_gate_elsewhere) for lg in gated_layers(m)]
    assert paired == [(not name.startswith("llama"),) * 2] * len(paired)
    other = copy.deepcopy(m)
    separate_row_gates(other)
    x = inputs(m.config.pad_token_id, "right") | {"labels": torch.tensor([0, 1, 2, 1])}
    for compacted in (False, True):
        if compacted:
            for model in (m, other):
                pin_to_target(model, None)
                compact(model)
        grads = []
        for model in (m, other):
            model.train().zero_grad()
            torch.manual_seed(11)
            loss = model(**x).loss
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
        assert len(grads[0][1]) == len(grads[1][1])
        for a, b in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_with_relative_positions_q_and_k_keep_their_own_gates():
    """With relative position embeddings Q also meets the positions, so K's gate cannot move onto Q."""
    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(position_embedding_type="relative_key", **KW))
    apply_gates(m)
    assert all(lg.q.row_gate_also is None and not lg.k.row_gate_elsewhere for lg in gated_layers(m))


@pytest.mark.parametrize("name", ["bert", "roberta", "llama-gqa"])
def test_max_tokens_is_the_longest_input_the_model_takes(name):
    """The preflight refuses a --max-length / --latency-length above ``Family.max_tokens``: it must be exactly the
    longest input that runs (a BERT's position table; RoBERTa's starts after its padding index), and None for
    rotary positions, which run at any length."""
    torch.manual_seed(0)
    m = TINY[name]().eval()
    limit = get_family(m).max_tokens(m.config)

    def runs(n: int) -> bool:
        ids = torch.randint(3, m.config.vocab_size, (1, n))  # no padding token
        try:
            with torch.no_grad():
                m(input_ids=ids)
            return True
        except (IndexError, RuntimeError):
            return False

    if name.startswith("llama"):
        assert limit is None and runs(KW["max_position_embeddings"] + 8)
    else:
        assert limit == {"bert": 80, "roberta": 78}[name]
        assert runs(limit) and not runs(limit + 1)
