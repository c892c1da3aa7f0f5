"""PyTorch fallback backend: the project's own model behind the same numpy interface.

For machines without ONNX Runtime, and the path training uses. torch is imported here and only here in the
runtime; `import retrv.runtime` never reaches this module unless a PyTorch backend is asked for.
"""

from __future__ import annotations

import numpy as np

from retrv.runtime.backends.base import Backend, DecoderState
from retrv.runtime.errors import require


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model) -> None:
        self.torch = require("torch", "export")
        self.model = model.eval()

    @classmethod
    def from_checkpoint(cls, path, dtype: str = "float32", device: str = "cpu") -> "TorchBackend":
        torch = require("torch", "export")
        from retrv.model.loading import load_checkpoint

        return cls(load_checkpoint(path, dtype=getattr(torch, dtype), device=device))

    def _t(self, a: np.ndarray):
        t = self.torch.from_numpy(np.ascontiguousarray(a)).to(self.model.device)
        return t.to(self.model.dtype) if t.is_floating_point() else t

    def _np(self, t) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    def vision(self, feeds):
        with self.torch.no_grad():
            order = ("patches", "position_ids", "window_index", "reverse_index", "window_segments", "image_segments")
            return self._np(self.model.visual(*(self._t(feeds[k]) for k in order)))

    def embed(self, inputs_embeds, position_ids, attention_mask):
        from retrv.export.graphs import EmbedderGraph  # the module the exported graphs use, so both agree

        with self.torch.no_grad():
            out = EmbedderGraph(self.model)(self._t(inputs_embeds), self._t(position_ids), self._t(attention_mask))
        return self._np(out)

    def icm_content(self, cand_tokens, cand_mask):
        if self.model.icm is None:
            return super().icm_content(cand_tokens, cand_mask)
        with self.torch.no_grad():
            return self._np(self.model.icm.content(self._t(cand_tokens), self._t(cand_mask)))

    def icm_relation(self, cand_tokens, cand_mask, query_tokens, query_mask):
        if self.model.icm is None:
            return super().icm_relation(cand_tokens, cand_mask, query_tokens, query_mask)
        with self.torch.no_grad():
            return self._np(self.model.icm.relation(
                self._t(cand_tokens), self._t(cand_mask), self._t(query_tokens), self._t(query_mask)))

    def start(self, batch: int) -> DecoderState:
        from retrv.model.decoder import KVCache

        cache = KVCache.empty(self.model.cfg.text, batch, self.model.dtype, self.model.device)
        return DecoderState(batch=batch, attention_mask=np.zeros((batch, 0), dtype=np.int64), cache=cache)

    def step(self, state, inputs_embeds, position_ids, attention_mask):
        with self.torch.no_grad():
            logits, cache = self.model.decode(
                self._t(inputs_embeds), self._t(position_ids), self._t(attention_mask.astype(np.int64)), state.cache
            )
        state.cache = cache
        state.attention_mask = np.concatenate([state.attention_mask, attention_mask.astype(np.int64)], axis=1)
        state.stats["steps"] += 1
        state.stats["tokens"] += int(inputs_embeds.shape[1])
        return self._np(logits[:, -1])
