"""The ICM's attention cores in plain PyTorch: the oracle the Triton kernel and the TensorRT plugin must match.

A *core* is the attention math alone, between projections done outside it. Every tensor is in the layout a Linear
layer leaves it in, heads side by side on the last axis (`C = num_heads * D`, head h is channels h*D:(h+1)*D), so
no transpose is needed before or after a core.

    pool(q, k, v, mask)         q (K, C), k = v-shaped (K, L, C), mask (K, L)   -> (K, C)
        one query per candidate attends over that candidate's L tokens: ATT1's and ATT1''s attention.
    cross(q, k, v, mask)        q (K, L, C), k/v (Lq, C) shared by all K, mask (Lq,) -> (K, L, C)
        every candidate token attends over the query tokens: ATT2's attention (R before its o_proj).
    relation_pool(q, k, v, qmask, pool_q, cmask) -> (K, C)
        R = cross(q, k, v, qmask), then pool(pool_q, R, R, cmask): the relation step fused with its pooling,
        with R as the pool's keys and values per head. A per-head linear map of R folds into pool_q and the
        output, so this covers any pool whose keys/values are per-head linear in R. It does NOT cover the ICM as
        built (`model/icm.py`), where o_proj, a SwiGLU MLP and two RMSNorms mix all channels of R between ATT2
        and ATT1'; `kernels/split.py` explains the split that is exact for that model.

Masks are 1 for a real token, 0 for padding. A masked score gets float32's minimum added, not -inf, exactly as
`model.layers.attention` does, so a fully masked row averages all its positions instead of giving NaN.
Scores, softmax and accumulation run in fp32 whatever the input dtype; outputs take the input dtype.
"""

from __future__ import annotations

import torch

MASKED = torch.finfo(torch.float32).min  # the model's mask_value(): min, not -inf (a fully masked row stays finite)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., C) -> (..., H, D)"""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def _bias(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, 0.0, MASKED).to(torch.float32)


def pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """One learned query per candidate over its tokens. q (K, C); k, v (K, L, C); mask (K, L) -> (K, C)."""
    kk, length, c = k.shape
    qh = _heads(q, num_heads).float()  # (K, H, D)
    kh, vh = _heads(k, num_heads).float(), _heads(v, num_heads).float()  # (K, L, H, D)
    scale = qh.shape[-1] ** -0.5
    scores = torch.einsum("khd,klhd->khl", qh, kh) * scale + _bias(mask)[:, None, :]  # (K, H, L)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("khl,klhd->khd", probs, vh).reshape(kk, c).to(q.dtype)


def cross(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Every candidate token over the shared query tokens. q (K, L, C); k, v (Lq, C); mask (Lq,) -> (K, L, C)."""
    kk, length, c = q.shape
    qh = _heads(q, num_heads).float()  # (K, L, H, D)
    kh, vh = _heads(k, num_heads).float(), _heads(v, num_heads).float()  # (Lq, H, D)
    scale = qh.shape[-1] ** -0.5
    scores = torch.einsum("klhd,jhd->klhj", qh, kh) * scale + _bias(mask)  # (K, L, H, Lq)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("klhj,jhd->klhd", probs, vh).reshape(kk, length, c).to(q.dtype)


def relation_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_mask: torch.Tensor,
                  pool_q: torch.Tensor, cand_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """R = cross(q, k, v, query_mask) (K, L, C), then pool(pool_q, R, R, cand_mask) -> (K, C). The reference
    materialises R; the fused kernel never writes it. R stays fp32 here, as it does in the kernel's registers."""
    r = cross(q.float(), k.float(), v.float(), query_mask, num_heads)
    return pool(pool_q.float(), r, r, cand_mask, num_heads).to(pool_q.dtype)


def icm_attention(con_q, con_k, con_v, cand_mask, rel_q, query_k, query_v, query_mask, pool_q, num_heads: int):
    """Both tokens' attention for every candidate, what the fused kernel computes in one launch:
    (pool(con_q, con_k, con_v, cand_mask), relation_pool(rel_q, query_k, query_v, query_mask, pool_q, cand_mask))."""
    return (pool(con_q, con_k, con_v, cand_mask, num_heads),
            relation_pool(rel_q, query_k, query_v, query_mask, pool_q, cand_mask, num_heads))


class TorchCores:
    """The cores as an object, the interface `kernels.split` composes with (the Triton and ONNX-custom-op cores
    have the same three methods)."""

    name = "torch"

    @staticmethod
    def pool(q, k, v, mask, num_heads):
        return pool(q, k, v, mask, num_heads)

    @staticmethod
    def cross(q, k, v, mask, num_heads):
        return cross(q, k, v, mask, num_heads)

    @staticmethod
    def relation_pool(q, k, v, query_mask, pool_q, cand_mask, num_heads):
        return relation_pool(q, k, v, query_mask, pool_q, cand_mask, num_heads)
