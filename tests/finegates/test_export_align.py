"""Hardware-friendly export: aligned widths and one head dim per layer stay exact; half-precision checkpoints
load with both loaders; bad options are one-line errors."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from finegates import apply_gates, build_compressed, export_gated_model, load_compressed, save_compressed
from finegates.export import aligned_width
from finegates.modeling_finegates import FineGatesForSequenceClassification
from tests.finegates._gating import randomize_gates

# (hidden, heads, intermediate): head dim 16 and FFN 96 are multiples of 8; head dim 12 and FFN 100 are not
SIZES = {"aligned": (64, 4, 96), "odd": (48, 4, 100)}


def tiny(arch: str, sizes: str = "aligned", seed: int = 0, layers: int = 3):
    torch.manual_seed(seed)
    h, nh, inter = SIZES[sizes]
    kw = dict(vocab_size=120, hidden_size=h, num_hidden_layers=layers, num_attention_heads=nh,
              intermediate_size=inter, num_labels=3, max_position_embeddings=80)
    if arch == "bert":
        return BertForSequenceClassification(BertConfig(**kw))
    return RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **kw))


def gated(arch: str, sizes: str = "aligned", seed: int = 0, closed_frac: float = 0.5):
    m = tiny(arch, sizes, seed)
    apply_gates(m, layout="coupled", rank=2)
    return randomize_gates(m, closed_frac)


def batch(pad_id: int, seed: int = 0, padded: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (4, 17), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 11:] = 0
        mask[3, 5:] = 0
        ids[mask == 0] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def max_diff(a: torch.nn.Module, b: torch.nn.Module, x: dict) -> float:
    with torch.no_grad():
        return (a(**x).logits.float() - b(**x).logits.float()).abs().max().item()


def check_widths(small, align: int, head_dim: int, inter: int) -> None:
    for s in small.config.layers:
        for w in (s["qk_dim"], s["v_dim"]):
            assert w % align == 0 or w == head_dim, (s, align)
            assert w <= head_dim
        assert s["intermediate_size"] % align == 0 or s["intermediate_size"] == inter, (s, align)
        assert s["intermediate_size"] <= inter
        if align > 1 and s["num_heads"] > 0:
            assert s["qk_dim"] == s["v_dim"], s  # one head dim per layer: flash attention applies


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("sizes", ["aligned", "odd"])
@pytest.mark.parametrize("seed", [0, 1])
def test_aligned_export_reproduces_gated_logits(arch, sizes, seed):
    m = gated(arch, sizes, seed)
    h, nh, inter = SIZES[sizes]
    x = batch(m.config.pad_token_id, seed)
    minimal, st1 = build_compressed(m, align=1)
    assert st1.sparsity == pytest.approx(st1.sparsity_minimal)  # align=1: today's exact minimal layout
    assert max_diff(minimal, m, x) <= 1e-4
    for align in (4, 8, 16):
        small, st = build_compressed(m, align=align)
        assert max_diff(small, m, x) <= 1e-4, align
        check_widths(small, align, h // nh, inter)
        # every aligned width is the minimal one rounded up (Q/K and V/O to their common maximum)
        for s, s1 in zip(small.config.layers, minimal.config.layers):
            assert s["num_heads"] == s1["num_heads"]
            if s1["num_heads"]:
                assert s["qk_dim"] == aligned_width(max(s1["qk_dim"], s1["v_dim"]), align, h // nh)
            assert s["intermediate_size"] == aligned_width(s1["intermediate_size"], align, inter)
        assert st.sparsity_minimal == pytest.approx(st1.sparsity)
        assert st.sparsity <= st1.sparsity  # padding counts as present
        assert st.gated_params_before == st1.gated_params_before
    # widths that are not multiples of 8 occur before alignment (otherwise this test proves little)
    assert any(w % 8 for s in minimal.config.layers for w in (s["qk_dim"], s["v_dim"], s["intermediate_size"]))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("align", [1, 8])
def test_whole_ffn_whole_attention_and_no_qk_dims(arch, align):
    m = gated(arch, "aligned", 3, closed_frac=0.3)
    enc = m.base_model.encoder.layer
    with torch.no_grad():
        enc[0].intermediate.dense.row_gate.theta.fill_(-3.0)  # layer 0: every FFN neuron closed
        enc[1].attention.self.value.row_gate.theta.fill_(-3.0)  # layer 1: every head closed
        enc[2].attention.self.query.row_gate.theta.fill_(-3.0)  # layer 2: heads keep V but no Q/K dim
        enc[2].attention.self.value.row_gate.theta[:16] = -3.0  # ... and head 0 of layer 2 goes
    x = batch(m.config.pad_token_id, 3)
    small, st = build_compressed(m, align=align)
    layers = small.config.layers
    assert layers[0]["intermediate_size"] == 0 and layers[0]["num_heads"] == 4
    assert layers[1]["num_heads"] == 0 and layers[1]["qk_dim"] == layers[1]["v_dim"] == 0
    assert layers[2]["num_heads"] == 3 and layers[2]["qk_dim"] >= 1  # one zero Q/K dim: uniform attention
    check_widths(small, align, 16, 96)
    assert max_diff(small, m, x) <= 1e-4
    assert 0 < st.sparsity < 1


def test_same_head_dim_can_be_turned_off():
    m = gated("bert", "aligned", 4)
    x = batch(0, 4)
    small, _ = build_compressed(m, align=8, same_head_dim=False)
    assert max_diff(small, m, x) <= 1e-4
    for s in small.config.layers:
        assert s["qk_dim"] % 8 == 0 and s["v_dim"] % 8 == 0 and s["intermediate_size"] % 8 == 0
    both, _ = build_compressed(m, align=1, same_head_dim=True)
    assert all(s["qk_dim"] == s["v_dim"] for s in both.config.layers if s["num_heads"])
    assert max_diff(both, m, x) <= 1e-4


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_reexport_with_another_alignment(arch, tmp_path):
    m = gated(arch, "aligned", 5)
    x = batch(m.config.pad_token_id, 5)
    minimal, st1 = build_compressed(m, align=1)
    direct, st8 = build_compressed(m, align=8)
    path = save_compressed(minimal, tmp_path / "ckpt")
    again, st = build_compressed(load_compressed(path), align=8)
    assert again.config.layers == direct.config.layers
    assert st.gated_params_before == st8.gated_params_before and st.sparsity == pytest.approx(st8.sparsity)
    assert max_diff(again, m, x) <= 1e-4
    back, _ = build_compressed(again, align=1)  # padding is found again and dropped
    assert back.config.layers == minimal.config.layers


def test_aligned_layout_lets_sdpa_pick_its_fused_kernel():
    """On CPU torch's fused (flash) SDPA kernel needs equal Q/K/V head dims; the default layout has them."""
    if not hasattr(torch, "_fused_sdp_choice"):
        pytest.skip("this torch has no _fused_sdp_choice")
    from torch.nn.attention import SDPBackend

    m = gated("bert", "aligned", 6)
    small, _ = build_compressed(m)
    minimal, _ = build_compressed(m, align=1)

    def kernels(model):
        out = set()
        for s in model.config.layers:
            if s["num_heads"]:
                q = torch.zeros(2, s["num_heads"], 17, s["qk_dim"])
                v = torch.zeros(2, s["num_heads"], 17, s["v_dim"])
                out.add(SDPBackend(torch._fused_sdp_choice(q, q, v, None, 0.0, False, scale=0.25)))
        return out

    assert kernels(small) == {SDPBackend.FLASH_ATTENTION}
    assert any(s["qk_dim"] != s["v_dim"] for s in minimal.config.layers)  # the minimal layout would not
    assert SDPBackend.MATH in kernels(minimal)


