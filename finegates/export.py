"""Export a trained gated model as a physically smaller Hugging Face checkpoint.

Per layer (W' = folded eval weights, see :meth:`GatedLinear.folded`):

* FFN neuron j is kept iff up-row j and down-column j are both non-zero in W' (GELU(0) = 0).
* Q/K dimension j of head h is kept iff Q-row j and K-row j are non-zero (q_j k_j = 0 otherwise).
* V/O dimension j of head h is kept iff V-row j and O-column j are non-zero.
* Head h is dropped when it keeps no V/O dimension (it then adds exactly nothing).
* Kept heads are zero-padded to the layer's widest head (exact), so every layer runs one batched
  attention. Residual-side gates stay folded into W' (the hidden size is shared by all layers).

Hardware-friendly layout (``align``, default 8): every kept width (the per-head Q/K and V/O dims, the
FFN width) is rounded up to a multiple of ``align`` (never above the original model's width), and with
``same_head_dim`` (default: on whenever ``align > 1``) Q/K and V/O share one head dim per layer, which
torch's fused flash-attention kernels (CUDA and CPU) require. All padding is exact: padded Q/K dims have
zero Q and K rows (score += 0), padded V dims zero V rows and zero O columns, padded FFN neurons zero
up rows, zero up bias and zero down columns (act(0) = 0). ``align=1, same_head_dim=False`` is the
exact minimal layout.

The checkpoint holds config.json, model.safetensors (fp32, bf16 or fp16: ``save_compressed(dtype=...)``),
the tokenizer and ``modeling_finegates.py``; no pickle. Load it with :func:`load_compressed` or with
transformers and ``trust_remote_code=True``.
"""
from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.activations import ACT2FN

from finegates.gated_model import SLOTS, _layer_modules, base_encoder, trainable_head_parameters
from finegates.modeling_finegates import FineGatesConfig, FineGatesForSequenceClassification

log = logging.getLogger(__name__)

MODELING_FILE = Path(__file__).with_name("modeling_finegates.py")
DEFAULT_ALIGN = 8
# checkpoint dtypes: short name -> torch dtype (the long names and torch dtypes are accepted too)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_SAVED_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CheckpointError(ValueError):
    """An exported checkpoint that cannot be loaded (missing or corrupt file). One-line message."""


@dataclass
class ExportStats:
    gated_params_before: int
    gated_params_after: int  # weights of Q, K, V, O, up, down in the exported model (padding included)
    params_total: int  # parameters of the exported model
    # what gated_params_after would be with align=1 and separate Q/K and V/O head dims (exact minimal layout)
    gated_params_minimal: int | None = None

    @property
    def sparsity(self) -> float:
        """Removed fraction of the gated weights, counted from the exported tensors (padding counts as present)."""
        return 1.0 - self.gated_params_after / self.gated_params_before

    @property
    def sparsity_minimal(self) -> float:
        """Removed fraction in the exact minimal layout (align=1): what the gates removed, before alignment."""
        kept = self.gated_params_after if self.gated_params_minimal is None else self.gated_params_minimal
        return 1.0 - kept / self.gated_params_before


