"""The Qwen2.5-VL vision tower: patch embedding, 2D rotary, window attention with full-attention blocks, 2x2 merger.

Everything that depends on the image grid (rotary positions, the window permutation, which tokens share a window
or an image) is computed in numpy by `retrv.runtime.inputs.positions` and passed in as tensors, so the traced graph has
no data-dependent Python and the runtime can feed the same inputs to ONNX Runtime or TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from retrv.model.config import VisionConfig
from retrv.model.layers import RMSNorm, SwiGLU, apply_rotary, attention, inv_freq, mask_value
from retrv.runtime.inputs import positions


@dataclass
class VisionInputs:
    """What the vision graph consumes besides the patches; built by `vision_inputs` from the image grid."""

    position_ids: torch.Tensor  # (N, 2) int64: (row, col) of every patch, merge-block-major
    window_index: torch.Tensor  # (N/4,) int64: merge groups reordered window by window
    reverse_index: torch.Tensor  # (N/4,) int64: argsort(window_index), undoes the reorder after the merger
    window_segments: torch.Tensor  # (N,) int64: window number of each patch, in window order
    image_segments: torch.Tensor  # (N,) int64: image number of each patch, in window order

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


def vision_inputs(grid_thw: np.ndarray, cfg: VisionConfig) -> VisionInputs:
    """The grid-dependent indices as tensors; computed by the runtime's numpy code, so there is one implementation."""
    arrays = positions.vision_graph_inputs(grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    return VisionInputs(**{k: torch.from_numpy(v) for k, v in arrays.items()})


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, c = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).permute(1, 2, 0, 3).unbind(0)  # each (H, N, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q[None], k[None], v[None], bias)  # (1, H, N, D)
        return self.proj(out[0].transpose(0, 1).reshape(n, c))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, bias)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride over one flattened patch is a matmul; written as one so the graph
    is a single MatMul (quantizable, no 5D conv). The weight keeps the checkpoint's Conv3d shape."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        t, p = cfg.temporal_patch_size, cfg.patch_size
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, t, p, p))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (N, C*T*P*P) -> (N, hidden)
        w = self.proj.weight
        return patches.to(w.dtype) @ w.reshape(w.shape[0], -1).t()


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.merged = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(), nn.Linear(self.merged, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N/4, out)
        return self.mlp(self.ln_q(x).reshape(-1, self.merged))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.full_attention = frozenset(cfg.fullatt_block_indexes)

    def _window_order(self, x: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        unit = self.cfg.merge_unit
        return x.reshape(-1, unit, x.shape[-1])[window_index].reshape(-1, x.shape[-1])

    def forward(
        self,
        patches: torch.Tensor,  # (N, C*T*P*P)
        position_ids: torch.Tensor,  # (N, 2)
        window_index: torch.Tensor,  # (N/4,)
        reverse_index: torch.Tensor,  # (N/4,)
        window_segments: torch.Tensor,  # (N,)
        image_segments: torch.Tensor,  # (N,)
    ) -> torch.Tensor:  # (N/4, out_hidden): merged tokens in the processor's (image, row, col) order
        cfg = self.cfg
        x = self._window_order(self.patch_embed(patches), window_index)  # (N, C)

        freqs = position_ids[..., None].float() * inv_freq(cfg.head_dim // 2, cfg.rope_theta)  # (N, 2, D/8)
        freqs = freqs.reshape(freqs.shape[0], -1)  # (N, D/4): row freqs then col freqs
        freqs = self._window_order(torch.cat([freqs, freqs], dim=-1), window_index)  # (N, D)
        cos, sin = freqs.cos()[None], freqs.sin()[None]  # (1, N, D) broadcast over heads

        # Block-diagonal attention as an additive bias: a token sees only tokens of its own window (or image).
        neg = mask_value()
        win_bias = torch.where(window_segments[:, None] == window_segments[None, :], 0.0, neg)  # (N, N)
        img_bias = torch.where(image_segments[:, None] == image_segments[None, :], 0.0, neg)

        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, img_bias if i in self.full_attention else win_bias)
        return self.merger(x)[reverse_index]

    def encode(self, patches: torch.Tensor, grid_thw) -> torch.Tensor:
        """Convenience for PyTorch callers: compute the grid inputs and run the tower."""
        grid = grid_thw.cpu().numpy() if isinstance(grid_thw, torch.Tensor) else np.asarray(grid_thw)
        inputs = vision_inputs(grid, self.cfg)
        device = patches.device
        return self(patches, **{k: v.to(device) for k, v in inputs.as_dict().items()})

