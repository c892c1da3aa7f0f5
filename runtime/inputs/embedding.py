"""Coarse-stage embeddings: queries and candidates as short chat-framed sequences, pooled by the backend.

LamRA-style: the backbone reads `[image] text` plus a role instruction, and the L2-normalised last hidden state
is the vector. Queries and candidates get different instructions (asymmetric retrieval); the training path uses
these same templates. Batches are left-padded so the last position is every row's last real token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from retrv.runtime.errors import InputError
from retrv.runtime.limits import check_tokens, context_of
from retrv.runtime.rerank.prompt import Piece, PromptBuilder


@dataclass(frozen=True)
class EmbedTemplate:
    query_instruction: str = "Find the matching item."
    candidate_instruction: str = "Describe this item for search."

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EmbedItem:
    text: str | None = None
    image_tokens: np.ndarray | None = None  # (M, H), the reranker's vision tokens (reused when they are ours)
    grid: tuple[int, int, int] | None = None
    image: object = None  # the source image: a separate embedder encodes it with its own vision tower


class Embedder:
    """`image_encoder` is None when the embedder is the reranker's own backbone (the item's image tokens are reused);
    a separate embedder passes its own vision encoder and builder (tokenizer, table, config)."""

    def __init__(self, backend, builder: PromptBuilder, template: EmbedTemplate | None = None,
                 image_encoder=None) -> None:
        self.backend, self.builder = backend, builder
        self.t = template or EmbedTemplate()
        self.image_encoder = image_encoder

    @property
    def dim(self) -> int:
        """The vectors' width: the embedding model's hidden size."""
        return self.builder.cfg.text.hidden_size

    def describe(self) -> dict:
        """What the index records about how its vectors were made: the role instructions."""
        return self.t.to_dict()

    def _own_tokens(self, items: list[EmbedItem]) -> list[EmbedItem]:
        if self.image_encoder is None:
            return items
        with_image = [it for it in items if it.image is not None]
        encoded = iter(self.image_encoder([it.image for it in with_image]))
        out = []
        for it in items:
            tokens, grid = next(encoded) if it.image is not None else (None, None)
            out.append(EmbedItem(it.text, tokens, grid, it.image))
        return out

    def pieces(self, item: EmbedItem, role: str) -> list[Piece]:
        if role not in ("query", "candidate"):
            raise InputError(f"role: got {role!r}; expected 'query' or 'candidate'")
        if item.text is None and item.image_tokens is None:
            raise InputError(f"{role}: got neither text nor image; expected at least one")
        b = self.builder
        out = [b.text(b.chat.open_turn("user"))]
        if item.image_tokens is not None:
            out += b.image(item.image_tokens, item.grid)
        if item.text:
            out.append(b.text(item.text))
        instruction = self.t.query_instruction if role == "query" else self.t.candidate_instruction
        out.append(b.text(f"\n{instruction}" + b.chat.handover("assistant")))
        return out

    def embed(self, items: list[EmbedItem], role: str) -> np.ndarray:
        """-> (n, H) float32, L2-normalised."""
        items = self._own_tokens(items)
        seqs = [self.builder.assemble(self.pieces(it, role), 0) for it in items]
        for ids, _, _ in seqs:  # one sequence per item: each must fit the embedding model's context
            check_tokens(role, len(ids), context_of(self.builder.cfg))
        longest = max(len(ids) for ids, _, _ in seqs)
        h = seqs[0][1].shape[1]
        embeds = np.zeros((len(seqs), longest, h), np.float32)
        pos = np.ones((3, len(seqs), longest), np.int64)  # padding positions are never attended
        mask = np.zeros((len(seqs), longest), np.int64)
        for r, (ids, e, p) in enumerate(seqs):
            embeds[r, longest - len(ids):] = e
            pos[:, r, longest - len(ids):] = p[:, 0]
            mask[r, longest - len(ids):] = 1
        return np.asarray(self.backend.embed(embeds, pos, mask), dtype=np.float32)
