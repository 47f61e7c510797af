"""BERT-family and RoBERTa-family encoders (``<prefix>.encoder.layer[i]`` with
``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``),
e.g. the embedded all-MiniLM-L6-v2, bert-base, roberta-base. Post-norm LayerNorm, learned absolute
positions, GELU FFN, multi-head attention; compressed modeling: ``finegates/modeling_finegates.py``.

Units removed together (per layer, W' = folded eval weights):

* FFN neuron j: up-row j (weights and bias) or down-column j is zero (GELU(0) = 0).
* Q/K dimension j of a head: Q-row j or K-row j is zero (weights and bias): ``q_j k_j = 0``.
* V/O dimension j of a head: V-row j or O-column j is zero. A head without V/O dimensions is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finegates.arch import Family, KeepFn, copy_checked, register
from finegates.pruning import (NO_CAP, ExportStats, aligned_width, check_activation, folded, gather_cols,
                               gather_rows, nonzero_rows)

_ROBERTA_HEAD = ("roberta", "xlm-roberta", "camembert")


@register
class Bert(Family):
    name = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "camembert")
    compressed_model_type = "finegates_compressed"
    slots = ("q", "k", "v", "o", "up", "down")
    coupled_rows = ("q", "k", "v", "up")
    lora_targets = ("query", "value")
    modeling_file = Path(__file__).resolve().parents[1] / "modeling_finegates.py"
    config_class_name = "FineGatesConfig"
    model_class_name = "FineGatesForSequenceClassification"

    def max_tokens(self, config) -> int | None:
        """Learned absolute positions: one row of the position table per token, and RoBERTa's positions start
        after its padding index (514 rows, 512 tokens)."""
        n = getattr(config, "max_position_embeddings", None)
        if n is None:
            return None
        if getattr(config, "model_type", None) in _ROBERTA_HEAD:
            n -= int(getattr(config, "pad_token_id", None) or 0) + 1
        return int(n)

    def compressed_classes(self):
        from finegates.modeling_finegates import FineGatesConfig, FineGatesForSequenceClassification

        return FineGatesConfig, FineGatesForSequenceClassification

    def row_gate_pairs(self, model: nn.Module) -> tuple[tuple[str, str], ...]:
        """Q and K: the scores are sum_j (q_j z_j)(k_j z'_j), so both gates may scale Q alone; with relative
        positions Q also meets the position embeddings, so not there."""
        return (("q", "k"),) if getattr(model.config, "position_embedding_type", "absolute") == "absolute" else ()

    def encoder(self, model: nn.Module) -> nn.Module:
        """The encoder module holding ``layer`` (``model.bert.encoder``, ``model.roberta.encoder``)."""
        base = getattr(model, "base_model", model)
        enc = getattr(base, "encoder", None)
        if enc is None or not hasattr(enc, "layer"):
            raise ValueError(f"model {type(model).__name__} has no encoder.layer; is it a "
                             f"{'/'.join(self.model_types)} sequence classifier?")
        return enc

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.encoder(model).layer)

    def layer_modules(self, layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        att = layer.attention
        return {
            "q": (att.self, "query"), "k": (att.self, "key"), "v": (att.self, "value"),
            "o": (att.output, "dense"), "up": (layer.intermediate, "dense"), "down": (layer.output, "dense"),
        }

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter outside the embeddings and the encoder (BERT: pooler + classifier; RoBERTa:
        classifier.dense + classifier.out_proj)."""
        base = getattr(model, "base_model", model)
        inner = {id(p) for m in (getattr(base, "embeddings", None), getattr(base, "encoder", None)) if m is not None
                 for p in m.parameters()}
        return [p for p in model.parameters() if id(p) not in inner]

    def lora_modules_to_save(self, model: nn.Module) -> list[str]:
        return ["classifier"] + (["pooler"] if getattr(model.base_model, "pooler", None) is not None else [])

    def layer_kept(self, lg, keep: KeepFn) -> tuple[torch.Tensor, int]:
        """A Q/K dimension j survives iff Q-row j and K-row j are open; a V/O dimension iff V-row j and
        O-column j; an FFN neuron iff up-row j and down-column j. Each survivor keeps 2 * hidden weights."""

        def both(a, b, size: int) -> torch.Tensor | float:
            """sum over units of keep(a) * keep(b); a missing gate keeps all (no op spent on a ones vector)."""
            ka, kb = a(lg), b(lg)
            ka = None if ka is None else keep(ka)
            kb = None if kb is None else keep(kb)
            if ka is None and kb is None:
                return float(size)
            return (ka if kb is None else kb if ka is None else ka * kb).sum()

        return self._kept(lg, both), sum(gl.weight.numel() for _, gl in lg.items())

    def layers_kept(self, layers, keep: KeepFn) -> tuple[torch.Tensor, int]:
        """All layers at once where they are alike (the same sizes and the same gates): each pair of gates'
        keep values stacked over the layers, so the expectation costs a few ops, not a few per layer."""
        first = layers[0] if layers else None

        def shape(lg) -> tuple:
            return tuple((slot, gl.in_features, gl.out_features, gl.row_gate is None, gl.col_gate is None)
                         for slot, gl in lg.items())

        if first is None or any(shape(lg) != shape(first) for lg in layers[1:]):
            return super().layers_kept(layers, keep)

        def both(a, b, size: int) -> torch.Tensor | float:
            ka = None if a(first) is None else torch.stack([keep(a(lg)) for lg in layers])
            kb = None if b(first) is None else torch.stack([keep(b(lg)) for lg in layers])
            if ka is None and kb is None:
                return float(size * len(layers))
            return (ka if kb is None else kb if ka is None else ka * kb).sum()

        return self._kept(first, both), len(layers) * sum(gl.weight.numel() for _, gl in first.items())

    @staticmethod
    def _kept(lg, both) -> torch.Tensor:
        """The kept gated weights, given ``both(gate_a, gate_b, size)``: the units kept by two gates (each a
        function of a layer: its gate, or None where there is none)."""
        h = lg.q.in_features
        return (2 * h * (both(lambda m: m.q.row_gate, lambda m: m.k.row_gate, lg.q.out_features)
                         + both(lambda m: m.v.row_gate, lambda m: m.o.col_gate, lg.v.out_features))
                + 2 * lg.up.in_features * both(lambda m: m.up.row_gate, lambda m: m.down.col_gate, lg.up.out_features))

    # ---- compaction
    def compact(self, model: nn.Module, layers) -> bool:
        """Per layer: the FFN computes its open neurons only; each head computes ``w`` Q/K and ``w`` V/O
        dimensions, ``w`` the most any head of the layer keeps open, padded in the other heads with dimensions
        that are closed (exactly 0, so exact). HF's attention reshapes by ``attention_head_size``, which is set
        to ``w``; its ``scaling`` (1 / sqrt(original head size)) is left as it is. That needs the attention of
        transformers 5 (heads inferred from the width, ``scaling`` passed to the kernel); older releases reshape
        to ``all_head_size`` and scale by the head size, so there (or with relative positions) it returns False."""
        if (any(not isinstance(getattr(layer.attention.self, "scaling", None), float) for layer in self.layers(model))
                or getattr(model.config, "position_embedding_type", "absolute") != "absolute"):
            return False
        if not all(g.pinned for lg in layers for _, gl in lg.items() for g in gl.gates()):
            raise RuntimeError("compaction needs pinned gates: an unpinned closed gate can reopen")
        for layer, lg in zip(self.layers(model), layers):
            att = layer.attention.self
            n_heads = att.num_attention_heads
            qk = _head_index(_open(lg.q.row_gate, lg.q.out_features) & _open(lg.k.row_gate, lg.q.out_features), n_heads)
            vo = _head_index(_open(lg.v.row_gate, lg.v.out_features) & _open(lg.o.col_gate, lg.v.out_features), n_heads)
            w = max(1, *map(len, qk), *map(len, vo))
            dev = lg.q.weight.device
            qk, vo = _pad_heads(qk, w, lg.q.out_features // n_heads, dev), _pad_heads(vo, w, lg.v.out_features // n_heads, dev)
            lg.q.compact_(out_index=qk)
            lg.k.compact_(out_index=qk)
            lg.v.compact_(out_index=vo)
            lg.o.compact_(in_index=vo)
            if not hasattr(att, "_finegates_head_size"):
                att._finegates_head_size = att.attention_head_size
            att.attention_head_size = w
            ffn = torch.nonzero(_open(lg.up.row_gate, lg.up.out_features)
                                & _open(lg.down.col_gate, lg.up.out_features)).view(-1)
            ffn = (ffn if ffn.numel() else torch.zeros(1, dtype=torch.long)).to(dev)  # all closed: one zero unit
            lg.up.compact_(out_index=ffn)
            lg.down.compact_(in_index=ffn)
        return True

    def uncompact(self, model: nn.Module, layers) -> None:
        super().uncompact(model, layers)
        for layer in self.layers(model):
            att = layer.attention.self
            if hasattr(att, "_finegates_head_size"):
                att.attention_head_size = att._finegates_head_size
                del att._finegates_head_size

    # ---- export
    def build_compressed(self, model: nn.Module, align: int, same_head_dim: bool) -> tuple[nn.Module, ExportStats]:
        FineGatesConfig, FineGatesForSequenceClassification = self.compressed_classes()
        cfg = model.config
        check_activation(cfg.hidden_act)
        arch, hd_w, hd_b, out_w, out_b = _head_of(model, FineGatesForSequenceClassification)
        emb = model.embeddings if isinstance(model, FineGatesForSequenceClassification) else model.base_model.embeddings
        sd: dict[str, torch.Tensor] = {
            "embeddings.word_embeddings.weight": emb.word_embeddings.weight,
            "embeddings.position_embeddings.weight": emb.position_embeddings.weight,
            "embeddings.token_type_embeddings.weight": emb.token_type_embeddings.weight,
            "embeddings.LayerNorm.weight": emb.LayerNorm.weight,
            "embeddings.LayerNorm.bias": emb.LayerNorm.bias,
            "head_dense.weight": hd_w, "head_dense.bias": hd_b, "head_out.weight": out_w, "head_out.bias": out_b,
        }
        layers, head_dim, source_inter = self._source_layers(model, FineGatesForSequenceClassification)
        h = cfg.hidden_size
        specs = []
        before = after = minimal = 0
        for i, src in enumerate(layers):
            if source_inter is not None and isinstance(model, FineGatesForSequenceClassification):
                before += 4 * h * h + 2 * h * source_inter  # the original model's Q, K, V, O, up, down
            else:
                before += sum(src.weights[s][0].numel() for s in self.slots)
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
        return out, ExportStats(before, after, sum(p.numel() for p in out.parameters()), minimal)

    @torch.no_grad()
    def load_exported(self, model: nn.Module, exported: nn.Module) -> None:
        """The inverse of :meth:`build_compressed` for an export that removed nothing: every tensor of the
        compressed model is copied to its place in the HF model (same arch, same widths, heads in order).
        An export that removed units does not fit, and is refused naming the first tensor that differs."""
        _, compressed_cls = self.compressed_classes()
        if not isinstance(exported, compressed_cls):
            raise ValueError(f"expected an exported {compressed_cls.__name__}, got {type(exported).__name__}")
        emb, x_emb = model.base_model.embeddings, exported.embeddings
        pairs = [(f"embeddings.{n}", getattr(emb, n), getattr(x_emb, n))
                 for n in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")]
        hf_layers = self.layers(model)
        if len(hf_layers) != len(exported.layers):
            raise ValueError(f"the exported model has {len(exported.layers)} layers, the model {len(hf_layers)}")
        for i, (hf, x) in enumerate(zip(hf_layers, exported.layers)):
            mods = self.layer_modules(hf)
            for slot, src in zip(self.slots, (x.query, x.key, x.value, x.attn_out, x.up, x.down)):
                parent, attr = mods[slot]
                pairs.append((f"layers.{i}.{slot}", getattr(parent, attr), src))
            pairs += [(f"layers.{i}.attn_norm", hf.attention.output.LayerNorm, x.attn_norm),
                      (f"layers.{i}.ffn_norm", hf.output.LayerNorm, x.ffn_norm)]
        arch, hd_w, hd_b, out_w, out_b = _head_of(model, compressed_cls)
        if arch != exported.config.arch:
            raise ValueError(f"the exported model's head is {exported.config.arch!r}, the model's {arch!r}")
        copies = [(f"{name}.{k}", dst_p, getattr(src, k)) for name, dst, src in pairs
                  for k, dst_p in dst.named_parameters(recurse=False)]
        copies += [("head_dense.weight", hd_w, exported.head_dense.weight),
                   ("head_dense.bias", hd_b, exported.head_dense.bias),
                   ("head_out.weight", out_w, exported.head_out.weight), ("head_out.bias", out_b, exported.head_out.bias)]
        copy_checked(copies)

    def layer_weights(self, layer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Eval-mode (weight, bias) of the six target linears of one layer, gates folded in."""
        return {slot: folded(getattr(parent, attr)) for slot, (parent, attr) in self.layer_modules(layer).items()}

    def _source_layers(self, model: nn.Module, compressed_cls: type) -> tuple[list["_SourceLayer"], int, int | None]:
        """The layers of ``model``, its attention scale's head dim (1/sqrt(head_dim) is kept) and the original
        model's intermediate size (None if unknown: a re-export of a checkpoint from before it was recorded)."""
        cfg = model.config
        if isinstance(model, compressed_cls):  # re-export (e.g. with another alignment)
            inter = getattr(cfg, "source_intermediate_size", None)
            out = []
            for layer in model.layers:
                lw = {s: folded(m) for s, m in zip(self.slots, (layer.query, layer.key, layer.value, layer.attn_out,
                                                                layer.up, layer.down))}
                out.append(_SourceLayer(lw, layer.H, layer.dqk, layer.dv, layer.attn_norm, layer.ffn_norm,
                                        max(int(cfg.head_dim), layer.dqk, layer.dv),
                                        NO_CAP if inter is None else max(int(inter), lw["up"][0].shape[0])))
            return out, int(cfg.head_dim), inter
        n_heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // n_heads
        out = [_SourceLayer(self.layer_weights(hf), n_heads, head_dim, head_dim, hf.attention.output.LayerNorm,
                            hf.output.LayerNorm, head_dim, cfg.intermediate_size) for hf in self.layers(model)]
        return out, head_dim, cfg.intermediate_size


def _head_of(model: nn.Module, compressed_cls: type) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(arch, dense.weight, dense.bias, out.weight, out.bias) of the classification head."""
    if isinstance(model, compressed_cls):
        return (model.config.arch, model.head_dense.weight, model.head_dense.bias, model.head_out.weight,
                model.head_out.bias)
    mt = model.config.model_type
    if mt in _ROBERTA_HEAD:
        c = model.classifier
        return "roberta", c.dense.weight, c.dense.bias, c.out_proj.weight, c.out_proj.bias
    base = model.base_model
    if getattr(base, "pooler", None) is None:
        raise ValueError(f"model type {mt!r} without a pooler is not exportable; supported: bert, roberta")
    return "bert", base.pooler.dense.weight, base.pooler.dense.bias, model.classifier.weight, model.classifier.bias


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


def _prune_layer(src: _SourceLayer, align: int, same_head_dim: bool
                 ) -> tuple[dict[str, torch.Tensor], dict, int, int]:
    """Exported tensors, layer spec, gated weights in the exported layout and in the minimal layout."""
    (wq, bq), (wk, bk), (wv, bv), (wo, bo), (wu, bu), (wd, bd) = (src.weights[s] for s in Bert.slots)
    h = wq.shape[1]
    H = src.n_heads
    assert wq.shape == wk.shape == (H * src.qk_head, h) and wv.shape == (H * src.v_head, h), (wq.shape, wv.shape)
    assert wo.shape == (h, H * src.v_head) and wd.shape == (h, wu.shape[0]), (wo.shape, wd.shape, wu.shape)
    # FFN: neuron j survives iff up-row j (or its bias) and down-column j are non-zero.
    ffn_keep = nonzero_rows(wu, bu) & (wd.abs().sum(dim=0) > 0)
    # Attention, per head. A Q/K dim whose Q or K row is all-zero contributes q_j k_j = 0 only
    # when BOTH the row weights and bias are zero on that side.
    qk_keep = (nonzero_rows(wq, bq) & nonzero_rows(wk, bk)).view(H, src.qk_head)
    v_keep = (nonzero_rows(wv, bv) & (wo.abs().sum(dim=0) > 0)).view(H, src.v_head)
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

    def pick(keep: torch.Tensor, src_width: int, width: int) -> torch.Tensor:
        """Source row indices of the kept dims per head, padded with -1 to ``width``."""
        idx = torch.full((len(heads), width), -1, dtype=torch.long)
        for a, hh in enumerate(heads):
            dims = torch.nonzero(keep[hh]).flatten() + hh * src_width
            idx[a, : len(dims)] = dims
        return idx.flatten()

    qi = pick(qk_keep, src.qk_head, dqk)
    vi = pick(v_keep, src.v_head, dv)
    nq_w, nq_b = gather_rows(wq, bq, qi)
    nk_w, nk_b = gather_rows(wk, bk, qi)
    nv_w, nv_b = gather_rows(wv, bv, vi)
    no_w = gather_cols(wo, vi)
    fi = torch.full((d_ffn,), -1, dtype=torch.long)
    fi[:n_ffn] = torch.nonzero(ffn_keep).flatten()
    nu_w, nu_b = gather_rows(wu, bu, fi)  # padded neurons: zero up row and zero bias, so act(0) = 0 ...
    nd_w = gather_cols(wd, fi)  # ... and a zero down column
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


def _open(gate, size: int) -> torch.Tensor:
    """Units of a pinned gate that are not closed for good (a missing gate closes nothing)."""
    return torch.ones(size, dtype=torch.bool) if gate is None else ~gate.pinned_closed.cpu()


def _head_index(keep: torch.Tensor, n_heads: int) -> list[list[int]]:
    """Per head, the indices (into the full width) of its kept dimensions, as a ragged list."""
    d, keep = keep.numel() // n_heads, keep.tolist()
    return [[h * d + j for j in range(d) if keep[h * d + j]] for h in range(n_heads)]


def _pad_heads(kept: list[list[int]], w: int, d: int, device: torch.device) -> torch.Tensor:
    """``w`` indices per head: its kept dimensions, then (padding) its first closed ones, each head in order."""
    out = []
    for h, k in enumerate(kept):
        ks = set(k)
        pad = [h * d + j for j in range(d) if h * d + j not in ks][:w - len(k)]
        out.extend(sorted(k + pad))
    return torch.tensor(out, dtype=torch.long, device=device)
