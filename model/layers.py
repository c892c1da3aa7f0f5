"""Building blocks shared by the vision tower, the decoder and the ICM.

Written for export: no data-dependent Python, no in-place ops on inputs, RMSNorm/rotary/softmax in fp32 whatever
the parameter dtype (Qwen2.5-VL loses accuracy in fp16 otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # transformers casts back before the weight multiply; doing the same keeps fp16 bit-compatible.
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` by (cos, sin) in fp32 and return it in x's dtype; cos/sin broadcast against x."""
    dtype = x.dtype
    x = x.float()
    return (x * cos + rotate_half(x) * sin).to(dtype)


def inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Rotary inverse frequencies for `dim` rotated channels (dim/2 frequencies), computed, never stored:
    a checkpoint built on the meta device has no buffers to restore."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def attention(
    q: torch.Tensor,  # (B, Hq, Sq, D)
    k: torch.Tensor,  # (B, Hkv, Sk, D)
    v: torch.Tensor,  # (B, Hkv, Sk, D)
    bias: torch.Tensor | None,  # additive, broadcastable to (B, Hq, Sq, Sk), fp32
) -> torch.Tensor:  # (B, Hq, Sq, D)
    """Scaled dot-product attention with grouped KV heads; softmax in fp32."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    if hq != hkv:  # GQA: share each KV head across hq/hkv query heads
        groups = hq // hkv
        k = k[:, :, None].expand(b, hkv, groups, k.shape[2], d).reshape(b, hq, k.shape[2], d)
        v = v[:, :, None].expand(b, hkv, groups, v.shape[2], d).reshape(b, hq, v.shape[2], d)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (d**-0.5)  # (B, Hq, Sq, Sk)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def mask_value(dtype: torch.dtype = torch.float32) -> float:
    """Additive bias for a masked position: the dtype's minimum, not -inf, so a fully masked row (a left-pad query)
    gives a uniform distribution instead of NaN, as transformers does."""
    return torch.finfo(dtype).min
