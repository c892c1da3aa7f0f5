"""The runner interface every backend (ONNX Runtime, TensorRT, PyTorch) implements.

The runtime's loops (generation, reranking) talk to a `Backend` only, in numpy. A backend owns the decoder's KV
cache in whatever form is cheapest for it (OrtValues, device buffers, torch tensors); the loop sees a `DecoderState`
it passes back on every step and never looks inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from retrv.runtime.errors import InputError


@dataclass
class DecoderState:
    """Opaque per-sequence-batch cache handle. `length` counts cached positions (padding included);
    `attention_mask` is the (B, length) key mask those positions were computed under."""

    batch: int
    attention_mask: np.ndarray
    cache: object = None  # backend-specific
    stats: dict = field(default_factory=lambda: {"steps": 0, "tokens": 0})

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])


def check_feed(owner: str, name: str, array: np.ndarray, dtype: str, shape: tuple) -> None:
    """Raise a one-line InputError unless `array` has `dtype` and a shape matching `shape` (ints fixed, strings
    free): `decoder.onnx input 'position_ids': got shape (1, 7); expected (3, batch, seq)`."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"{owner} input '{name}': got {type(array).__name__}; expected a numpy array")
    if array.dtype != np.dtype(dtype):
        raise InputError(f"{owner} input '{name}': got dtype {array.dtype}; expected {dtype}")
    want = "(" + ", ".join(str(d) for d in shape) + ")"
    if array.ndim != len(shape) or any(isinstance(d, int) and a != d for a, d in zip(array.shape, shape)):
        raise InputError(f"{owner} input '{name}': got shape {tuple(array.shape)}; expected {want}")


class Backend(ABC):
    """One model's sub-graphs behind numpy calls. Use as a context manager: `with backend: ...`."""

    name: str = "abstract"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        pass

    @abstractmethod
    def vision(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Vision graph feeds (patches + grid indices) -> merged image tokens (M, H)."""

    @abstractmethod
    def embed(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, S, H) embeddings -> (B, H) L2-normalised embeddings (coarse-stage vectors)."""

    def icm_content(self, cand_tokens: np.ndarray, cand_mask: np.ndarray) -> np.ndarray:
        raise InputError(f"{self.name} backend: this model has no ICM; expected a Retrv-R1 pack")

    def icm_relation(self, cand_tokens, cand_mask, query_tokens, query_mask) -> np.ndarray:
        raise InputError(f"{self.name} backend: this model has no ICM; expected a Retrv-R1 pack")

    @abstractmethod
    def start(self, batch: int) -> DecoderState:
        """An empty cache for `batch` sequences."""

    @abstractmethod
    def step(self, state: DecoderState, inputs_embeds: np.ndarray, position_ids: np.ndarray,
             attention_mask: np.ndarray) -> np.ndarray:
        """Append (B, S, H) embeddings at (3, B, S) positions with a (B, S) key mask for the new positions;
        returns the last position's logits (B, V) and extends `state` in place."""


# Backends that live above the runtime register a factory `(pack, checkpoint) -> Backend` here when imported (the
# PyTorch fallback: `retrv.export.torch_backend`), so `open_backend` can offer them without importing upward.
_REGISTERED: dict = {}


def register_backend(name: str, factory) -> None:
    _REGISTERED[name] = factory


def registered_backend(name: str):
    return _REGISTERED.get(name)