def test_no_padding_passes_no_mask_to_sdpa(monkeypatch):
    m = gated("bert", "aligned", 7)
    small, _ = build_compressed(m)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kw):
        seen.append(kw.get("attn_mask"))
        return real(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    x = batch(0, 7, padded=False)
    with torch.no_grad():
        a = small(**x).logits
        b = small(input_ids=x["input_ids"]).logits
    assert seen and all(mask is None for mask in seen)  # flash attention takes no mask
    assert torch.equal(a, b)
    seen.clear()
    xp = batch(0, 7, padded=True)
    with torch.no_grad():
        small(**xp)
    assert seen and all(mask is not None and mask.dtype == torch.bool and mask.shape == (4, 1, 1, 17) for mask in seen)
    assert max_diff(small, m, xp) <= 1e-4


# bf16 keeps 8 significant bits, fp16 11: measured 0.7-1.1% and 0.07-0.16% of the logit scale on these models
@pytest.mark.parametrize("dtype,torch_dtype,tol", [("bf16", torch.bfloat16, 0.03), ("fp16", torch.float16, 0.005)])
def test_half_precision_checkpoint_loads_with_both_loaders(tmp_path, dtype, torch_dtype, tol):
    from transformers import AutoModelForSequenceClassification

    m = gated("roberta", "aligned", 8)
    x = batch(m.config.pad_token_id, 8)
    small, _ = build_compressed(m)
    p32 = save_compressed(small, tmp_path / "fp32")
    ph = save_compressed(small, tmp_path / dtype, dtype=dtype)
    assert next(small.parameters()).dtype == torch.float32  # the in-memory model is not changed
    sd = load_file(str(ph / "model.safetensors"))
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch_dtype}
    assert json.loads((ph / "config.json").read_text())["dtype"] == str(torch_dtype).replace("torch.", "")
    assert (ph / "model.safetensors").stat().st_size < 0.6 * (p32 / "model.safetensors").stat().st_size
    ref = load_compressed(p32)
    assert next(ref.parameters()).dtype == torch.float32
    scale = ref(**x).logits.abs().max().item()
    own = load_compressed(ph)
    hf = AutoModelForSequenceClassification.from_pretrained(str(ph), trust_remote_code=True).eval()
    for loaded in (own, hf):
        assert {p.dtype for p in loaded.parameters()} == {torch_dtype}  # loaded in half precision directly
        assert max_diff(loaded, ref, x) <= tol * scale
    up = load_compressed(ph, dtype="fp32")  # converted while loading, e.g. for a CPU
    assert {p.dtype for p in up.parameters()} == {torch.float32}
    assert max_diff(up, ref, x) <= tol * scale  # rounding the weights only
    assert max_diff(up, m, x) <= tol * scale