def check_align(align: object) -> int:
    """``align`` as an int, or a one-line ValueError naming it and the accepted values."""
    if isinstance(align, bool) or not isinstance(align, numbers.Integral) or int(align) < 1:
        raise ValueError(f"align={align!r} is not valid; accepted: a positive integer "
                         f"(1 = exact minimal widths, {DEFAULT_ALIGN} = default)")
    return int(align)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Checkpoint dtype from 'fp32' / 'bf16' / 'fp16' (or 'float32', 'bfloat16', 'float16', or a torch dtype)."""
    if isinstance(dtype, torch.dtype) and dtype in _SAVED_NAME:
        return dtype
    if isinstance(dtype, str):
        key = _DTYPE_NAMES.get(dtype.lower(), dtype.lower())
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"dtype={dtype!r} is not valid; accepted: 'fp32', 'bf16', 'fp16' "
                     "(or 'float32', 'bfloat16', 'float16', torch.float32, torch.bfloat16, torch.float16)")


def aligned_width(n: int, align: int, cap: int) -> int:
    """``n`` rounded up to a multiple of ``align``, but never above ``cap`` (the source width); 0 stays 0."""
    assert 0 <= n <= cap, (n, cap)
    return min(-(-n // align) * align, cap)


def _nonzero_rows(w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    keep = w.abs().sum(dim=1) > 0
    if b is not None:
        keep |= b != 0
    return keep


def _head_of(model: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(arch, dense.weight, dense.bias, out.weight, out.bias) of the classification head."""
    if isinstance(model, FineGatesForSequenceClassification):
        return (model.config.arch, model.head_dense.weight, model.head_dense.bias, model.head_out.weight,
                model.head_out.bias)
    mt = model.config.model_type
    if mt in ("roberta", "xlm-roberta", "camembert"):
        c = model.classifier
        return "roberta", c.dense.weight, c.dense.bias, c.out_proj.weight, c.out_proj.bias
    base = model.base_model
    if getattr(base, "pooler", None) is None:
        raise ValueError(f"model type {mt!r} without a pooler is not exportable; supported: bert, roberta")
    return "bert", base.pooler.dense.weight, base.pooler.dense.bias, model.classifier.weight, model.classifier.bias


