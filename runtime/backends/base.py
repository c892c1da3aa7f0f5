"""The interface every backend (ONNX Runtime, TensorRT, PyTorch) implements.

The runtime's loops (generation, reranking) talk to a `Backend` only, in numpy. A backend owns the decoder's KV
cache in whatever form is cheapest for it (OrtValues, device buffers, torch tensors); the loop sees a `DecoderState`
it passes back on every step and never looks inside. `step` is written once, here: it extends the key mask and
counts steps and tokens; a backend implements `extend`, the one thing that differs, moving its cache forward.
Backends built from a pack's graphs share everything else (`graph.GraphBackend`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from retrv.runtime.backends.runner import check_feed  # noqa: F401  (re-exported)
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
    def vision(self, feeds: dict[str, np.ndarray], role: str = "vision") -> np.ndarray:
        """Vision graph feeds (patches + grid indices) -> merged image tokens (M, H). `role`: "vision" (the
        reranker's tower) or "embedder_vision" (a separate embedder's, in a pack exported with `--embedder`)."""

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

    def step(self, state: DecoderState, inputs_embeds: np.ndarray, position_ids: np.ndarray,
             attention_mask: np.ndarray) -> np.ndarray:
        """Append (B, S, H) embeddings at (3, B, S) positions with a (B, S) key mask for the new positions;
        returns the last position's logits (B, V) and extends `state` in place."""
        mask = np.concatenate([state.attention_mask, attention_mask.astype(np.int64)], axis=1)  # (B, past + S)
        logits = self.extend(state, inputs_embeds, position_ids, mask)
        state.attention_mask = mask
        state.stats["steps"] += 1
        state.stats["tokens"] += int(inputs_embeds.shape[1])
        return logits

    @abstractmethod
    def extend(self, state: DecoderState, inputs_embeds: np.ndarray, position_ids: np.ndarray,
               mask: np.ndarray) -> np.ndarray:
        """Run the decoder over the new positions and move `state.cache` forward; `mask` is the (B, past + S)
        key mask (`state.attention_mask` still holds the past's). Returns the last position's logits (B, V)."""


# Backends that live above the runtime register a factory `(pack, checkpoint) -> Backend` here when imported (the
# PyTorch fallback: `retrv.export.torch_backend`), so `open_backend` can offer them without importing upward.
_REGISTERED: dict = {}


def register_backend(name: str, factory) -> None:
    _REGISTERED[name] = factory


def registered_backend(name: str):
    return _REGISTERED.get(name)
