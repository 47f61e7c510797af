"""Export a trained gated model as a physically smaller Hugging Face checkpoint.

Per layer (W' = folded eval weights, see :meth:`GatedLinear.folded`):

* FFN neuron j is kept iff up-row j and down-column j are both non-zero in W' (GELU(0) = 0).
* Q/K dimension j of head h is kept iff Q-row j and K-row j are non-zero (q_j k_j = 0 otherwise).
* V/O dimension j of head h is kept iff V-row j and O-column j are non-zero.
* Head h is dropped when it keeps no V/O dimension (it then adds exactly nothing).
* Kept heads are zero-padded to the layer's widest head (exact), so every layer runs one batched
  attention. Residual-side gates stay folded into W' (the hidden size is shared by all layers).

The checkpoint holds config.json, model.safetensors, the tokenizer and ``modeling_finegates.py``; no
pickle. Load it with :func:`load_compressed` or with transformers and ``trust_remote_code=True``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from finegates.gated_model import SLOTS, _layer_modules, base_encoder, trainable_head_parameters
from finegates.modeling_finegates import FineGatesConfig, FineGatesForSequenceClassification

log = logging.getLogger(__name__)

MODELING_FILE = Path(__file__).with_name("modeling_finegates.py")


class CheckpointError(ValueError):
    """An exported checkpoint that cannot be loaded (missing or corrupt file). One-line message."""


@dataclass
class ExportStats:
    gated_params_before: int
    gated_params_after: int
    params_total: int  # parameters of the exported model

    @property
    def sparsity(self) -> float:
        return 1.0 - self.gated_params_after / self.gated_params_before


def _nonzero_rows(w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    keep = w.abs().sum(dim=1) > 0
    if b is not None:
        keep |= b != 0
    return keep


def _head_of(model: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(arch, dense.weight, dense.bias, out.weight, out.bias) of the classification head."""
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
    return w, (b if b is not None else torch.zeros(w.shape[0]))