def _folded(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if callable(getattr(module, "folded", None)):  # GatedLinear and the baselines' layers
        w, b = module.folded()  # gates / deltas / scales folded into an equivalent plain linear
    elif isinstance(module, nn.Linear):
        w, b = module.weight.detach().float(), None if module.bias is None else module.bias.detach().float()
    else:
        raise ValueError(f"cannot export a layer of type {type(module).__name__}; merge adapters first")
    w, b = w.float().cpu(), (b.float().cpu() if b is not None else None)
    return w, (b if b is not None else torch.zeros(w.shape[0]))


def layer_weights(layer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eval-mode (weight, bias) of the six target linears of one layer, gates folded in."""
    return {slot: _folded(getattr(parent, attr)) for slot, (parent, attr) in _layer_modules(layer).items()}


@dataclass
class _SourceLayer:
    """One encoder layer of the model being exported, in a form common to HF and FineGates models."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # slot -> (W', b'), gates folded
    n_heads: int
    qk_head: int  # per-head Q/K width in the source
    v_head: int  # per-head V/O width in the source
    attn_norm: nn.LayerNorm
    ffn_norm: nn.LayerNorm
    head_cap: int  # widest an exported head may be: the original model's head dim
    ffn_cap: int  # widest an exported FFN may be: the original model's intermediate size


_NO_CAP = 1 << 62


def _source_layers(model: nn.Module) -> tuple[list[_SourceLayer], int, int | None]:
    """The layers of ``model``, its attention scale's head dim (1/sqrt(head_dim) is kept) and the original
    model's intermediate size (None if unknown: a re-export of a checkpoint from before it was recorded)."""
    cfg = model.config
    if isinstance(model, FineGatesForSequenceClassification):  # re-export (e.g. with another alignment)
        inter = getattr(cfg, "source_intermediate_size", None)
        out = []
        for layer in model.layers:
            lw = {s: _folded(m) for s, m in zip(SLOTS, (layer.query, layer.key, layer.value, layer.attn_out,
                                                        layer.up, layer.down))}
            out.append(_SourceLayer(lw, layer.H, layer.dqk, layer.dv, layer.attn_norm, layer.ffn_norm,
                                    max(int(cfg.head_dim), layer.dqk, layer.dv),
                                    _NO_CAP if inter is None else max(int(inter), lw["up"][0].shape[0])))
        return out, int(cfg.head_dim), inter
    n_heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // n_heads
    out = [_SourceLayer(layer_weights(hf), n_heads, head_dim, head_dim, hf.attention.output.LayerNorm,
                        hf.output.LayerNorm, head_dim, cfg.intermediate_size) for hf in base_encoder(model).layer]
    return out, head_dim, cfg.intermediate_size


def _check_activation(name: str) -> None:
    """Removing or padding an FFN neuron is exact only if act(0) = 0 (GELU, ReLU, SiLU, tanh)."""
    act = ACT2FN[name] if isinstance(name, str) else name
    if float(act(torch.zeros(1)).abs().max()) != 0.0:
        raise ValueError(f"hidden_act={name!r} has act(0) != 0, so FFN neurons cannot be removed exactly; "
                         "supported: activations with act(0) = 0 (gelu, relu, silu, tanh, ...)")


def _prune_layer(src: _SourceLayer, align: int, same_head_dim: bool
                 ) -> tuple[dict[str, torch.Tensor], dict, int, int]:
    """Exported tensors, layer spec, gated weights in the exported layout and in the minimal layout."""
    (wq, bq), (wk, bk), (wv, bv), (wo, bo), (wu, bu), (wd, bd) = (src.weights[s] for s in SLOTS)
    h = wq.shape[1]
    H = src.n_heads
    assert wq.shape == wk.shape == (H * src.qk_head, h) and wv.shape == (H * src.v_head, h), (wq.shape, wv.shape)
    assert wo.shape == (h, H * src.v_head) and wd.shape == (h, wu.shape[0]), (wo.shape, wd.shape, wu.shape)
    # FFN: neuron j survives iff up-row j (or its bias) and down-column j are non-zero.
    ffn_keep = _nonzero_rows(wu, bu) & (wd.abs().sum(dim=0) > 0)
    # Attention, per head. A Q/K dim whose Q or K row is all-zero contributes q_j k_j = 0 only
    # when BOTH the row weights and bias are zero on that side.
    qk_keep = (_nonzero_rows(wq, bq) & _nonzero_rows(wk, bk)).view(H, src.qk_head)
    v_keep = (_nonzero_rows(wv, bv) & (wo.abs().sum(dim=0) > 0)).view(H, src.v_head)
    heads = [hh for hh in range(H) if bool(v_keep[hh].any())]
    # minimal widths: the widest kept head (a head without Q/K dims keeps one zero dim: uniform attention)
    need_qk = max([int(qk_keep[hh].sum()) for hh in heads] + [1]) if heads else 0
    need_v = max(int(v_keep[hh].sum()) for hh in heads) if heads else 0
    n_ffn = int(ffn_keep.sum())
    if same_head_dim and heads:
        dqk = dv = aligned_width(max(need_qk, need_v), align, src.head_cap)
    else:
        dqk, dv = aligned_width(need_qk, align, src.head_cap), aligned_width(need_v, align, src.head_cap)
    d_ffn = aligned_width(n_ffn, align, src.ffn_cap)
    minimal = 2 * h * len(heads) * (need_qk + need_v) + 2 * h * n_ffn

    def pick(keep: torch.Tensor, src_width: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Source row indices of the kept dims per head, padded with -1 to ``width``; and a validity mask."""
        idx = torch.full((len(heads), width), -1, dtype=torch.long)
        for a, hh in enumerate(heads):
            dims = torch.nonzero(keep[hh]).flatten() + hh * src_width
            idx[a, : len(dims)] = dims
        return idx.flatten(), idx.flatten() >= 0

    def rows(w: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor):
        w2 = torch.zeros(len(idx), w.shape[1], dtype=w.dtype)
        b2 = torch.zeros(len(idx), dtype=b.dtype)
        w2[valid], b2[valid] = w[idx[valid]], b[idx[valid]]
        return w2, b2

    qi, qv = pick(qk_keep, src.qk_head, dqk)
    vi, vv = pick(v_keep, src.v_head, dv)
    nq_w, nq_b = rows(wq, bq, qi, qv)
    nk_w, nk_b = rows(wk, bk, qi, qv)
    nv_w, nv_b = rows(wv, bv, vi, vv)
    no_w = torch.zeros(wo.shape[0], len(vi), dtype=wo.dtype)
    no_w[:, vv] = wo[:, vi[vv]]
    fi = torch.full((d_ffn,), -1, dtype=torch.long)
    fi[:n_ffn] = torch.nonzero(ffn_keep).flatten()
    fv = fi >= 0
    nu_w, nu_b = rows(wu, bu, fi, fv)  # padded neurons: zero up row and zero bias, so act(0) = 0 ...
    nd_w = torch.zeros(h, d_ffn, dtype=wd.dtype)
    nd_w[:, fv] = wd[:, fi[fv]]  # ... and a zero down column
    # shape invariants
    Hk = len(heads)
    assert nq_w.shape == nk_w.shape == (Hk * dqk, h) and nq_b.shape == (Hk * dqk,), (nq_w.shape, nk_w.shape)
    assert nv_w.shape == (Hk * dv, h) and no_w.shape == (h, Hk * dv), (nv_w.shape, no_w.shape)
    assert nu_w.shape == (d_ffn, h) and nu_b.shape == (d_ffn,) and nd_w.shape == (h, d_ffn), (nu_w.shape, nd_w.shape)
    for width, need, cap in ((dqk, need_qk, src.head_cap), (dv, need_v, src.head_cap), (d_ffn, n_ffn, src.ffn_cap)):
        assert need <= width <= cap and (width % align == 0 or width == cap), (width, need, align, cap)
    assert not same_head_dim or not heads or dqk == dv, (dqk, dv)
    tensors = {
        "query.weight": nq_w, "query.bias": nq_b, "key.weight": nk_w, "key.bias": nk_b,
        "value.weight": nv_w, "value.bias": nv_b, "attn_out.weight": no_w, "attn_out.bias": bo,
        "attn_norm.weight": src.attn_norm.weight, "attn_norm.bias": src.attn_norm.bias,
        "up.weight": nu_w, "up.bias": nu_b, "down.weight": nd_w, "down.bias": bd,
        "ffn_norm.weight": src.ffn_norm.weight, "ffn_norm.bias": src.ffn_norm.bias,
    }
    after = sum(t.numel() for t in (nq_w, nk_w, nv_w, no_w, nu_w, nd_w))
    spec = {"num_heads": Hk, "qk_dim": dqk, "v_dim": dv, "intermediate_size": d_ffn}
    return tensors, spec, after, minimal


@torch.no_grad()
def build_compressed(model: nn.Module, align: int = DEFAULT_ALIGN, same_head_dim: bool | None = None
                     ) -> tuple[FineGatesForSequenceClassification, ExportStats]:
    """Build the smaller fp32 model in memory from a gated model (eval gates are used), a plain one (then
    nothing is removed: this is also how the baselines export), or an exported FineGates model (re-export,
    e.g. with another ``align``; the stats then count against the original model, whose FFN width the
    checkpoint records as ``source_intermediate_size``).

    ``align``: every kept width is rounded up to a multiple of it with exact zero padding (never above the
    original model's width); 1 = exact minimal widths. ``same_head_dim``: Q/K and V/O share one head dim per layer
    (needed by the fused flash-attention kernels); ``None`` = ``align > 1``.
    """
    align = check_align(align)
    if same_head_dim is None:
        same_head_dim = align > 1
    cfg = model.config
    _check_activation(cfg.hidden_act)
    arch, hd_w, hd_b, out_w, out_b = _head_of(model)
    emb = model.embeddings if isinstance(model, FineGatesForSequenceClassification) else model.base_model.embeddings
    sd: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": emb.word_embeddings.weight,
        "embeddings.position_embeddings.weight": emb.position_embeddings.weight,
        "embeddings.token_type_embeddings.weight": emb.token_type_embeddings.weight,
        "embeddings.LayerNorm.weight": emb.LayerNorm.weight,
        "embeddings.LayerNorm.bias": emb.LayerNorm.bias,
        "head_dense.weight": hd_w, "head_dense.bias": hd_b, "head_out.weight": out_w, "head_out.bias": out_b,
    }
    layers, head_dim, source_inter = _source_layers(model)
    h = cfg.hidden_size
    specs = []
    before = after = minimal = 0
    for i, src in enumerate(layers):
        if source_inter is not None and isinstance(model, FineGatesForSequenceClassification):
            before += 4 * h * h + 2 * h * source_inter  # the original model's Q, K, V, O, up, down
        else:
            before += sum(src.weights[s][0].numel() for s in SLOTS)
        tensors, spec, n_after, n_minimal = _prune_layer(src, align, same_head_dim)
        after += n_after
        minimal += n_minimal
        specs.append(spec)
        sd.update({f"layers.{i}.{k}": v for k, v in tensors.items()})
    config = FineGatesConfig(
        arch=arch, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, head_dim=head_dim, layers=specs,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        classifier_dropout=getattr(cfg, "classifier_dropout", None), pad_token_id=cfg.pad_token_id,
        num_labels=cfg.num_labels, id2label=dict(cfg.id2label), label2id=dict(cfg.label2id),
        problem_type=getattr(cfg, "problem_type", None), source_intermediate_size=source_inter,
    )
    out = FineGatesForSequenceClassification(config)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}
    missing, unexpected = out.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    out.eval()
    stats = ExportStats(before, after, sum(p.numel() for p in out.parameters()), minimal)
    return out, stats


def save_compressed(model: FineGatesForSequenceClassification, path: str | os.PathLike, tokenizer=None,
                    extra: dict | None = None, dtype: str | torch.dtype = "fp32") -> Path:
    """Write the checkpoint atomically: into a temp dir beside ``path``, then rename over it.

    ``dtype`` ('fp32', 'bf16' or 'fp16') is the dtype of the floating tensors in model.safetensors and is
    recorded in config.json, so both loaders build the model in it (a GPU server loads half precision
    directly). The in-memory ``model`` is not changed.
    """
    dt = resolve_dtype(dtype)
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cfg = model.config.to_dict()
        cfg["auto_map"] = {
            "AutoConfig": "modeling_finegates.FineGatesConfig",
            "AutoModelForSequenceClassification": "modeling_finegates.FineGatesForSequenceClassification",
        }
        cfg["architectures"] = ["FineGatesForSequenceClassification"]
        cfg["dtype"] = cfg["torch_dtype"] = _SAVED_NAME[dt]  # transformers >= 4.56 reads dtype, older torch_dtype
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        state = {k: (v.detach().to(dt) if v.is_floating_point() else v.detach()).cpu().contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(MODELING_FILE, tmp / "modeling_finegates.py")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra:
            (tmp / "finegates.json").write_text(json.dumps(extra, indent=2, sort_keys=True, default=str))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_compressed(path: str | os.PathLike, dtype: str | torch.dtype | None = None
                    ) -> FineGatesForSequenceClassification:
    """Load an exported checkpoint with the package's own modeling code (no remote code needed).

    ``dtype``: None = the dtype the checkpoint was saved in (fp32 for checkpoints that do not say), or
    'fp32' / 'bf16' / 'fp16' to convert while loading (e.g. a bf16 checkpoint in fp32 on a CPU).
    """
    want = None if dtype is None else resolve_dtype(dtype)
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{str(path)!r} is not a FineGates checkpoint (needs config.json and model.safetensors)")
    try:
        config = FineGatesConfig.from_json_file(str(path / "config.json"))
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        dt = want or resolve_dtype(str(saved).replace("torch.", ""))
        model = FineGatesForSequenceClassification(config).to(dt)
        state = load_file(str(path / "model.safetensors"))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, wrong shapes, bad JSON
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"corrupt checkpoint {str(path)!r}: {type(e).__name__}: {msg[:200]}") from e
    return model.eval()


def export_gated_model(model: nn.Module, path: str | os.PathLike, tokenizer=None, extra: dict | None = None,
                       align: int = DEFAULT_ALIGN, dtype: str | torch.dtype = "fp32"
                       ) -> tuple[Path, ExportStats]:
    resolve_dtype(dtype)  # a bad dtype fails before the export work
    compressed, stats = build_compressed(model, align=align)
    info = {"gated_params_before": stats.gated_params_before, "gated_params_after": stats.gated_params_after,
            "sparsity": stats.sparsity, "sparsity_minimal": stats.sparsity_minimal, "align": align,
            "dtype": str(resolve_dtype(dtype)).replace("torch.", ""), **(extra or {})}
    return save_compressed(compressed, path, tokenizer, info, dtype=dtype), stats


__all__ = ["DEFAULT_ALIGN", "DTYPES", "CheckpointError", "ExportStats", "aligned_width", "build_compressed",
           "check_align", "export_gated_model", "load_compressed", "resolve_dtype", "save_compressed",
           "trainable_head_parameters"]
