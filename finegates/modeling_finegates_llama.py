"""A physically pruned Llama-style sequence classifier (RoPE, RMSNorm, SwiGLU, grouped-query attention),
as exported by FineGates from ``LlamaForSequenceClassification``.

Self-contained (imports only torch and transformers) because this file is copied into every exported
checkpoint and loaded by ``AutoModelForSequenceClassification.from_pretrained(path,
trust_remote_code=True)``. Each layer has its own widths (``layers[i]``):

* ``num_kv_heads`` kept key/value heads, each with ``qk_dim`` Q/K dims (whole rotary pairs: the first
  half of the head holds the first element of each kept pair, the second half the second, as
  ``rotate_half`` expects) and ``v_dim`` V/O dims; ``rope_pairs[g]`` are the original pair (frequency)
  indices of kv head g's kept pairs;
* ``num_heads`` kept query heads; ``kv_map[h]`` is the kv head that query head h reads (grouped-query
  attention with groups of any size);
* ``intermediate_size`` SwiGLU neurons (``down(act(gate(x)) * up(x))``).

Zero padding up to the widest head of a layer is exact. Attention keeps the original 1/sqrt(head_dim)
scale and the rotary frequencies of the source model (``rope_inv_freq``, ``rope_attention_scaling``). The logits are
those of the last token that is not padding (right or left padding), as in transformers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput


class FineGatesLlamaConfig(PretrainedConfig):
    model_type = "finegates_llama_compressed"

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 64, head_dim: int = 16, layers: list | None = None,
                 rms_norm_eps: float = 1e-6, hidden_act: str = "silu", rope_inv_freq: list | None = None,
                 rope_attention_scaling: float = 1.0, attention_bias: bool = False, mlp_bias: bool = False,
                 pad_token_id: int | None = None, source_intermediate_size: int | None = None, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        # one dict per layer: num_heads, num_kv_heads, kv_map, qk_dim, v_dim, rope_pairs, intermediate_size
        self.layers = list(layers or [])
        self.num_hidden_layers = len(self.layers)
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.rope_inv_freq = list(rope_inv_freq or [])
        self.rope_attention_scaling = rope_attention_scaling
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.source_intermediate_size = source_intermediate_size
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Layer(nn.Module):
    def __init__(self, c: FineGatesLlamaConfig, spec: dict) -> None:
        super().__init__()
        h = c.hidden_size
        self.H, self.Hkv = int(spec["num_heads"]), int(spec["num_kv_heads"])
        self.dqk, self.dv = int(spec["qk_dim"]), int(spec["v_dim"])
        self.kv_map = [int(g) for g in spec["kv_map"]]
        self.rope_pairs = [[int(p) for p in ps] for ps in spec["rope_pairs"]]
        self.scale = 1.0 / math.sqrt(c.head_dim)
        ab, mb = bool(c.attention_bias), bool(c.mlp_bias)
        self.attn_norm = RMSNorm(h, c.rms_norm_eps)
        self.q_proj = nn.Linear(h, self.H * self.dqk, bias=ab)
        self.k_proj = nn.Linear(h, self.Hkv * self.dqk, bias=ab)
        self.v_proj = nn.Linear(h, self.Hkv * self.dv, bias=ab)
        self.o_proj = nn.Linear(self.H * self.dv, h, bias=ab)
        self.ffn_norm = RMSNorm(h, c.rms_norm_eps)
        n = int(spec["intermediate_size"])
        self.gate_proj = nn.Linear(h, n, bias=mb)
        self.up_proj = nn.Linear(h, n, bias=mb)
        self.down_proj = nn.Linear(n, h, bias=mb)
        self.act = ACT2FN[c.hidden_act]
        self._index: dict = {}  # device -> (kv_map, rope pair index) tensors, built on first use

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._index:
            self._index[device] = (torch.tensor(self.kv_map, dtype=torch.long, device=device),
                                   torch.tensor(self.rope_pairs, dtype=torch.long, device=device).view(self.Hkv, -1))
        return self._index[device]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, inv_freq: torch.Tensor,
                rope_scale: float) -> torch.Tensor:
        B, L, _ = x.shape  # mask: (B, 1, L, L) bool, True = attend; None = causal only
        if self.H > 0:
            y = self.attn_norm(x)
            kv_map, pairs = self._indices(x.device)
            q = self.q_proj(y).view(B, L, self.H, self.dqk).transpose(1, 2)  # (B, H, L, dqk)
            k = self.k_proj(y).view(B, L, self.Hkv, self.dqk).transpose(1, 2)  # (B, Hkv, L, dqk)
            v = self.v_proj(y).view(B, L, self.Hkv, self.dv).transpose(1, 2)
            freqs = positions[:, None, :, None].float() * inv_freq[pairs][None, :, None, :]  # (B, Hkv, L, dqk/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = (emb.cos() * rope_scale).to(x.dtype), (emb.sin() * rope_scale).to(x.dtype)
            k = k * cos + _rotate_half(k) * sin
            q = q * cos[:, kv_map] + _rotate_half(q) * sin[:, kv_map]
            ctx = F.scaled_dot_product_attention(q, k[:, kv_map], v[:, kv_map], attn_mask=mask, scale=self.scale,
                                                 is_causal=mask is None)
            x = x + self.o_proj(ctx.transpose(1, 2).reshape(B, L, self.H * self.dv))
        elif self.o_proj.bias is not None:  # every head removed: the attention block adds its bias only
            x = x + self.o_proj.bias
        y = self.ffn_norm(x)
        return x + self.down_proj(self.act(self.gate_proj(y)) * self.up_proj(y))


class FineGatesLlamaPreTrainedModel(PreTrainedModel):
    config_class = FineGatesLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class FineGatesLlamaForSequenceClassification(FineGatesLlamaPreTrainedModel):
    def __init__(self, config: FineGatesLlamaConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.layers = nn.ModuleList([Layer(config, s) for s in config.layers])
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.score = nn.Linear(h, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> SequenceClassifierOutput:
        B, L = input_ids.shape
        x = self.embed_tokens(input_ids)
        if position_ids is None:  # as transformers: 0..L-1 whatever the padding
            position_ids = torch.arange(L, device=x.device)[None].expand(B, L)
        mask = self._mask(attention_mask, L)
        inv_freq = torch.tensor(self.config.rope_inv_freq, dtype=torch.float32, device=x.device)
        for layer in self.layers:
            x = layer(x, mask, position_ids, inv_freq, self.config.rope_attention_scaling)
        pad = self.config.pad_token_id
        if pad is None:
            if B != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            last = torch.full((B,), L - 1, device=x.device, dtype=torch.long)
        else:  # the rightmost token that is not padding (left or right padding)
            idx = torch.arange(L, device=x.device, dtype=torch.int32)
            last = (idx * input_ids.ne(pad).to(torch.int32)).argmax(-1)
        logits = self.score(self.norm(x[torch.arange(B, device=x.device), last]))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None, L: int) -> torch.Tensor | None:
        """None when no token is padding (SDPA's own causal mask), else a boolean (B, 1, L, L) causal mask
        without the padded keys; a query that may attend nothing (left padding) attends to itself, so its
        (unused) output stays finite."""
        if attention_mask is None or bool(attention_mask.bool().all()):
            return None
        keys = attention_mask.bool()[:, None, None, :]
        causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
        mask = causal[None, None] & keys
        eye = torch.eye(L, dtype=torch.bool, device=attention_mask.device)[None, None]
        return mask | (eye & ~mask.any(-1, keepdim=True))
