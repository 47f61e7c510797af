"""A physically pruned BERT/RoBERTa sequence classifier, as exported by FineGates.

Self-contained (imports only torch and transformers) because this file is copied into every exported
checkpoint and loaded by ``AutoModelForSequenceClassification.from_pretrained(path,
trust_remote_code=True)``. Each layer has its own width: ``num_heads`` kept heads, ``qk_dim`` and
``v_dim`` per head (heads of one layer are zero-padded to the widest, which is exact), and
``intermediate_size`` FFN neurons. Attention keeps the original 1/sqrt(head_dim) scale.

Attention is one ``scaled_dot_product_attention`` call per layer. The exporter's default layout (widths
multiples of 8, ``qk_dim == v_dim``) and a mask of ``None`` when no token is padding let torch pick its
fused kernels (flash attention on CUDA in bf16/fp16, and on CPU); with padding the mask is a boolean
(B, 1, 1, L) tensor, which the memory-efficient CUDA kernel and the CPU flash kernel accept.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput


class FineGatesConfig(PretrainedConfig):
    model_type = "finegates_compressed"

    def __init__(self, arch: str = "bert", vocab_size: int = 30522, hidden_size: int = 384,
                 head_dim: int = 32, layers: list | None = None, max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, layer_norm_eps: float = 1e-12, hidden_act: str = "gelu",
                 hidden_dropout_prob: float = 0.1, attention_probs_dropout_prob: float = 0.1,
                 classifier_dropout: float | None = None, pad_token_id: int = 0,
                 source_intermediate_size: int | None = None, **kwargs) -> None:
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        # one dict per layer: num_heads, qk_dim, v_dim, intermediate_size
        self.layers = list(layers or [])
        self.num_hidden_layers = len(self.layers)
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.classifier_dropout = classifier_dropout
        # FFN width of the model this one was exported from (caps re-exports; None in older checkpoints)
        self.source_intermediate_size = source_intermediate_size
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class Embeddings(nn.Module):
    def __init__(self, c: FineGatesConfig) -> None:
        super().__init__()
        self.arch = c.arch
        self.pad = c.pad_token_id
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(c.type_vocab_size, 1), c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        B, L = input_ids.shape
        if self.arch == "roberta":  # positions count non-pad tokens, offset by padding_idx
            mask = input_ids.ne(self.pad).int()
            pos = torch.cumsum(mask, dim=1) * mask + self.pad
        else:
            pos = torch.arange(L, device=input_ids.device).expand(B, L)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class Layer(nn.Module):
    def __init__(self, c: FineGatesConfig, spec: dict) -> None:
        super().__init__()
        h = c.hidden_size
        self.H, self.dqk, self.dv = int(spec["num_heads"]), int(spec["qk_dim"]), int(spec["v_dim"])
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self.query = nn.Linear(h, self.H * self.dqk)
        self.key = nn.Linear(h, self.H * self.dqk)
        self.value = nn.Linear(h, self.H * self.dv)
        self.attn_out = nn.Linear(self.H * self.dv, h)
        self.attn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.up = nn.Linear(h, int(spec["intermediate_size"]))
        self.down = nn.Linear(int(spec["intermediate_size"]), h)
        self.ffn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.act = ACT2FN[c.hidden_act]
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.attn_dropout = c.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape  # x: (B, L, h); mask: (B, 1, 1, L) bool, True = attend; None = attend everywhere
        if self.H > 0:
            q = self.query(x).view(B, L, self.H, self.dqk).transpose(1, 2)  # (B, H, L, dqk)
            k = self.key(x).view(B, L, self.H, self.dqk).transpose(1, 2)
            v = self.value(x).view(B, L, self.H, self.dv).transpose(1, 2)  # (B, H, L, dv)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                 dropout_p=self.attn_dropout if self.training else 0.0)
            ctx = ctx.transpose(1, 2).reshape(B, L, self.H * self.dv)
        else:  # every head removed: the attention block outputs its bias only
            ctx = x.new_zeros(B, L, 0)
        x = self.attn_norm(x + self.dropout(self.attn_out(ctx)))
        return self.ffn_norm(x + self.dropout(self.down(self.act(self.up(x)))))


class FineGatesPreTrainedModel(PreTrainedModel):
    config_class = FineGatesConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _compiling() -> bool:
    comp = getattr(torch, "compiler", None)
    return bool(torch.jit.is_tracing() or (comp is not None and comp.is_compiling()))


class FineGatesForSequenceClassification(FineGatesPreTrainedModel):
    def __init__(self, config: FineGatesConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList([Layer(config, s) for s in config.layers])
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.head_dropout = nn.Dropout(p)
        self.head_dense = nn.Linear(h, h)  # BERT: pooler.dense; RoBERTa: classifier.dense
        self.head_out = nn.Linear(h, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> SequenceClassifierOutput:
        mask = self._sdpa_mask(attention_mask)
        x = self.embeddings(input_ids, token_type_ids if self.config.arch == "bert" else None)
        for layer in self.layers:
            x = layer(x, mask)
        cls = x[:, 0]
        if self.config.arch == "roberta":
            logits = self.head_out(self.head_dropout(torch.tanh(self.head_dense(self.head_dropout(cls)))))
        else:
            logits = self.head_out(self.head_dropout(torch.tanh(self.head_dense(cls))))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @staticmethod
    def _sdpa_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """None when nothing is masked (so SDPA may use flash attention, which takes no mask), else a
        boolean (B, 1, 1, L) mask, True = attend. Checking for padding costs one device sync, as in
        transformers' own SDPA path; under tracing / torch.compile the mask is always kept."""
        if attention_mask is None:
            return None
        mask = attention_mask.bool()
        if not _compiling() and bool(mask.all()):
            return None
        return mask[:, None, None, :]
