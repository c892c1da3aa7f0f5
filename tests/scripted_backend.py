"""A scripted language model: a backend that emits a given token sequence, for testing the reranking loop.

It prefers `script[p]` at every step and advances `p` when the loop feeds that token back (recognised by an exact
match of the fed embedding against the table), so appended content (inspections, markers, forced answers) does
not consume the script. After the script it emits `end_token` (eos by default). When the loop constrains the next
token, the remaining preference order is `fallback_order` (then token id), so forced answers are deterministic.
"""

from __future__ import annotations

import numpy as np

from retrv.runtime.backends.base import Backend, DecoderState


class ScriptedBackend(Backend):
    name = "scripted"

    def __init__(self, embed_table: np.ndarray, script: list[int], end_token: int,
                 fallback_order: list[int] | None = None, hidden: int | None = None) -> None:
        self.table = np.asarray(embed_table, dtype=np.float32)
        self.vocab, self.hidden = self.table.shape[0], hidden or self.table.shape[1]
        self.script, self.end_token = list(script), end_token
        self.fallback_order = list(fallback_order or [])
        self._row_to_id = {self.table[i].tobytes(): i for i in range(self.vocab)}
        self.calls: list[int] = []  # tokens fed per step, for assertions

    def _logits(self, p: int) -> np.ndarray:
        logits = -np.arange(self.vocab, dtype=np.float32) * 1e-3  # ties broken towards low ids
        for rank, t in enumerate(self.fallback_order):
            logits[t] = 5.0 - rank * 1e-2
        logits[self.script[p] if p < len(self.script) else self.end_token] = 10.0
        return logits[None]

    def start(self, batch: int) -> DecoderState:
        return DecoderState(batch=batch, attention_mask=np.zeros((batch, 0), np.int64), cache={"p": 0})

    def extend(self, state, inputs_embeds, position_ids, mask):
        p = state.cache["p"]
        first = self._row_to_id.get(np.asarray(inputs_embeds[0, 0], dtype=np.float32).tobytes())
        if p < len(self.script) and first == self.script[p] and state.length > 0:
            p += 1
        state.cache["p"] = p
        self.calls.append(int(inputs_embeds.shape[1]))
        return self._logits(p)

    def vision(self, feeds, role="vision"):
        n = feeds["window_index"].shape[0]
        return np.zeros((n, self.hidden), np.float32)

    def embed(self, inputs_embeds, position_ids, attention_mask):
        out = inputs_embeds[:, -1].astype(np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def icm_content(self, cand_tokens, cand_mask):
        return cand_tokens[:, 0].astype(np.float32)

    def icm_relation(self, cand_tokens, cand_mask, query_tokens, query_mask):
        return cand_tokens[:, -1].astype(np.float32)
