"""A backend made of a pack's graphs, one runner per graph: what ONNX Runtime and TensorRT share.

Vision towers, the embedder (a separate one, or the decoder's own pooled `embedding` output run with an empty
cache) and the ICM are one `runner.infer(feed)` each, written here once. A subclass says how a graph's runner opens
(`open_runner`: an ONNX Runtime session, a TensorRT engine) and keeps the decoder's cache (`start`, `extend`).
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from retrv.runtime.backends.base import Backend
from retrv.runtime.backends.runner import Runner


class GraphBackend(Backend):
    """`pack`'s graphs behind the `Backend` interface; runners open on first use (a text-only query never loads
    the vision graph) and close with the backend."""

    def __init__(self, pack) -> None:
        self.pack = pack
        self._runners: dict[str, Runner] = {}
        t = pack.model_config.text
        self.num_layers, self.kv_heads, self.head_dim = t.num_hidden_layers, t.num_key_value_heads, t.head_dim

    @abstractmethod
    def open_runner(self, role: str) -> Runner:
        """The runner for the pack's graph `role` ("vision", "decoder", "embedder", ...)."""

    def runner(self, role: str) -> Runner:
        if role not in self._runners:
            self._runners[role] = self.open_runner(role)
        return self._runners[role]

    def close(self) -> None:
        for r in self._runners.values():
            r.close()
        self._runners.clear()

    def vision(self, feeds, role: str = "vision"):
        return self.runner(role).infer(feeds)["image_tokens"].astype(np.float32, copy=False)

    def embed(self, inputs_embeds, position_ids, attention_mask):
        feed = {"inputs_embeds": inputs_embeds, "position_ids": position_ids, "attention_mask": attention_mask}
        if self.pack.has("embedder"):  # a separate embedder model
            return self.runner("embedder").infer(feed)["embedding"]
        # The default embedder is the decoder's own `embedding` output, run with an empty cache.
        runner = self.runner("decoder")
        b = inputs_embeds.shape[0]
        for name, ts in runner.spec["inputs"].items():
            if name.startswith("past_"):
                feed[name] = np.zeros((b, self.kv_heads, 0, self.head_dim), dtype=ts["dtype"])
        return runner.infer(feed, ["embedding"])["embedding"]

    def icm_content(self, cand_tokens, cand_mask):
        if not self.pack.has("icm_content"):
            return super().icm_content(cand_tokens, cand_mask)
        out = self.runner("icm_content").infer({"cand_tokens": cand_tokens, "cand_mask": cand_mask})["t_con"]
        return out.astype(np.float32, copy=False)

    def icm_relation(self, cand_tokens, cand_mask, query_tokens, query_mask):
        if not self.pack.has("icm_relation"):
            return super().icm_relation(cand_tokens, cand_mask, query_tokens, query_mask)
        feed = {"cand_tokens": cand_tokens, "cand_mask": cand_mask, "query_tokens": query_tokens,
                "query_mask": query_mask}
        return self.runner("icm_relation").infer(feed)["t_rel"].astype(np.float32, copy=False)
