"""The Qwen2.5-VL language model: GQA attention with M-RoPE, RMSNorm, SwiGLU, and a KV cache.

One code path serves prefill, extension (appending a candidate's full tokens mid-reasoning) and single-token decode:
every layer takes the past keys/values of its layer (possibly empty) and returns them extended. The ONNX decoder
graph is this same function with the past as explicit inputs, so what is validated is what is exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from retrv.model.config import TextConfig
from retrv.model.layers import RMSNorm, SwiGLU, apply_rotary, attention, inv_freq, mask_value


def mrope_cos_sin(position_ids: torch.Tensor, cfg: TextConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE: (3, B, S) positions (temporal, height, width) -> cos, sin of shape (B, 1, S, head_dim) in fp32.

    The head's frequencies are split into `mrope_section` chunks; chunk i rotates by position row i % 3.
    """
    freqs = position_ids[..., None].float() * inv_freq(cfg.head_dim, cfg.rope_theta)  # (3, B, S, D/2)
    chunks = freqs.split(list(cfg.mrope_section), dim=-1)
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # (B, S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, S, D)
    return emb.cos(), emb.sin()


def causal_bias(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Additive bias (B, 1, S, P+S) from a (B, P+S) key mask: query i (at cache index P+i) sees keys j <= P+i
    that are not padding."""
    total = attention_mask.shape[1]
    past = total - query_len
    q_idx = torch.arange(query_len, device=attention_mask.device)[:, None] + past  # (S, 1)
    k_idx = torch.arange(total, device=attention_mask.device)[None, :]  # (1, P+S)
    allowed = (k_idx <= q_idx)[None] & (attention_mask[:, None, :] > 0)  # (B, S, P+S)
    return torch.where(allowed, 0.0, mask_value())[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * d, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * d, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * d, bias=True)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, S, D)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # (B, Hkv, P+S, D)
        v = torch.cat([past_v, v], dim=2)
        out = attention(q, k, v, bias).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), k, v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


@dataclass
class KVCache:
    """Per-layer keys/values (B, Hkv, T, D) and the key mask (B, T) they were computed under."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    attention_mask: torch.Tensor
    next_position: torch.Tensor = field(default=None)  # (B,) the M-RoPE position a plain text token gets next

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        z = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return cls(
            keys=[z() for _ in range(cfg.num_hidden_layers)],
            values=[z() for _ in range(cfg.num_hidden_layers)],
            attention_mask=torch.zeros(batch, 0, dtype=torch.long, device=device),
        )

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, H)
        position_ids: torch.Tensor,  # (3, B, S)
        attention_mask: torch.Tensor,  # (B, P+S) 1 = attend, 0 = padding; covers the past too
        past_keys: list[torch.Tensor],  # per layer (B, Hkv, P, D)
        past_values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:  # normed hidden (B, S, H), presents
        cos, sin = mrope_cos_sin(position_ids, self.cfg)
        bias = causal_bias(attention_mask, inputs_embeds.shape[1])
        x = inputs_embeds
        keys, values = [], []
        for layer, pk, pv in zip(self.layers, past_keys, past_values):
            x, k, v = layer(x, cos, sin, bias, pk, pv)
            keys.append(k)
            values.append(v)
        return self.norm(x), keys, values