def test_export_gated_model_writes_align_and_dtype(tmp_path):
    m = gated("bert", "odd", 9)
    path, stats = export_gated_model(m, tmp_path / "ckpt", align=4, dtype="bf16")
    info = json.loads((path / "finegates.json").read_text())
    assert info["align"] == 4 and info["dtype"] == "bfloat16"
    assert info["sparsity_minimal"] == pytest.approx(stats.sparsity_minimal)
    loaded = load_compressed(path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    check_widths(loaded, 4, 12, 100)


@pytest.mark.parametrize("bad", [0, -8, 2.5, "8", True, None])
def test_bad_align_is_one_clear_error(bad):
    m = gated("bert", "aligned", 0)
    with pytest.raises(ValueError) as e:
        build_compressed(m, align=bad)
    msg = str(e.value)
    assert f"align={bad!r}" in msg and "positive integer" in msg and "\n" not in msg


@pytest.mark.parametrize("bad", ["int8", "fp64", "half", torch.float64, 16])
def test_bad_dtype_is_one_clear_error(tmp_path, bad):
    m = gated("bert", "aligned", 0)
    small, _ = build_compressed(m)
    for call in (lambda: save_compressed(small, tmp_path / "ckpt", dtype=bad),
                 lambda: export_gated_model(m, tmp_path / "ckpt", dtype=bad)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert f"dtype={bad!r}" in msg and "'fp32', 'bf16', 'fp16'" in msg and "\n" not in msg
    assert not any(tmp_path.iterdir())  # nothing written
    path = save_compressed(small, tmp_path / "ok")
    with pytest.raises(ValueError, match="accepted: 'fp32', 'bf16', 'fp16'"):
        load_compressed(path, dtype=bad)


def test_activation_without_zero_at_zero_is_refused():
    m = tiny("bert")
    m.config.hidden_act = "sigmoid"  # sigmoid(0) = 0.5: a removed neuron would still add to the output
    with pytest.raises(ValueError, match="hidden_act='sigmoid'"):
        build_compressed(m)


def test_old_checkpoint_without_dtype_or_source_width_still_loads_and_reexports(tmp_path):
    m = gated("bert", "aligned", 10)
    x = batch(0, 10)
    small, _ = build_compressed(m, align=1)
    path = save_compressed(small, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    for k in ("dtype", "torch_dtype", "source_intermediate_size"):
        cfg.pop(k, None)
    (path / "config.json").write_text(json.dumps(cfg))
    old = load_compressed(path)
    assert isinstance(old, FineGatesForSequenceClassification) and next(old.parameters()).dtype == torch.float32
    again, _ = build_compressed(old, align=8)
    assert max_diff(again, m, x) <= 1e-4
    check_widths(again, 8, 16, 10 ** 9)
