"""Retrv-R1's Information Compression Module: every candidate becomes exactly two tokens.

From PAPERS.md: `t_con = ATT1(Q = e_con, K = V = T_c)` pools a candidate's tokens with a learned query and does not
depend on the query (computed once per candidate at index time); `R = ATT2(Q = T_c, K = V = T_q)` lets every
candidate token attend over the query tokens, and `t_rel = ATT1'(Q = e_rel, K = V = R)` pools that. Each ATT is a
stack of `num_layers` pre-norm cross-attention blocks ("two-layer attention" in the notes), each block an
attention and a SwiGLU MLP with residuals, then a final RMSNorm so the tokens enter the LM at its input scale.

No weights were released; `icm.safetensors` uses the parameter names of this module, and `retrv_config.json`
records its sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from retrv.model.config import ICMConfig
from retrv.model.layers import RMSNorm, SwiGLU, attention, mask_value


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # q: (B, Sq, C); kv: (B, Sk, C); bias broadcastable to (B, H, Sq, Sk)
        b, sq, c = q.shape
        sk = kv.shape[1]
        h = self.num_heads
        qh = self.q_proj(q).reshape(b, sq, h, -1).transpose(1, 2)  # (B, H, Sq, D)
        kh = self.k_proj(kv).reshape(b, sk, h, -1).transpose(1, 2)  # (B, H, Sk, D)
        vh = self.v_proj(kv).reshape(b, sk, h, -1).transpose(1, 2)
        out = attention(qh, kh, vh, bias).transpose(1, 2).reshape(b, sq, c)
        return self.o_proj(out)


class CrossBlock(nn.Module):
    def __init__(self, cfg: ICMConfig) -> None:
        super().__init__()
        self.norm_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_kv = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = CrossAttention(cfg.hidden_size, cfg.num_heads)
        self.norm_mlp = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), self.norm_kv(kv), bias)
        return q + self.mlp(self.norm_mlp(q))


class CrossStack(nn.Module):
    def __init__(self, cfg: ICMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            q = layer(q, kv, bias)
        return self.norm(q)


def _key_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, Sk) 1/0 key mask -> additive (B, 1, 1, Sk) bias."""
    return torch.where(mask[:, None, None, :] > 0, 0.0, mask_value())


class ICM(nn.Module):
    def __init__(self, cfg: ICMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.con_query = nn.Parameter(torch.zeros(cfg.hidden_size))  # e_con
        self.rel_query = nn.Parameter(torch.zeros(cfg.hidden_size))  # e_rel
        self.content_pool = CrossStack(cfg)  # ATT1
        self.relation_attn = CrossStack(cfg)  # ATT2
        self.relation_pool = CrossStack(cfg)  # ATT1'

    def content(self, cand: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
        """t_con for K candidates: (K, L, C) tokens with (K, L) mask -> (K, C). Query-independent."""
        q = self.con_query.to(cand.dtype).expand(cand.shape[0], 1, -1)  # (K, 1, C)
        return self.content_pool(q, cand, _key_bias(cand_mask))[:, 0]

    def relation(self, cand: torch.Tensor, cand_mask: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor):
        """t_rel for K candidates against one query: query (Lq, C) with (Lq,) mask -> (K, C)."""
        k = cand.shape[0]
        q_tokens = query[None].expand(k, -1, -1)  # (K, Lq, C)
        r = self.relation_attn(cand, q_tokens, _key_bias(query_mask[None].expand(k, -1)))  # (K, L, C)
        pooled_q = self.rel_query.to(cand.dtype).expand(k, 1, -1)
        return self.relation_pool(pooled_q, r, _key_bias(cand_mask))[:, 0]

    def forward(self, cand, cand_mask, query, query_mask) -> torch.Tensor:
        """(K, L, C) candidates and an (Lq, C) query -> (K, 2, C): [t_con, t_rel] per candidate."""
        return torch.stack([self.content(cand, cand_mask), self.relation(cand, cand_mask, query, query_mask)], dim=1)