def layer_weights(layer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eval-mode (weight, bias) of the six target linears of one layer, gates folded in."""
    return {slot: _folded(getattr(parent, attr)) for slot, (parent, attr) in _layer_modules(layer).items()}


@torch.no_grad()
def build_compressed(model: nn.Module) -> tuple[FineGatesForSequenceClassification, ExportStats]:
    """Build the smaller model in memory from a gated model (eval gates are used) or a plain one
    (then nothing is removed: this is also how the baselines export)."""
    cfg = model.config
    arch, hd_w, hd_b, out_w, out_b = _head_of(model)
    n_heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // n_heads
    emb = model.base_model.embeddings
    sd: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": emb.word_embeddings.weight,
        "embeddings.position_embeddings.weight": emb.position_embeddings.weight,
        "embeddings.token_type_embeddings.weight": emb.token_type_embeddings.weight,
        "embeddings.LayerNorm.weight": emb.LayerNorm.weight,
        "embeddings.LayerNorm.bias": emb.LayerNorm.bias,
        "head_dense.weight": hd_w, "head_dense.bias": hd_b, "head_out.weight": out_w, "head_out.bias": out_b,
    }
    specs = []
    before = after = 0
    for i, hf_layer in enumerate(base_encoder(model).layer):
        lw = layer_weights(hf_layer)
        (wq, bq), (wk, bk), (wv, bv), (wo, bo), (wu, bu), (wd, bd) = (lw[s] for s in SLOTS)
        h = wq.shape[1]
        before += sum(w.numel() for w in (wq, wk, wv, wo, wu, wd))
        # FFN: neuron j survives iff up-row j (or its bias) and down-column j are non-zero.
        ffn_keep = _nonzero_rows(wu, bu) & (wd.abs().sum(dim=0) > 0)
        # Attention, per head. A Q/K dim whose Q or K row is all-zero contributes q_j k_j = 0 only
        # when BOTH the row weights and bias are zero on that side.
        qk_keep = (_nonzero_rows(wq, bq) & _nonzero_rows(wk, bk)).view(n_heads, head_dim)
        v_keep = (_nonzero_rows(wv, bv) & (wo.abs().sum(dim=0) > 0)).view(n_heads, head_dim)
        heads = [hh for hh in range(n_heads) if bool(v_keep[hh].any())]
        dqk = max([int(qk_keep[hh].sum()) for hh in heads] + [1]) if heads else 0
        dv = max(int(v_keep[hh].sum()) for hh in heads) if heads else 0

        def pick(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Row indices of the kept dims per head, padded with -1 to ``width``; and a validity mask."""
            idx = torch.full((len(heads), width), -1, dtype=torch.long)
            for a, hh in enumerate(heads):
                dims = torch.nonzero(keep[hh]).flatten() + hh * head_dim
                idx[a, : len(dims)] = dims
            return idx.flatten(), idx.flatten() >= 0

        def rows(w: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor):
            w2 = torch.zeros(len(idx), w.shape[1], dtype=w.dtype)
            b2 = torch.zeros(len(idx), dtype=b.dtype)
            w2[valid], b2[valid] = w[idx[valid]], b[idx[valid]]
            return w2, b2

        qi, qv = pick(qk_keep, dqk)
        vi, vv = pick(v_keep, dv)
        nq_w, nq_b = rows(wq, bq, qi, qv)
        nk_w, nk_b = rows(wk, bk, qi, qv)
        nv_w, nv_b = rows(wv, bv, vi, vv)
        no_w = torch.zeros(wo.shape[0], len(vi), dtype=wo.dtype)
        no_w[:, vv] = wo[:, vi[vv]]
        fi = torch.nonzero(ffn_keep).flatten()
        nu_w, nu_b, nd_w = wu[fi], bu[fi], wd[:, fi]
        # shape invariants
        assert nq_w.shape == nk_w.shape == (len(heads) * dqk, h), (nq_w.shape, nk_w.shape)
        assert nv_w.shape == (len(heads) * dv, h) and no_w.shape == (h, len(heads) * dv)
        assert nu_w.shape == (len(fi), h) and nd_w.shape == (h, len(fi))
        after += sum(w.numel() for w in (nq_w, nk_w, nv_w, no_w, nu_w, nd_w))
        specs.append({"num_heads": len(heads), "qk_dim": dqk, "v_dim": dv, "intermediate_size": len(fi)})
        p = f"layers.{i}."
        att_ln = hf_layer.attention.output.LayerNorm
        out_ln = hf_layer.output.LayerNorm
        sd.update({
            p + "query.weight": nq_w, p + "query.bias": nq_b, p + "key.weight": nk_w, p + "key.bias": nk_b,
            p + "value.weight": nv_w, p + "value.bias": nv_b, p + "attn_out.weight": no_w, p + "attn_out.bias": bo,
            p + "attn_norm.weight": att_ln.weight, p + "attn_norm.bias": att_ln.bias,
            p + "up.weight": nu_w, p + "up.bias": nu_b, p + "down.weight": nd_w, p + "down.bias": bd,
            p + "ffn_norm.weight": out_ln.weight, p + "ffn_norm.bias": out_ln.bias,
        })
    config = FineGatesConfig(
        arch=arch, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, head_dim=head_dim, layers=specs,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        classifier_dropout=getattr(cfg, "classifier_dropout", None), pad_token_id=cfg.pad_token_id,
        num_labels=cfg.num_labels, id2label=dict(cfg.id2label), label2id=dict(cfg.label2id),
        problem_type=getattr(cfg, "problem_type", None),
    )
    out = FineGatesForSequenceClassification(config)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}
    missing, unexpected = out.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    out.eval()
    stats = ExportStats(before, after, sum(p.numel() for p in out.parameters()))
    return out, stats


def save_compressed(model: FineGatesForSequenceClassification, path: str | os.PathLike, tokenizer=None,
                    extra: dict | None = None) -> Path:
    """Write the checkpoint atomically: into a temp dir beside ``path``, then rename over it."""
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
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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


def load_compressed(path: str | os.PathLike) -> FineGatesForSequenceClassification:
    """Load an exported checkpoint with the package's own modeling code (no remote code needed)."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{str(path)!r} is not a FineGates checkpoint (needs config.json and model.safetensors)")
    try:
        config = FineGatesConfig.from_json_file(str(path / "config.json"))
        model = FineGatesForSequenceClassification(config)
        state = load_file(str(path / "model.safetensors"))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, wrong shapes, bad JSON
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"corrupt checkpoint {str(path)!r}: {type(e).__name__}: {msg[:200]}") from e
    return model.eval()


def export_gated_model(model: nn.Module, path: str | os.PathLike, tokenizer=None,
                       extra: dict | None = None) -> tuple[Path, ExportStats]:
    compressed, stats = build_compressed(model)
    info = {"gated_params_before": stats.gated_params_before, "gated_params_after": stats.gated_params_after,
            "sparsity": stats.sparsity, **(extra or {})}
    return save_compressed(compressed, path, tokenizer, info), stats


__all__ = ["CheckpointError", "ExportStats", "build_compressed", "export_gated_model", "load_compressed",
           "save_compressed", "trainable_head_parameters"]
