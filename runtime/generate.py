"""Greedy generation over any backend, in numpy: the loop `retrv generate` and `--verify` run.

prompt + images -> chat template with image placeholders -> vision graph -> embedding lookup with image tokens
scattered in -> M-RoPE positions -> prefill -> one token at a time until eos or the limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrv.runtime.config import ModelConfig
from retrv.runtime.inputs import positions
from retrv.runtime.backends.base import Backend
from retrv.runtime.errors import InputError
from retrv.runtime.limits import Cap, cap, check_text, check_tokens, context_of
from retrv.runtime.decode import DecodeSession
from retrv.runtime.inputs.preprocess import ImageProcessorConfig
from retrv.runtime.inputs.prompt import PromptTokenizer
from retrv.runtime.inputs.table import open_table
from retrv.runtime.inputs.vision import VisionEncoder
from retrv.runtime.rerank.prompt import PromptBuilder


@dataclass
class GenerationResult:
    prompt_ids: list[int]  # exactly what the decoder saw (template and image placeholders expanded)
    token_ids: list[int]
    text: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    limits: dict[str, Cap] = field(default_factory=dict)  # requests capped to fit the context, by name

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text,
                "limits": {k: c.to_dict() for k, c in self.limits.items()},
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}


class Generator:
    def __init__(self, backend: Backend, tokenizer: PromptTokenizer, cfg: ModelConfig,
                 processor: ImageProcessorConfig, embed_table: np.ndarray) -> None:
        if embed_table.ndim != 2 or embed_table.shape != (cfg.text.vocab_size, cfg.text.hidden_size):
            raise InputError(f"embed_tokens: got shape {embed_table.shape}; expected "
                             f"({cfg.text.vocab_size}, {cfg.text.hidden_size})")
        self.backend, self.tokenizer, self.cfg, self.processor = backend, tokenizer, cfg, processor
        self.embed_table = embed_table
        self.builder = PromptBuilder(tokenizer, cfg, embed_table)  # the prompt renderer the decode session feeds
        self.vision = VisionEncoder(backend, cfg, processor)

    @classmethod
    def from_pack(cls, pack, backend: Backend) -> "Generator":
        table = open_table(pack)  # the .npy, or the quantized LM head's rows (a tied head stored once)
        return cls(backend, PromptTokenizer(pack.file("tokenizer")), pack.model_config, pack.preprocessor, table)

    # -- pieces the reranker reuses ------------------------------------------------------------------------------
    def lookup(self, ids) -> np.ndarray:
        """Token ids -> (S, H) float32 embeddings from the (memory-mapped or quantized) table."""
        return np.asarray(self.embed_table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def encode_images(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images (paths, PIL, arrays) -> (merged tokens (M, H), grids (n, 3))."""
        return self.vision.encode(images)

    def text_ids(self, text: str, name: str = "text") -> list[int]:
        """A user-supplied text fragment's ids, refused first when too long to fit the context."""
        check_text(name, text, context_of(self.cfg))
        return self.tokenizer.encode_text(text)

    def render(self, prompt: str, grids: np.ndarray) -> list[int]:
        check_text("prompt", prompt, context_of(self.cfg))
        merge = self.cfg.vision.spatial_merge_size ** 2
        content = [{"type": "image"} for _ in range(len(grids))] + [{"type": "text", "text": prompt}]
        counts = [int(np.prod(g)) // merge for g in grids]
        return self.tokenizer.render([{"role": "user", "content": content}], counts)

    def prompt_embeds(self, ids: list[int], image_tokens: np.ndarray | None) -> np.ndarray:
        embeds = self.lookup(ids)  # (S, H)
        slots = np.flatnonzero(np.asarray(ids) == self.cfg.tokens.image_token_id)
        n_tokens = 0 if image_tokens is None else image_tokens.shape[0]
        if slots.size != n_tokens:
            raise InputError(f"prompt: got {slots.size} image placeholder tokens; expected {n_tokens}")
        if n_tokens:
            embeds[slots] = image_tokens
        return embeds

    # -- the loop --------------------------------------------------------------------------------------------------
    def generate(self, prompt: str, images=(), max_new_tokens: int = 32, stop_at_eos: bool = True) -> GenerationResult:
        """Prompt and generated tokens together never exceed the model's context: a larger `max_new_tokens` is
        capped (and reported in `limits`); a prompt that alone fills the context is refused."""
        n = max_new_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"max_new_tokens: got {n!r}; expected an integer >= 1")
        max_new_tokens = int(n)
        context = context_of(self.cfg)
        check_text("prompt", prompt, context)
        timings: dict[str, float] = {}
        clock = time.perf_counter

        t0 = clock()
        image_tokens, grids = (None, np.zeros((0, 3), np.int64))
        if images:
            image_tokens, grids = self.encode_images(images)
        timings["vision"] = (clock() - t0) * 1e3

        t0 = clock()
        ids = self.render(prompt, grids)
        check_tokens("prompt", len(ids), context, room=1, why="one generated token")
        max_new_tokens, capped = cap(max_new_tokens, context - len(ids), f"context {context} - prompt {len(ids)}")
        embeds = self.prompt_embeds(ids, image_tokens)
        pos, _ = positions.rope_index(
            np.asarray([ids]), grids if len(grids) else None, None,
            image_token_id=self.cfg.tokens.image_token_id, spatial_merge_size=self.cfg.vision.spatial_merge_size,
        )
        timings["prepare"] = (clock() - t0) * 1e3

        t0 = clock()
        session = DecodeSession(self.backend, self.builder)
        session.feed_inputs(list(ids), embeds, pos)
        timings["prefill"] = (clock() - t0) * 1e3

        t0 = clock()
        eos = set(self.cfg.tokens.eos_token_ids) if stop_at_eos else set()
        tokens: list[int] = []
        for step in range(max_new_tokens):
            token = session.choose()
            tokens.append(token)
            if token in eos or step == max_new_tokens - 1:
                break
            session.feed_token(token)
        timings["decode"] = (clock() - t0) * 1e3
        if len(tokens) > 1:
            timings["ms_per_token"] = timings["decode"] / (len(tokens) - 1)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return GenerationResult(prompt_ids=list(ids), token_ids=tokens, text=text, timings_ms=timings,
                                limits={"max_new_tokens": capped} if capped else {})


def load_pack_generator(pack_dir: str | Path, backend: str = "auto", **backend_kwargs) -> Generator:
    """Open a pack and a backend for it (`open_backend`'s; generation serves 'auto' and 'ort')."""
    from retrv.runtime.backends import open_backend
    from retrv.runtime.pack import Pack

    pack = Pack.open(pack_dir)
    if backend not in ("auto", "ort"):
        raise InputError(f"backend: got {backend!r}; expected 'auto' or 'ort' for a pack")
    return Generator.from_pack(pack, open_backend(pack, "ort", **backend_kwargs))
