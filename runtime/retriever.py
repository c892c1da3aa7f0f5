"""One query end to end: embed -> HNSW top-K -> cached candidate tokens -> ICM -> reasoning rerank under budgets.

    retriever = Retriever(Pack.open("pack/"), Index.open("index/"), backend="auto")
    result = retriever.search(text="a red dress with thin straps", k=50, budget=Budget(think=128, inspect=3))
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from retrv.runtime.backends import Backend, open_backend
from retrv.runtime.rerank.budget import DEFAULT_K, DEFAULT_STRIDE, DEFAULT_WINDOW, Budget
from retrv.runtime.inputs.corpus import Candidate
from retrv.runtime.inputs.dual_encoder import OptimumEmbedder, OptimumEmbedderConfig, is_optimum_spec
from retrv.runtime.inputs.embedding import EmbedItem, Embedder
from retrv.runtime.errors import InputError, PackError
from retrv.runtime.limits import Cap, check_text, context_of
from retrv.runtime.inputs.prompt import PromptTokenizer
from retrv.runtime.inputs.table import open_table
from retrv.runtime.inputs.vision import VisionEncoder
from retrv.runtime.rerank.loop import Reranker, RerankResult
from retrv.runtime.rerank.prompt import CandidateInput, PromptBuilder, QueryInput, pad_batch

logger = logging.getLogger(__name__)

class Components:
    """What every stage needs from a pack and a backend: tokenizer, embedding table, prompt builder, the vision
    encoder, embedder."""

    def __init__(self, pack, backend: Backend) -> None:
        self.pack, self.backend = pack, backend
        self.cfg = pack.model_config
        self.processor = pack.preprocessor
        self.tokenizer = PromptTokenizer(pack.file("tokenizer"))
        self.table = open_table(pack)  # the .npy, or the quantized LM head's rows (a tied head stored once)
        self.builder = PromptBuilder(self.tokenizer, self.cfg, self.table)
        self.vision = VisionEncoder(backend, self.cfg, self.processor)
        self.embedder = self._embedder(pack, backend)

    def _embedder(self, pack, backend: Backend):
        spec = pack.manifest.extra.get("embedder")  # checked by Pack.open when present
        optimum = is_optimum_spec(spec)
        if not pack.has("embedder") and not optimum:
            return Embedder(backend, self.builder)
        if not hasattr(backend, "runner"):
            raise InputError(f"{backend.name} backend: this pack has a separate embedder, which runs on ONNX Runtime; "
                             f"expected --backend ort (or auto)")
        if optimum:  # CLIP / SigLIP / a text encoder exported by optimum: its own graphs, tokenizer, preprocessing
            return OptimumEmbedder(backend, OptimumEmbedderConfig.from_dict(spec), pack.file("embedder_tokenizer"))
        from retrv.runtime.config import ModelConfig
        from retrv.runtime.inputs.preprocess import ImageProcessorConfig

        if spec is None:
            raise PackError(f"{pack.path}: lists an 'embedder' graph but no extra.embedder configs; expected both "
                            f"(written by `retrv export --embedder`)")
        cfg, proc = ModelConfig.from_dict(spec["model"]), ImageProcessorConfig.from_dict(spec["preprocessor"])
        table = np.load(pack.file("embedder_embed_tokens"), mmap_mode="r", allow_pickle=False)
        builder = PromptBuilder(PromptTokenizer(pack.file("embedder_tokenizer")), cfg, table)
        return Embedder(backend, builder, image_encoder=VisionEncoder(backend, cfg, proc, role="embedder_vision"))


@dataclass
class EncodedCandidate:
    tokens: np.ndarray  # (L, H); L = 0 for a text-only candidate
    grid: tuple[int, int, int] | None
    t_con: np.ndarray | None


@dataclass
class EncodedBatch:
    items: list[EncodedCandidate]
    vectors: np.ndarray  # (n, H)


class CandidateEncoder:
    """Index-time work per candidate: vision tokens (cached), t_con (cached), the coarse-stage vector."""

    def __init__(self, components: Components) -> None:
        self.c = components
        self.hidden = components.cfg.text.hidden_size
        self.dim = components.embedder.dim  # the coarse vectors' width: the embedder's, which may differ
        self.has_t_con = components.cfg.icm is not None
        self.pack_sha256 = components.pack.sha256
        self.template = components.embedder.describe()

    def encode(self, cands: list[Candidate]) -> EncodedBatch:
        context = context_of(self.c.cfg)
        for c in cands:  # before any tokenizing: a text that cannot fit is refused, whatever its length
            check_text(f"candidate {c.did!r} text", c.txt, context)
        with_image = [c for c in cands if c.img_path]
        encoded = dict(zip((c.did for c in with_image), self.c.vision([c.img_path for c in with_image])))
        empty = np.zeros((0, self.hidden), np.float32)
        items = []
        for c in cands:
            tokens, grid = encoded.get(c.did, (empty, None))
            items.append(EncodedCandidate(np.asarray(tokens, np.float32), grid, None))
        if self.has_t_con:
            inputs = [CandidateInput(c.did, c.txt, e.tokens if len(e.tokens) else None, e.grid)
                      for c, e in zip(cands, items)]
            t_con = self.c.backend.icm_content(*pad_batch([self.c.builder.candidate_tokens(x) for x in inputs]))
            for e, t in zip(items, t_con):
                e.t_con = np.asarray(t, np.float32)
        vectors = self.c.embedder.embed(
            [EmbedItem(c.txt, e.tokens if len(e.tokens) else None, e.grid, image=c.img_path)
             for c, e in zip(cands, items)], "candidate")
        return EncodedBatch(items, vectors)


@dataclass
class SearchResult:
    ranked: list[dict]  # [{"did", "score", "coarse_rank"}], best first
    answer: str | None
    rerank: RerankResult | None
    timings_ms: dict = field(default_factory=dict)
    limits: dict[str, Cap] = field(default_factory=dict)  # requests capped (k to the index, budgets to the context)

    def to_dict(self, trace: bool = True) -> dict:
        r = self.rerank
        tokens = {"prefill_tokens": 0, "think_tokens": 0, "inspected": 0, "tool_calls": 0, "total_tokens": 0,
                  "budget_exhausted": []}
        flags = {"reranked": r is not None, "fallback": False, "forced_answer": False}
        windows = []
        if r is not None:
            tokens.update(prefill_tokens=sum(w.prefill_tokens for w in r.windows), think_tokens=r.usage.think,
                          inspected=r.usage.inspect, tool_calls=r.usage.tool, total_tokens=r.usage.token,
                          budget_exhausted=r.exhausted)
            flags.update(fallback=r.fallback, forced_answer=r.forced)
            windows = [{"start": w.start, "choice": w.choice, "ranking": w.ranking, "forced": w.forced,
                        "fallback": w.fallback, "inspected": w.inspected, "repairs": w.repairs,
                        "tokens": w.usage.token,
                        "tool_calls": [{k: c[k] for k in ("name", "ok")} for c in w.tool_calls],
                        **({"text": w.text} if trace else {})} for w in r.windows]
        return {"ranked": self.ranked, "answer": self.answer, "tokens": tokens, "flags": flags, "windows": windows,
                "limits": {k: c.to_dict() for k, c in self.limits.items()},
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}


class Retriever:
    def __init__(self, pack, index, backend: Backend | str = "auto", **backend_kwargs) -> None:
        if index.meta.pack_sha256 != pack.sha256:
            raise InputError(f"index {index.path}: built with another pack; expected one built with {pack.path}")
        self.pack, self.index = pack, index
        self.backend = backend if isinstance(backend, Backend) else open_backend(pack, backend, **backend_kwargs)
        self.c = Components(pack, self.backend)
        # The method comes from the manifest: "retrv-r1" (ICM, inspection) or "listwise" (V-Retrver tools), and
        # for listwise its prompt and answer format (`extra["rerank"]`; a pack without it gets the defaults).
        self.reranker = Reranker(self.backend, self.c.tokenizer, self.c.cfg, self.c.table,
                                 method=pack.manifest.method, image_encoder=self.c.vision,
                                 fmt=pack.manifest.extra.get("rerank"))

    def search(self, text: str | None = None, image=None, k: int = DEFAULT_K, budget: Budget | None = None,
               window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, rerank: bool = True) -> SearchResult:
        if text is None and image is None:
            raise InputError("search: got neither --text nor --image; expected at least one")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k: got {k!r}; expected an integer >= 1")
        k = int(k)
        check_text("query text", text, context_of(self.c.cfg))
        clock, timings = time.perf_counter, {}
        t_start = t0 = clock()
        q_tokens, q_grid = (None, None)
        if image is not None:
            q_tokens, q_grid = self.c.vision([image])[0]
        timings["vision"] = (clock() - t0) * 1e3
        t0 = clock()
        vector = self.c.embedder.embed([EmbedItem(text, q_tokens, q_grid, image=image)], "query")
        timings["embed"] = (clock() - t0) * 1e3
        t0 = clock()
        snap = self.index.snapshot()  # one generation for the whole query: labels, rows and tokens agree
        labels, scores = snap.search(vector, k)
        labels, scores = labels[0].tolist(), scores[0].tolist()
        timings["search"] = (clock() - t0) * 1e3
        ranked = [{"did": snap.row(lab)["did"], "score": float(s), "coarse_rank": i}
                  for i, (lab, s) in enumerate(zip(labels, scores))]
        result = SearchResult(ranked=ranked, answer=None, rerank=None, timings_ms=timings)
        if len(ranked) < k:
            result.limits["k"] = Cap(k, len(ranked), f"the index holds {len(ranked)} candidates")
        if rerank and labels:
            t0 = clock()
            cands = [self._candidate(snap, lab, s) for lab, s in zip(labels, scores)]
            timings["cache"] = (clock() - t0) * 1e3
            r = self.reranker.rerank(QueryInput(text, q_tokens, q_grid, image=image), cands, budget or Budget(),
                                     window, stride)
            timings.update(r.timings_ms)
            result.ranked = [ranked[i] for i in r.order]
            result.rerank = r
            result.limits.update(r.limits)
            result.answer = result.ranked[0]["did"] if r.answered else None
        timings["total"] = (clock() - t_start) * 1e3
        return result

    @staticmethod
    def _candidate(snap, label: int, score: float) -> CandidateInput:
        row, cache = snap.row(label), snap.cache
        tokens = cache.tokens(label)
        return CandidateInput(
            did=row["did"], text=row.get("txt") or None,
            image_tokens=tokens if len(tokens) else None, grid=cache.grid(label),
            t_con=cache.t_con([label])[0] if cache.has_t_con else None, score=score,
            image=row.get("img_path") or None,
        )
