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

    def forward(self, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None, fold: bool = False) -> torch.Tensor:
        # q: (B, Sq, C); kv: (B, Sk, C); bias broadcastable to (B, H, Sq, Sk)
        if fold:  # (through forward, so exported node names keep this module's scope: calibration/rules.py)
            return _pool_attention(self, q, kv, bias)
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


def _pool_attention(attn: CrossAttention, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`attn(q, kv, bias, fold=True)`: `attn(q, kv, bias)` for ONE query token per batch row, q (B or 1, 1, C), kv (B, L, C), computed without
    projecting the L keys and values. Per head h with q_h = (W_q q + b_q)_h:
      score_j = q_h . (W_k,h x_j + b_k,h) = (W_k,h^T q_h) . x_j + const   (the constant cancels in softmax)
      out_h   = sum_j p_j (W_v,h x_j + b_v,h) = W_v,h (sum_j p_j x_j) + b_v,h   (the p_j sum to 1)
    so the cost per key is H dot products of length C instead of 2 C x C matrix-vector products. The per-head
    products use the whole 2-D weights on head-masked rows (H x more work on B rows, nothing per key), so that
    the quantizers, which rewrite MatMuls with a constant 2-D weight, still find every weight."""
    c = q.shape[-1]
    h = attn.num_heads
    heads = (torch.arange(c) // (c // h) == torch.arange(h)[:, None]).to(q.dtype)  # (H, C): head h's columns
    qh = attn.q_proj(q) * heads  # (B, H, C): row h keeps q_h only
    qk = torch.matmul(qh, attn.k_proj.weight)  # (B, H, C): W_k,h^T q_h
    scores = torch.matmul(qk, kv.transpose(1, 2)).float() * ((c // h) ** -0.5) + bias[:, 0]  # (B, H, L)
    probs = torch.softmax(scores, dim=-1).to(kv.dtype)
    mixed = torch.matmul(probs, kv)  # (B, H, C): each head's weighted mean of the key tokens
    out = (attn.v_proj(mixed) * heads).sum(1, keepdim=True)  # (B, 1, C): head h's block of W_v mixed_h + b_v
    return attn.o_proj(out)


def _pool(stack: CrossStack, query_vec: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor) -> torch.Tensor:
    """`stack(query_vec expanded to (B, 1, C), kv, key bias of kv_mask)[:, 0]` with `_pool_attention`: (B, C).
    The first block's query side is the learned vector itself, computed at batch 1 and broadcast."""
    q = query_vec.to(kv.dtype)[None, None]  # (1, 1, C)
    bias = _key_bias(kv_mask)
    for layer in stack.layers:
        q = q + layer.attn(layer.norm_q(q), layer.norm_kv(kv), bias, fold=True)  # (B, 1, C) from here on
        q = q + layer.mlp(layer.norm_mlp(q))
    return stack.norm(q)[:, 0]


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

    def relation_shared(self, cand: torch.Tensor, cand_mask: torch.Tensor, query: torch.Tensor,
                        query_mask: torch.Tensor) -> torch.Tensor:
        """`relation` without repeated work (what the exported graph runs): equal to it up to float reassociation.

        - ATT2: the K candidates' tokens are one batch of K*L queries over the one query, so the query tokens' norm
          and key/value projections run once per layer instead of once per candidate (`relation` expands the
          query over K first). Rows are independent in every op of a block, so flattening changes nothing else.
        - ATT1': each block's single pooled query is folded into its key and value projections
          (`_pool_attention`): per candidate token that costs H dot products instead of two C x C projections.
        """
        k, length, c = cand.shape
        bias = _key_bias(query_mask[None])  # (1, 1, 1, Lq)
        r = self.relation_attn(cand.reshape(1, k * length, c), query[None], bias).reshape(k, length, c)  # (K, L, C)
        return _pool(self.relation_pool, self.rel_query, r, cand_mask)

    def forward(self, cand, cand_mask, query, query_mask) -> torch.Tensor:
        """(K, L, C) candidates and an (Lq, C) query -> (K, 2, C): [t_con, t_rel] per candidate."""
        return torch.stack([self.content(cand, cand_mask), self.relation(cand, cand_mask, query, query_mask)], dim=1)
