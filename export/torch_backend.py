"""PyTorch fallback backend: the project's own model behind the same numpy interface.

For machines without ONNX Runtime, and the path training uses. It lives in `retrv.export`, not in the runtime,
because it needs the PyTorch model (`retrv.model`) and the export graphs' pooling: the runtime never imports
upward. Importing this module registers it as the runtime's "torch" backend (`open_backend(pack, "torch")`); the
application layer imports it when `--backend torch` is asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retrv.runtime.backends.base import Backend, DecoderState, register_backend
from retrv.runtime.errors import InputError, require

logger = logging.getLogger(__name__)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model) -> None:
        self.torch = require("torch", "export")
        self.model = model.eval()

    @classmethod
    def for_pack(cls, pack, checkpoint: str | Path | None) -> "TorchBackend":
        """The fallback for a pack: its source checkpoint, loaded after checking that it is that source."""
        if checkpoint is None:
            raise InputError("--backend torch: needs --checkpoint CKPT (the checkpoint the pack was exported from)")
        check_source_checkpoint(pack, checkpoint)
        return cls.from_checkpoint(checkpoint)

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

    def vision(self, feeds, role: str = "vision"):
        if role != "vision":  # one model: a separate embedder's tower is not loaded here
            raise InputError(f"torch backend: vision role {role!r} is not served (it runs the reranker's own "
                             f"model); expected 'vision', or --backend ort/trt for a pack with a separate embedder")
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
            return self._np(self.model.icm.relation_shared(
                self._t(cand_tokens), self._t(cand_mask), self._t(query_tokens), self._t(query_mask)))

    def start(self, batch: int) -> DecoderState:
        from retrv.model.decoder import KVCache

        cache = KVCache.empty(self.model.cfg.text, batch, self.model.dtype, self.model.device)
        return DecoderState(batch=batch, attention_mask=np.zeros((batch, 0), dtype=np.int64), cache=cache)

    def extend(self, state, inputs_embeds, position_ids, mask):
        new = mask[:, state.length:]  # the model's cache keeps its own past mask; it takes the new positions'
        with self.torch.no_grad():
            logits, cache = self.model.decode(self._t(inputs_embeds), self._t(position_ids), self._t(new), state.cache)
        state.cache = cache
        return self._np(logits[:, -1])


def check_source_checkpoint(pack, checkpoint: str | Path) -> None:
    """Refuse a --checkpoint that is not the one `pack` was exported from: the PyTorch backend would run another
    model over the pack's tokenizer, embedding table and index, and rank meaninglessly.

    The exporter records `extra.source_fingerprint` (`retrv.model.files.source_fingerprint`: config, shard names
    and sizes, sampled weight bytes; about 1 MiB read per shard). A pack exported before it was recorded is
    checked on its model config alone and accepted with a warning: refusing would lock every older pack out of
    the fallback backend, and the config check already catches another architecture; what it cannot catch is
    another training run of the same architecture, which the warning says.
    """
    from retrv.model.config import read_config
    from retrv.model.files import source_fingerprint

    where = f"--checkpoint {checkpoint}"
    if read_config(checkpoint) != pack.model_config:
        raise InputError(f"{where}: its config.json differs from the model of pack {pack.path}; expected the "
                         f"checkpoint the pack was exported from")
    extra = pack.manifest.extra
    want = extra.get("source_fingerprint")
    if want is None:
        logger.warning("pack %s records no source fingerprint (exported by an older retrv-edge): --checkpoint %s "
                       "has the same model config, but whether it holds the same weights cannot be checked; "
                       "re-export the pack to record it", pack.path, checkpoint)
        return
    got = source_fingerprint(checkpoint)
    if got != want:
        source = extra.get("source_checkpoint")
        raise InputError(f"{where}: source fingerprint {got[:16]}; expected {str(want)[:16]} (pack {pack.path} was "
                         f"exported from {source!r}): not the pack's source checkpoint (other weights)")


register_backend("torch", TorchBackend.for_pack)
