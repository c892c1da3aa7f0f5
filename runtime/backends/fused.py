"""The runtime side of the fused decoder layout (export/fused_decoder.py): KV buffers and M-RoPE rotary caches.

The fused graph's GroupQueryAttention writes new keys/values in place into a (B, Hkv, capacity, D) buffer per layer
bound as both `past_*` and `present_*`, and rotates the token at cache index P+s by row P+s of `cos_cache` /
`sin_cache`. `FusedCache` owns those numpy buffers for one `DecoderState`: allocated once (capacity doubling, so a
long reranking window reallocates a handful of times, never per token), the rotary rows written for the new
positions only. Numpy only: no onnxruntime here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from retrv.runtime.errors import InputError

MIN_CAPACITY = 256  # positions: a short prompt + answer fits without regrowth; 256 x 46 KB/position (SmolLM2) is 12 MB


@lru_cache(maxsize=8)
def half_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Rotary inverse frequencies (D/2,), float32, as retrv.model.layers.inv_freq computes them (cached: every
    decode step asks; read-only)."""
    out = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
           ).astype(np.float32)
    out.flags.writeable = False
    return out


def mrope_angles(position_ids: np.ndarray, text_cfg) -> np.ndarray:
    """(3, B, S) M-RoPE positions -> (S, D/2) float32 angles: frequency chunk i of `mrope_section` turns with
    position row i % 3. Every batch row must carry the same positions (the cos/sin caches are shared by the batch)."""
    pos = np.asarray(position_ids)
    if pos.ndim != 3 or pos.shape[0] != 3:
        raise InputError(f"position_ids: got shape {pos.shape}; expected (3, batch, seq)")
    if pos.shape[1] > 1 and not (pos == pos[:, :1]).all():
        raise InputError("position_ids: the fused decoder needs the same positions in every batch row; got rows that "
                         "differ (use a pack exported with --decoder traced)")
    inv = half_inv_freq(text_cfg.head_dim, text_cfg.rope_theta)
    freqs = pos[:, 0, :, None].astype(np.float32) * inv  # (3, S, D/2)
    out = np.empty(freqs.shape[1:], np.float32)
    start = 0
    for i, width in enumerate(text_cfg.mrope_section):
        out[:, start:start + width] = freqs[i % 3, :, start:start + width]
        start += width
    return out


@dataclass
class FusedCache:
    """Per-state buffers: keys/values (B, Hkv, capacity, D) per layer, rotary caches (capacity, D/2)."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    cos: np.ndarray
    sin: np.ndarray
    limit: int  # the model's context (max_position_embeddings): the buffer never grows past it
    binding: object = None  # the backend's IO binding for this state (past/present/rotary bound by pointer)
    bound_capacity: int = 0  # the capacity `binding` was bound at (rebound after `reserve` reallocates)
    # One-token steps: the new embedding, seqlens_k, total_sequence_length and the logits live in these buffers,
    # bound by pointer once per binding, so a decode step writes numbers and runs (no per-step binding or
    # allocation); `step_bound` is the binding they were bound to.
    step: dict = field(default_factory=dict)
    step_bound: object = None

    @classmethod
    def allocate(cls, batch: int, num_layers: int, kv_heads: int, head_dim: int, dtype, limit: int,
                 capacity: int = MIN_CAPACITY) -> "FusedCache":
        capacity = max(1, min(capacity, limit))
        kv = lambda: np.zeros((batch, kv_heads, capacity, head_dim), dtype)  # noqa: E731
        return cls([kv() for _ in range(num_layers)], [kv() for _ in range(num_layers)],
                   np.zeros((capacity, head_dim // 2), dtype), np.zeros((capacity, head_dim // 2), dtype), limit)

    @property
    def capacity(self) -> int:
        return int(self.cos.shape[0])

    def reserve(self, length: int, total: int) -> bool:
        """Make room for `total` positions (`length` already cached); True when the buffers were reallocated."""
        if total > self.limit:
            raise InputError(f"decoder: got {total} cached + new positions; expected <= {self.limit} (the model's "
                             f"context, max_position_embeddings)")
        if total <= self.capacity:
            return False
        capacity = self.capacity
        while capacity < total:
            capacity *= 2
        capacity = min(capacity, self.limit)

        def grown(a: np.ndarray, axis: int) -> np.ndarray:
            shape = list(a.shape)
            shape[axis] = capacity
            out = np.zeros(shape, a.dtype)
            index = [slice(None)] * a.ndim
            index[axis] = slice(0, length)
            out[tuple(index)] = a[tuple(index)]
            return out

        self.keys = [grown(a, 2) for a in self.keys]
        self.values = [grown(a, 2) for a in self.values]
        self.cos, self.sin = grown(self.cos, 0), grown(self.sin, 0)
        return True

    def write_rotary(self, start: int, angles: np.ndarray) -> None:
        """Rows start..start+S of the rotary caches: the angles of the new tokens."""
        self.cos[start:start + len(angles)] = np.cos(angles)
        self.sin[start:start + len(angles)] = np.sin(angles)


def check_unpadded(mask: np.ndarray) -> None:
    """The fused graph has no key mask: every cached and new position of every row must be real."""
    if not (mask == 1).all():
        raise InputError("attention_mask: the fused decoder takes unpadded batches only; got padding (zeros) in the "
                         "mask (feed rows one at a time, or use a pack exported with --decoder traced)")


def refuse_fused(pack, what: str) -> None:
    """TensorRT (and any consumer of standard ONNX ops) cannot take the fused decoder: one line naming the flag."""
    if pack.decoder_layout == "fused":
        raise InputError(f"{what}: {pack.path.name} has a fused decoder (ONNX Runtime contrib ops); expected a pack "
                         f"exported with `retrv export --decoder traced`")
