"""Export equivalence: the smaller model gives the gated model's eval logits, and loads three ways."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from finegates import CheckpointError, apply_gates, build_compressed, load_compressed, save_compressed
from finegates.gated_model import all_gates
from tests.finegates._gating import randomize_gates


def random_gated(arch: str, layout: str, seed: int, closed_frac: float = 0.5, rank: int = 2):
    torch.manual_seed(seed)
    kw = dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
              num_labels=3, max_position_embeddings=80)
    if arch == "bert":
        m = BertForSequenceClassification(BertConfig(**kw))
    else:
        m = RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **kw))
    apply_gates(m, layout=layout, rank=rank)
    return randomize_gates(m, closed_frac)


def inputs(pad_id: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (4, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[3, 5:] = 0
    ids[mask == 0] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("layout", ["independent", "coupled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_export_reproduces_gated_logits(arch, layout, seed):
    m = random_gated(arch, layout, seed)
    x = inputs(m.config.pad_token_id, seed)
    ref = m(**x).logits
    small, stats = build_compressed(m)
    assert (small(**x).logits - ref).abs().max().item() <= 1e-4
    assert 0 < stats.sparsity < 1
    # heads of unequal kept widths occur and are padded exactly
    assert any(spec["num_heads"] > 0 for spec in small.config.layers)


def test_exported_parameter_counts_match_the_config():
    m = random_gated("bert", "coupled", 5)
    small, stats = build_compressed(m)
    h = 48
    expected = sum(2 * s["num_heads"] * s["qk_dim"] * h + 2 * s["num_heads"] * s["v_dim"] * h
                   + 2 * s["intermediate_size"] * h for s in small.config.layers)
    assert stats.gated_params_after == expected
    assert stats.gated_params_before == 3 * (4 * h * h + 2 * h * 96)
    weights = sum(p.numel() for n, p in small.named_parameters()
                  if n.split(".")[-2] in ("query", "key", "value", "attn_out", "up", "down") and n.endswith("weight"))
    assert weights == expected


def test_whole_heads_and_whole_layers_can_go():
    m = random_gated("bert", "coupled", 7, closed_frac=0.0)
    layer0 = m.bert.encoder.layer[0]
    with torch.no_grad():
        layer0.attention.self.value.row_gate.theta.fill_(-3.0)  # every V row closed: no head left
        layer0.intermediate.dense.row_gate.theta.fill_(-3.0)  # every FFN neuron closed
        m.bert.encoder.layer[1].attention.self.value.row_gate.theta[:12] = -3.0  # head 0 of layer 1
    x = inputs(0)
    small, _ = build_compressed(m)
    assert small.config.layers[0]["num_heads"] == 0 and small.config.layers[0]["intermediate_size"] == 0
    assert small.config.layers[1]["num_heads"] == 3
    assert (small(**x).logits - m(**x).logits).abs().max().item() <= 1e-4


def test_nothing_closed_exports_the_full_model():
    m = random_gated("bert", "independent", 3, closed_frac=0.0)
    small, stats = build_compressed(m)
    assert stats.sparsity == 0.0


def test_three_loaders_on_a_saved_checkpoint(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification, pipeline

    from transformers import BertConfig as BC

    torch.manual_seed(0)
    m = BertForSequenceClassification(BC(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, num_labels=2,
                                         id2label={0: "negative", 1: "positive"},
                                         label2id={"negative": 0, "positive": 1}))
    apply_gates(m, layout="coupled")
    with torch.no_grad():
        for g in all_gates(m):
            g.theta[: g.theta.numel() // 3] = -2.0
    m.eval()
    small, _ = build_compressed(m)
    path = save_compressed(small, tmp_path / "ckpt", tokenizer)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_finegates.py", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # no pickle
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left behind
    x = tokenizer(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    ref = m(**x).logits
    a = load_compressed(path)
    b = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=True).eval()
    for loaded in (a, b):
        assert (loaded(**x).logits - ref).abs().max().item() <= 1e-4
    clf = pipeline("text-classification", model=str(path), trust_remote_code=True)
    out = clf(["a fine film", "dull and long"])
    assert [o["label"] for o in out] == [["negative", "positive"][i] for i in ref.argmax(-1).tolist()]
    # the safetensors file holds exactly the smaller tensors
    sd = load_file(str(path / "model.safetensors"))
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in small.parameters())
    assert json.loads((path / "config.json").read_text())["auto_map"]["AutoModelForSequenceClassification"]
    # its tokenizer loads without running or asking about the modeling code (transformers prompts "Do you wish
    # to run the custom code?" on the terminal for a checkpoint with an auto_map unless told not to)
    import subprocess
    import sys

    code = f"from finegates.export import load_tokenizer; print(load_tokenizer({str(path)!r})('a fine film')['input_ids'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "custom code" not in r.stdout + r.stderr
    assert r.stdout.strip() == str(tokenizer("a fine film")["input_ids"])


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a FineGates checkpoint"):
        load_compressed(tmp_path)
    m = random_gated("bert", "coupled", 0)
    small, _ = build_compressed(m)
    path = save_compressed(small, tmp_path / "ckpt")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_compressed(path)
