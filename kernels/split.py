"""Where the kernel ends and the graph begins: the ICM of `model/icm.py` rewritten around attention cores.

What the ICM computes (each ATT a `CrossStack` of `num_layers` pre-norm `CrossBlock`s, then an RMSNorm):

    t_con = ATT1 (q = e_con,       kv = T_c)   # content
    R     = ATT2 (q = T_c,         kv = T_q)   # relation, (K, L, C)
    t_rel = ATT1'(q = e_rel,       kv = R)     # relation pooled

One block is `q += o_proj(attn(q_proj(norm_q(q)), k_proj(norm_kv(kv)), v_proj(norm_kv(kv)))); q += mlp(norm(q))`.

The split, exact for this model:

| stays in the graph (PyTorch / ONNX / TensorRT layers)            | the kernel (a core, `kernels/reference.py`)   |
| ---------------------------------------------------------------- | --------------------------------------------- |
| RMSNorms, q/k/v projections, o_proj, residuals, SwiGLU MLPs,      | ATT1 / ATT1' attention: `pool` (one query per |
| the final norms; projecting the query tokens ONCE (the model      | candidate, online softmax over its tokens);   |
| expands them K times and projects each copy)                      | ATT2 attention: `cross`                       |

Why R is still written for this model: between ATT2's attention and ATT1''s keys lie o_proj, a residual, a SwiGLU
MLP and two RMSNorms, all of which mix every channel of a token, so ATT1''s keys for head h depend on all heads of
R. A kernel gridded over candidates x heads cannot produce them without R; one that could would be a fused
per-token MLP (C x C weights streamed per tile), not an attention kernel. And with `num_layers` >= 2, each ATT1'
layer's query depends on the previous layer's pooling over all of R, so R is read `num_layers` times anyway.
`relation_pool` (R kept in registers) is therefore exact for an attention-only relation step whose pool keys and
values are per-head linear in R (the literal `ATT1'(e_rel, ATT2(T_c, T_q))` of PAPERS.md), not for this ICM.
By count (not yet measured; bench/gpu.py measures both on a GPU): per candidate token, one ATT2 layer does
5 C^2 multiply-adds in q_proj, o_proj and the SwiGLU MLP against 2 Lq C in its attention core, so at Qwen2.5-VL-7B
width (C = 3584) and a 64-token query the cores are under 1% of the relation step's arithmetic; the per-token
projections and MLPs over K x L tokens dominate, and those are GEMMs the graph already runs well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from retrv.kernels.reference import TorchCores


def _block(layer, q: torch.Tensor, kv: torch.Tensor, attend: Callable) -> torch.Tensor:
    """One `CrossBlock` with its attention replaced by `attend(q_proj, k_proj, v_proj)`."""
    attn = layer.attn
    qn, kvn = layer.norm_q(q), layer.norm_kv(kv)
    out = attend(attn.q_proj(qn), attn.k_proj(kvn), attn.v_proj(kvn))
    q = q + attn.o_proj(out)
    return q + layer.mlp(layer.norm_mlp(q))


def content(icm, cand: torch.Tensor, cand_mask: torch.Tensor, cores=TorchCores) -> torch.Tensor:
    """= `icm.content(cand, cand_mask)`: (K, L, C) with (K, L) mask -> (K, C), the attention by `cores.pool`."""
    heads = icm.cfg.num_heads
    q = icm.con_query.to(cand.dtype).expand(cand.shape[0], -1)  # (K, C): e_con per candidate
    for layer in icm.content_pool.layers:
        q = _block(layer, q, cand, lambda qp, kp, vp: cores.pool(qp, kp, vp, cand_mask, heads))
    return icm.content_pool.norm(q)


def relation_tokens(icm, cand: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor,
                    cores=TorchCores) -> torch.Tensor:
    """R = ATT2(T_c, T_q) (K, L, C), the attention by `cores.cross`; the query tokens are normed and projected
    once per layer, not once per candidate."""
    heads = icm.cfg.num_heads
    r = cand
    for layer in icm.relation_attn.layers:
        r = _block(layer, r, query, lambda qp, kp, vp: cores.cross(qp, kp, vp, query_mask, heads))
    return icm.relation_attn.norm(r)


def relation(icm, cand: torch.Tensor, cand_mask: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor,
             cores=TorchCores) -> torch.Tensor:
    """= `icm.relation(cand, cand_mask, query, query_mask)`: -> (K, C)."""
    heads = icm.cfg.num_heads
    r = relation_tokens(icm, cand, query, query_mask, cores)
    p = icm.rel_query.to(cand.dtype).expand(cand.shape[0], -1)  # (K, C): e_rel per candidate
    for layer in icm.relation_pool.layers:
        p = _block(layer, p, r, lambda qp, kp, vp: cores.pool(qp, kp, vp, cand_mask, heads))
    return icm.relation_pool.norm(p)


class SplitIcmContent(torch.nn.Module):
    """`IcmContentGraph` with the attention done by `cores`: what is exported with a custom node for TensorRT."""

    def __init__(self, icm, cores=TorchCores) -> None:
        super().__init__()
        self.icm, self.cores = icm, cores

    def forward(self, cand_tokens, cand_mask):
        return content(self.icm, cand_tokens, cand_mask, self.cores)


class SplitIcmRelation(torch.nn.Module):
    def __init__(self, icm, cores=TorchCores) -> None:
        super().__init__()
        self.icm, self.cores = icm, cores

    def forward(self, cand_tokens, cand_mask, query_tokens, query_mask):
        return relation(self.icm, cand_tokens, cand_mask, query_tokens, query_mask, self.cores)
