"""Llama-style decoders (``LlamaForSequenceClassification``): pre-norm RMSNorm, rotary positions (RoPE),
SwiGLU FFN (``down(silu(gate(x)) * up(x))``), grouped-query attention (``num_key_value_heads`` K/V heads,
each read by a group of query heads). Compressed modeling: ``finegates/modeling_finegates_llama.py``.

Slots: q, k, v, o, gate, up, down (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``). The
``coupled`` layout gates the rows of Q, K, V and up; ``independent`` puts a row and a column gate on all
seven. Units removed together (per layer, W' = folded eval weights):

* FFN neuron j: gate-row j, up-row j or down-column j is zero (silu(0) = 0, and 0 * anything = 0).
* Q/K: RoPE rotates dims j and j + head_dim/2 together, so the unit is the rotary pair: pair p of kv head
  g is kept iff g's K rows of p are not both zero and some query head of g's group has a non-zero Q row
  of p. A kept pair keeps its Q rows in every query head of the group (zero rows where that head's are
  zero: exact) and its original frequency.
* V/O: dim j of kv head g is kept iff g's V-row j is non-zero and some query head of the group has a
  non-zero O-column j. Removing a K/V row therefore removes it for the whole query group.
* Query head h is dropped when it has no non-zero O-column among its group's kept V dims; a kv head is
  dropped when its whole group is.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from finegates.arch import Family, KeepFn, copy_checked, register
from finegates.pruning import ExportStats, aligned_width, check_activation, folded, gather_cols, gather_rows, nonzero_rows

_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rope types whose frequencies do not depend on the length


@register
class Llama(Family):
    name = "llama"
    model_types = ("llama",)
    compressed_model_type = "finegates_llama_compressed"
    slots = ("q", "k", "v", "o", "gate", "up", "down")
    coupled_rows = ("q", "k", "v", "up")
    lora_targets = ("q_proj", "v_proj")
    modeling_file = Path(__file__).resolve().parents[1] / "modeling_finegates_llama.py"
    config_class_name = "FineGatesLlamaConfig"
    model_class_name = "FineGatesLlamaForSequenceClassification"

    def compressed_classes(self):
        from finegates.modeling_finegates_llama import FineGatesLlamaConfig, FineGatesLlamaForSequenceClassification

        return FineGatesLlamaConfig, FineGatesLlamaForSequenceClassification

    def decoder(self, model: nn.Module) -> nn.Module:
        base = getattr(model, "base_model", model)
        if not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
            raise ValueError(f"model {type(model).__name__} has no decoder layers; is it a "
                             "LlamaForSequenceClassification?")
        return base

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.decoder(model).layers)

    def layer_modules(self, layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        a, m = layer.self_attn, layer.mlp
        return {"q": (a, "q_proj"), "k": (a, "k_proj"), "v": (a, "v_proj"), "o": (a, "o_proj"),
                "gate": (m, "gate_proj"), "up": (m, "up_proj"), "down": (m, "down_proj")}

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The score layer (the final RMSNorm belongs to the frozen base)."""
        return list(model.score.parameters())

    def lora_modules_to_save(self, model: nn.Module) -> list[str]:
        return ["score"]

    def layer_meta(self, model: nn.Module) -> dict:
        cfg = model.config
        H = cfg.num_attention_heads
        return {"shape": (H, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // H)}

    def layer_kept(self, lg, keep: KeepFn) -> tuple[torch.Tensor, int]:
        """Expected kept weights with the units above: per kv group, a rotary pair kept keeps 2 rows of K
        and of each of the group's query heads; a V dim kept keeps its V row and the group's O columns; a
        neuron kept keeps 3 * hidden weights (dropped query heads are not counted: an upper bound)."""
        H, Hkv, d = lg.meta["shape"]
        G, P, h = H // Hkv, d // 2, lg.q.in_features
        ref = lg.q.weight

        def k(gate, size: int) -> torch.Tensor:
            return keep(gate) if gate is not None else ref.new_ones(size)

        def pair(x: torch.Tensor, heads: int) -> torch.Tensor:  # P(either element of the pair kept)
            x = x.view(heads, 2, P)
            return 1 - (1 - x[:, 0]) * (1 - x[:, 1])

        def any_in_group(x: torch.Tensor) -> torch.Tensor:  # (H, n) -> (Hkv, n)
            return 1 - (1 - x.view(Hkv, G, -1)).prod(dim=1)

        pq, pk = k(lg.q.row_gate, lg.q.out_features), k(lg.k.row_gate, lg.k.out_features)
        pv, po = k(lg.v.row_gate, lg.v.out_features), k(lg.o.col_gate, lg.o.in_features)
        pg, pu = k(lg.gate.row_gate, lg.gate.out_features), k(lg.up.row_gate, lg.up.out_features)
        pd = k(lg.down.col_gate, lg.down.in_features)
        qk = pair(pk, Hkv) * any_in_group(pair(pq, H))  # (Hkv, P)
        vo = pv.view(Hkv, d) * any_in_group(po.view(H, d))  # (Hkv, d)
        kept = 2 * h * (G + 1) * qk.sum() + h * (G + 1) * vo.sum() + 3 * h * (pg * pu * pd).sum()
        return kept, sum(gl.weight.numel() for _, gl in lg.items())

    # ---- export
    def build_compressed(self, model: nn.Module, align: int, same_head_dim: bool) -> tuple[nn.Module, ExportStats]:
        config_cls, model_cls = self.compressed_classes()
        if isinstance(model, model_cls):
            raise ValueError("re-exporting a compressed Llama checkpoint is not supported; export the gated model")
        cfg = model.config
        check_activation(cfg.hidden_act)
        base = self.decoder(model)
        rot = base.rotary_emb
        if getattr(rot, "rope_type", "default") not in _STATIC_ROPE:
            raise ValueError(f"rope_type={rot.rope_type!r} is not exportable; accepted: {', '.join(_STATIC_ROPE)}")
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        sd: dict[str, torch.Tensor] = {"embed_tokens.weight": base.embed_tokens.weight, "norm.weight": base.norm.weight,
                                       "score.weight": model.score.weight}
        if getattr(model.score, "bias", None) is not None:
            raise ValueError("a score layer with a bias is not exportable (LlamaForSequenceClassification has none)")
        specs = []
        before = after = minimal = 0
        ab, mb = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))
        for i, layer in enumerate(base.layers):
            w = {s: folded(getattr(p, a)) for s, (p, a) in self.layer_modules(layer).items()}
            before += sum(w[s][0].numel() for s in self.slots)
            tensors, spec, n_after, n_min = _prune_layer(w, H, Hkv, d, cfg.intermediate_size, align, same_head_dim)
            tensors["attn_norm.weight"] = layer.input_layernorm.weight
            tensors["ffn_norm.weight"] = layer.post_attention_layernorm.weight
            for name, has in (("q_proj", ab), ("k_proj", ab), ("v_proj", ab), ("o_proj", ab), ("gate_proj", mb),
                              ("up_proj", mb), ("down_proj", mb)):
                if not has:
                    tensors.pop(f"{name}.bias")
            after += n_after
            minimal += n_min
            specs.append(spec)
            sd.update({f"layers.{i}.{k}": v for k, v in tensors.items()})
        config = config_cls(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, head_dim=d, layers=specs,
            rms_norm_eps=cfg.rms_norm_eps, hidden_act=cfg.hidden_act,
            rope_inv_freq=[float(x) for x in rot.inv_freq.float().cpu()],
            rope_attention_scaling=float(rot.attention_scaling), attention_bias=ab, mlp_bias=mb,
            pad_token_id=cfg.pad_token_id, num_labels=cfg.num_labels, id2label=dict(cfg.id2label),
            label2id=dict(cfg.label2id), problem_type=getattr(cfg, "problem_type", None),
            source_intermediate_size=cfg.intermediate_size,
        )
        out = model_cls(config)
        sd = {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}
        missing, unexpected = out.load_state_dict(sd, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        out.eval()
        return out, ExportStats(before, after, sum(p.numel() for p in out.parameters()), minimal)

    @torch.no_grad()
    def load_exported(self, model: nn.Module, exported: nn.Module) -> None:
        """The inverse of :meth:`build_compressed` for an export that removed nothing (every head, kv head and
        rotary pair in its place); anything else is refused before the first copy."""
        _, model_cls = self.compressed_classes()
        if not isinstance(exported, model_cls):
            raise ValueError(f"expected an exported {model_cls.__name__}, got {type(exported).__name__}")
        base, layers = self.decoder(model), self.layers(model)
        if len(layers) != len(exported.layers):
            raise ValueError(f"the exported model has {len(exported.layers)} layers, the model {len(layers)}")
        copies = [("embed_tokens.weight", base.embed_tokens.weight, exported.embed_tokens.weight),
                  ("norm.weight", base.norm.weight, exported.norm.weight),
                  ("score.weight", model.score.weight, exported.score.weight)]
        for i, (hf, x) in enumerate(zip(layers, exported.layers)):
            in_place = x.kv_map == [hh * x.Hkv // x.H for hh in range(x.H)] and all(
                ps == list(range(len(ps))) for ps in x.rope_pairs)
            if not in_place:
                raise ValueError(f"layers.{i} of the exported model has moved or removed heads or rotary pairs: only "
                                 "an export that removed nothing can be loaded back")
            mods = self.layer_modules(hf)
            for slot in self.slots:
                parent, attr = mods[slot]
                dst, src = getattr(parent, attr), getattr(x, attr)
                copies.append((f"layers.{i}.{attr}.weight", dst.weight, src.weight))
                if dst.bias is not None or src.bias is not None:
                    if dst.bias is None or src.bias is None:
                        raise ValueError(f"layers.{i}.{attr}: a bias on one side only")
                    copies.append((f"layers.{i}.{attr}.bias", dst.bias, src.bias))
            copies += [(f"layers.{i}.attn_norm.weight", hf.input_layernorm.weight, x.attn_norm.weight),
                       (f"layers.{i}.ffn_norm.weight", hf.post_attention_layernorm.weight, x.ffn_norm.weight)]
        copy_checked(copies)


def _prune_layer(w: dict[str, tuple[torch.Tensor, torch.Tensor]], H: int, Hkv: int, d: int, inter: int, align: int,
                 same_head_dim: bool) -> tuple[dict[str, torch.Tensor], dict, int, int]:
    """Exported tensors, layer spec, gated weights in the exported layout and in the minimal layout."""
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = w["q"], w["k"], w["v"], w["o"]
    (wg, bg), (wu, bu), (wd, bd) = w["gate"], w["up"], w["down"]
    h, G, P = wq.shape[1], H // Hkv, d // 2
    assert wq.shape == (H * d, h) and wk.shape == wv.shape == (Hkv * d, h) and wo.shape == (h, H * d), \
        (wq.shape, wk.shape, wv.shape, wo.shape)
    assert wg.shape == wu.shape == (inter, h) and wd.shape == (h, inter), (wg.shape, wu.shape, wd.shape)
    # FFN: neuron j survives iff gate-row j, up-row j (or their biases) and down-column j are non-zero
    ffn_keep = nonzero_rows(wg, bg) & nonzero_rows(wu, bu) & (wd.abs().sum(dim=0) > 0)
    # Q/K in rotary pairs (p, p + P), per kv group
    q_pair = nonzero_rows(wq, bq).view(H, 2, P).any(dim=1)  # (H, P)
    k_pair = nonzero_rows(wk, bk).view(Hkv, 2, P).any(dim=1)  # (Hkv, P)
    qk_keep = k_pair & q_pair.view(Hkv, G, P).any(dim=1)  # (Hkv, P)
    # V/O per kv group; query heads with no O column on their group's kept V dims are dropped
    o_nz = (wo.abs().sum(dim=0) > 0).view(H, d)
    v_keep = nonzero_rows(wv, bv).view(Hkv, d) & o_nz.view(Hkv, G, d).any(dim=1)  # (Hkv, d)
    heads = [hh for hh in range(H) if bool((o_nz[hh] & v_keep[hh // G]).any())]
    groups = sorted({hh // G for hh in heads})
    kv_map = [groups.index(hh // G) for hh in heads]
    need_pairs = max([int(qk_keep[g].sum()) for g in groups] + [1]) if groups else 0  # >= 1 pair: uniform attention
    need_v = max(int(v_keep[g].sum()) for g in groups) if groups else 0
    n_ffn = int(ffn_keep.sum())
    qk_align = align * 2 // math.gcd(align, 2)  # whole pairs
    if same_head_dim and groups:
        dqk = dv = aligned_width(max(2 * need_pairs, need_v), qk_align, d)
    else:
        dqk, dv = aligned_width(2 * need_pairs, qk_align, d), aligned_width(need_v, align, d)
    Pk = dqk // 2
    d_ffn = aligned_width(n_ffn, align, inter)
    Hk, Gk = len(heads), len(groups)
    minimal = (2 * need_pairs * h * (Hk + Gk) + need_v * h * (Hk + Gk)) + 3 * h * n_ffn

    # source row indices per kept kv head: pairs (first halves, then second halves), padded with -1
    pair_idx = torch.full((Gk, Pk), -1, dtype=torch.long)
    for a, g in enumerate(groups):
        ps = torch.nonzero(qk_keep[g]).flatten()
        pair_idx[a, : len(ps)] = ps
    rope_pairs = pair_idx.clamp(min=0).tolist()  # padding pairs: any frequency (their Q and K rows are zero)

    def qk_rows(src_heads: list[int], kv_of: list[int]) -> torch.Tensor:
        """Source Q (or K) row indices of each exported head: its kv head's kept pairs, first elements
        then second elements (as rotate_half pairs them), -1 for padding."""
        rows = []
        for src, a in zip(src_heads, kv_of):
            pi = pair_idx[a]
            rows += [torch.where(pi >= 0, src * d + pi, -1), torch.where(pi >= 0, src * d + P + pi, -1)]
        return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)

    ki = qk_rows(groups, list(range(Gk)))
    qi = qk_rows(heads, kv_map)
    v_idx = torch.full((Gk, dv), -1, dtype=torch.long)
    for a, g in enumerate(groups):
        ds = torch.nonzero(v_keep[g]).flatten()
        v_idx[a, : len(ds)] = ds
    vi = torch.cat([torch.where(v_idx[a] >= 0, g * d + v_idx[a], -1) for a, g in enumerate(groups)]) if groups \
        else torch.zeros(0, dtype=torch.long)
    oi = torch.cat([torch.where(v_idx[kv_map[a]] >= 0, hh * d + v_idx[kv_map[a]], -1) for a, hh in enumerate(heads)]) \
        if heads else torch.zeros(0, dtype=torch.long)
    nq_w, nq_b = gather_rows(wq, bq, qi)
    nk_w, nk_b = gather_rows(wk, bk, ki)
    nv_w, nv_b = gather_rows(wv, bv, vi)
    no_w = gather_cols(wo, oi)
    fi = torch.full((d_ffn,), -1, dtype=torch.long)
    fi[:n_ffn] = torch.nonzero(ffn_keep).flatten()
    ng_w, ng_b = gather_rows(wg, bg, fi)
    nu_w, nu_b = gather_rows(wu, bu, fi)
    nd_w = gather_cols(wd, fi)
    assert nq_w.shape == (Hk * dqk, h) and nk_w.shape == (Gk * dqk, h) and nv_w.shape == (Gk * dv, h), \
        (nq_w.shape, nk_w.shape, nv_w.shape)
    assert no_w.shape == (h, Hk * dv) and nd_w.shape == (h, d_ffn) and nu_w.shape == ng_w.shape == (d_ffn, h)
    tensors = {"q_proj.weight": nq_w, "q_proj.bias": nq_b, "k_proj.weight": nk_w, "k_proj.bias": nk_b,
               "v_proj.weight": nv_w, "v_proj.bias": nv_b, "o_proj.weight": no_w, "o_proj.bias": bo,
               "gate_proj.weight": ng_w, "gate_proj.bias": ng_b, "up_proj.weight": nu_w, "up_proj.bias": nu_b,
               "down_proj.weight": nd_w, "down_proj.bias": bd}
    after = sum(t.numel() for t in (nq_w, nk_w, nv_w, no_w, ng_w, nu_w, nd_w))
    spec = {"num_heads": Hk, "num_kv_heads": Gk, "kv_map": kv_map, "qk_dim": dqk, "v_dim": dv,
            "rope_pairs": rope_pairs, "intermediate_size": d_ffn}
    return tensors, spec, after, minimal
