"""What `retrv serve` runs per request, without any HTTP: rerank a list of documents, search the index.

The HTTP layer (`retrv.app.serve`) calls `Engine.rerank` / `Engine.search` from its worker threads; this module
imports only the runtime, so it can be used (and tested) without FastAPI.

Rerank-only path (no index): the documents are the candidates. Each is encoded now (images through the pack's
vision encoder, cached by content hash in a byte-bounded LRU), the query and the documents are embedded for the
coarse similarity, the documents are sorted by it (the coarse list, K = number of documents), and the reasoning
reranker runs over that list with the same sliding windows as `retrv search`.

relevance_score (Cohere: in [0, 1], higher is more relevant). For final rank r (0 = best) of K documents, with s
the document's coarse cosine similarity mapped to [0, 1] as (cos + 1) / 2:

    relevance_score = (K - r - 0.5 + 0.5 * s) / K

Rank r's scores lie in [(K - r - 0.5) / K, (K - r) / K], disjoint from and above rank r + 1's, so the score is
strictly decreasing in our ranking whatever the similarities, and within a rank it carries the coarse similarity.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from retrv.runtime.errors import InputError
from retrv.runtime.rerank.budget import DEFAULT_K, DEFAULT_STRIDE, DEFAULT_WINDOW, Budget
from retrv.runtime.rerank.deadline import DeadlinePlanner, Timing

log = logging.getLogger(__name__)

DATA_URL_PREFIX = "data:image/"


class RequestRefused(InputError):
    """A request outside the service's limits; `status` is the HTTP status it answers with (413, 422, 400)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits, checked before any model work."""

    max_body_bytes: int = 32 << 20  # 32 MiB: a request of ~20 camera images as base64
    max_documents: int = 1000  # Cohere's own rerank limit per request
    max_text_chars: int = 32_768  # a document or query of this many characters is far past any window's context
    max_image_pixels: int = 4096 * 4096  # 16 MP: decoded RGB is 48 MB; larger is a denial of service, not a photo

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_documents", "max_text_chars", "max_image_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name}: got {v!r}; expected an integer >= 1")


def decode_image(value: str, name: str, limits: ServeLimits):
    """A `data:image/...;base64,...` URL -> (an RGB PIL image, the sha256 of its bytes). URLs of any other scheme
    are refused with 400: the service fetches nothing and reads no path on its own disk."""
    img, raw = decode_image_bytes(value, name, limits)
    return img, hashlib.sha256(raw).hexdigest()


def decode_image_bytes(value: str, name: str, limits: ServeLimits):
    """A `data:image/...;base64,...` URL -> (an RGB PIL image, the image file's bytes), checked as `decode_image`."""
    if not value.startswith(DATA_URL_PREFIX):
        scheme = value.split(":", 1)[0] if ":" in value[:16] else "a path"
        raise RequestRefused(f"{name}: got {scheme[:16]!r}; expected a data:image/...;base64, URL (the service "
                             f"fetches no URL and reads no path)", 400)
    head, _, payload = value.partition(",")
    if not head.endswith(";base64") or not payload:
        raise RequestRefused(f"{name}: got a data URL without ';base64,' and a payload; expected "
                             f"data:image/<type>;base64,<data>", 400)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRefused(f"{name}: the base64 payload does not decode; expected standard base64", 400) from None
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise RequestRefused(f"{name}: got {w}x{h} = {w * h:,} pixels; expected at most "
                                 f"{limits.max_image_pixels:,}", 422)
        img = img.convert("RGB")
    except RequestRefused:
        raise
    except Exception as e:  # PIL raises many types for a corrupt image
        raise RequestRefused(f"{name}: not a readable image ({type(e).__name__}); expected PNG/JPEG/WebP data",
                             400) from None
    return img, raw


@dataclass
class Document:
    text: str | None
    image: object = None  # PIL image or None
    image_sha256: str | None = None


def check_text(name: str, text, limits: ServeLimits) -> None:
    if text is not None and len(text) > limits.max_text_chars:
        raise RequestRefused(f"{name}: got {len(text):,} characters; expected at most {limits.max_text_chars:,}")


def parse_document(i: int, doc, limits: ServeLimits) -> Document:
    """A string (a data:image URL is an image document) or {"text": ..., "image": "data:..."}."""
    name = f"documents[{i}]"
    if isinstance(doc, str):
        if doc.startswith(DATA_URL_PREFIX):
            img, sha = decode_image(doc, name, limits)
            return Document(None, img, sha)
        if doc.startswith(("http://", "https://", "file:", "ftp://")):
            raise RequestRefused(f"{name}: got a {doc.split(':', 1)[0]} URL; expected text or a data:image/...;"
                                 f"base64, URL (the service fetches nothing)", 400)
        check_text(name, doc, limits)
        return Document(doc)
    if isinstance(doc, dict):
        text, image = doc.get("text"), doc.get("image")
        if text is not None and not isinstance(text, str) or image is not None and not isinstance(image, str):
            raise RequestRefused(f"{name}: got text/image of types {type(text).__name__}/{type(image).__name__}; "
                                 "expected strings")
        if not text and not image:
            raise RequestRefused(f"{name}: got neither text nor image; expected at least one")
        check_text(f"{name}.text", text, limits)
        img, sha = decode_image(image, f"{name}.image", limits) if image else (None, None)
        return Document(text or None, img, sha)
    raise RequestRefused(f"{name}: got {type(doc).__name__}; expected a string or an object with text/image")


class TokenCache:
    """Encoded documents by content hash (images' vision tokens; documents' vectors), least recently used first
    out, bounded in bytes."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[str, tuple[np.ndarray, tuple]] = OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: str):
        with self.lock:
            hit = self.items.get(key)
            if hit is None:
                self.misses += 1
                return None
            self.items.move_to_end(key)
            self.hits += 1
            return hit

    def put(self, key: str, value: tuple[np.ndarray, tuple]) -> None:
        with self.lock:
            if key in self.items or value[0].nbytes > self.max_bytes:
                return
            self.items[key] = value
            self.bytes += value[0].nbytes
            while self.bytes > self.max_bytes:
                _, (old, _) = self.items.popitem(last=False)
                self.bytes -= old.nbytes


def coarse_result(k: int):
    """A rerank that did not run (the deadline left no time for its prompts): the coarse order, token budget
    exhausted."""
    from retrv.runtime.rerank.budget import Usage
    from retrv.runtime.rerank.loop import RerankResult

    return RerankResult(order=list(range(k)), windows=[], usage=Usage(), exhausted=["token"], timings_ms={},
                        limits={})


def relevance_scores(order: list[int], similarity: np.ndarray) -> list[float]:
    """Final order (coarse positions, best first) and the coarse cosine similarities -> scores, best first."""
    k = len(order)
    s = np.clip((np.asarray(similarity, np.float64) + 1.0) / 2.0, 0.0, 1.0)
    return [float((k - r - 0.5 + 0.5 * s[i]) / k) for r, i in enumerate(order)]


class Engine:
    """The pack (and index) opened once; `rerank` and `search` are safe to call from several threads (ONNX
    Runtime's `run()` is; each call builds its own decode session)."""

    def __init__(self, pack, index=None, backend: str = "auto", threads: int | None = None,
                 limits: ServeLimits | None = None, cache_bytes: int = 256 << 20, inter_op_threads: int = 1) -> None:
        from retrv.runtime.backends import open_backend
        from retrv.runtime.retriever import Components, Retriever
        from retrv.runtime.rerank.loop import Reranker

        self.pack, self.index = pack, index
        self.limits = limits or ServeLimits()
        be = open_backend(pack, backend, threads=threads, inter_op_threads=inter_op_threads)
        if index is not None:
            self.retriever = Retriever(pack, index, backend=be)
            self.c, self.reranker = self.retriever.c, self.retriever.reranker
        else:
            self.retriever = None
            self.c = Components(pack, be)
            self.reranker = Reranker(be, self.c.tokenizer, self.c.cfg, self.c.table, method=pack.manifest.method,
                                     image_encoder=self.c.vision, fmt=pack.manifest.extra.get("rerank"))
        if index is not None:  # `add` encodes with this engine's session, not a second one of its own
            from retrv.runtime.retriever import CandidateEncoder

            index.use_encoder(CandidateEncoder(self.c))
        self.cache = TokenCache(cache_bytes)  # images' vision tokens
        self.vectors = TokenCache(cache_bytes // 8)  # documents' coarse vectors (a few KB each)
        self.planner = DeadlinePlanner.calibrate(self.reranker)  # per-token cost on this device, kept current

    @property
    def ms_per_token(self) -> float:
        return self.planner.ms_per_token

    # -- rerank ------------------------------------------------------------------------------------------------------
    def _image_tokens(self, docs: list[Document]) -> list[tuple]:
        out: list = [(None, None)] * len(docs)
        todo = []
        for i, d in enumerate(docs):
            if d.image is None:
                continue
            hit = self.cache.get(d.image_sha256)
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
        for i, enc in zip(todo, self.c.vision([docs[i].image for i in todo])):
            enc = (np.asarray(enc[0], np.float32), enc[1])
            self.cache.put(docs[i].image_sha256, enc)
            out[i] = enc
        return out

    def _doc_vectors(self, docs: list[Document], encoded: list[tuple]) -> np.ndarray:
        """The documents' coarse vectors, each computed once per content (text + image hash) while it stays in the
        byte-bounded LRU: a RAG stack reranks the same passages and pictures again and again."""
        from retrv.runtime.inputs.embedding import EmbedItem

        keys = [hashlib.sha256(f"{d.text or ''}\0{d.image_sha256 or ''}".encode()).hexdigest() for d in docs]
        found = [self.vectors.get(k) for k in keys]
        todo = [i for i, hit in enumerate(found) if hit is None]
        if todo:
            items = [EmbedItem(docs[i].text, encoded[i][0], encoded[i][1], image=docs[i].image) for i in todo]
            for i, v in zip(todo, self.c.embedder.embed(items, "candidate")):
                found[i] = (np.asarray(v, np.float32), None)
                self.vectors.put(keys[i], found[i])
        return np.stack([v for v, _ in found])

    def rerank(self, query: str, docs: list[Document], budget: Budget, window: int = DEFAULT_WINDOW,
               stride: int = DEFAULT_STRIDE, deadline_ms: float | None = None, arrived: float | None = None) -> dict:
        """-> {"order": final order as document indices, "scores": relevance scores best first, "meta": ...}."""
        from retrv.runtime.inputs.embedding import EmbedItem
        from retrv.runtime.rerank.prompt import CandidateInput, QueryInput

        clock = time.perf_counter
        arrived = arrived if arrived is not None else clock()
        timings = {"queue": (clock() - arrived) * 1e3}
        if not docs:
            raise RequestRefused("documents: got none; expected at least one")
        if len(docs) > self.limits.max_documents:
            raise RequestRefused(f"documents: got {len(docs):,}; expected at most {self.limits.max_documents:,}")
        check_text("query", query, self.limits)
        t0 = clock()
        encoded = self._image_tokens(docs)
        timings["vision"] = (clock() - t0) * 1e3
        t0 = clock()
        vectors = self._doc_vectors(docs, encoded)  # (K, H), L2-normalised
        qv = self.c.embedder.embed([EmbedItem(query)], "query")[0]  # (H,)
        sim = vectors @ qv  # (K,)
        timings["embed"] = (clock() - t0) * 1e3
        coarse = [int(i) for i in np.argsort(-sim, kind="stable")]
        cands = [CandidateInput(str(i), docs[i].text, encoded[i][0], encoded[i][1], score=float(sim[i]),
                                image=docs[i].image) for i in coarse]
        planned_at = clock()
        budget, plan = self.planner.plan(deadline_ms, (planned_at - arrived) * 1e3, budget, kind="rerank")
        t0 = clock()
        if plan.get("prompt_fits", True):
            r = self.reranker.rerank(QueryInput(query), cands, budget, window, stride)
        else:  # not even the prompts fit what is left of the deadline: the coarse order, now
            r = coarse_result(len(cands))
        rerank_ms = (clock() - t0) * 1e3
        timings.update({k: v for k, v in r.timings_ms.items()})
        timings["rerank"] = rerank_ms
        timings["total"] = (clock() - arrived) * 1e3
        token_ms = r.timings_ms.get("prefill", 0) + r.timings_ms.get("decode", 0)
        if r.windows:  # a skipped rerank says nothing about what one costs
            self.planner.observe(Timing.of(r, (clock() - planned_at) * 1e3 - token_ms), kind="rerank")
        order = [coarse[j] for j in r.order]
        pos = {d: j for j, d in enumerate(coarse)}
        scores = relevance_scores([pos[d] for d in order], sim[coarse])
        tokens = {"prefill_tokens": sum(w.prefill_tokens for w in r.windows), "think_tokens": r.usage.think,
                  "inspected": r.usage.inspect, "tool_calls": r.usage.tool, "total_tokens": r.usage.token,
                  "budget_exhausted": r.exhausted}
        meta = {"tokens": tokens, "timings_ms": {k: round(v, 3) for k, v in timings.items()},
                "flags": {"fallback": r.fallback, "forced_answer": r.forced, "answered": r.answered},
                "deadline": plan, "windows": len(r.windows), "method": self.reranker.method,
                "limits": {k: c.to_dict() for k, c in r.limits.items()},
                "cache": {"hits": self.cache.hits, "misses": self.cache.misses, "bytes": self.cache.bytes}}
        return {"order": order, "scores": scores, "meta": meta}

    # -- search ------------------------------------------------------------------------------------------------------
    def search(self, text: str | None, image, k: int = DEFAULT_K, budget: Budget | None = None,
               window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, rerank: bool = True,
               deadline_ms: float | None = None, arrived: float | None = None) -> dict:
        """What `retrv search --json` prints, plus "deadline" when one was given."""
        if self.retriever is None:
            raise RequestRefused("/v1/search: this server has no index; expected `retrv serve INDEX --pack PACK`",
                                 404)
        check_text("text", text, self.limits)
        clock = time.perf_counter
        arrived = arrived if arrived is not None else clock()
        planned_at = clock()
        budget, plan = self.planner.plan(deadline_ms, (planned_at - arrived) * 1e3, budget or Budget(),
                                         kind="search")
        result = self.retriever.search(text=text, image=image, k=k, budget=budget, window=window, stride=stride,
                                       rerank=rerank and plan.get("prompt_fits", True))
        if result.rerank is not None:
            r = result.rerank
            token_ms = r.timings_ms.get("prefill", 0) + r.timings_ms.get("decode", 0)
            self.planner.observe(Timing.of(r, (clock() - planned_at) * 1e3 - token_ms), kind="search")
        d = result.to_dict()
        if deadline_ms is not None:
            d["deadline"] = plan
        return d

    # -- documents ---------------------------------------------------------------------------------------------------
    def _writable_index(self):
        if self.index is None:
            raise RequestRefused("/v1/documents: this server has no index; expected `retrv serve INDEX --pack PACK`",
                                 404)
        return self.index

    def add_documents(self, docs: list[dict]) -> dict:
        """M-BEIR candidate rows ({"did", "txt", "modality", "image": data URL}) -> added to the index through its
        writer lock; images stored inside the index folder. A did already live answers 409."""
        from retrv.runtime.index.store import DuplicateCandidate, image_ext

        index = self._writable_index()
        if not docs or len(docs) > self.limits.max_documents:
            raise RequestRefused(f"documents: got {len(docs):,}; expected 1 to {self.limits.max_documents:,}")
        rows, images = [], {}
        for i, d in enumerate(docs):
            name = f"documents[{i}]"
            check_text(f"{name}.txt", d.get("txt"), self.limits)
            if not d.get("txt") and not d.get("image"):
                raise RequestRefused(f"{name}: got neither txt nor image; expected at least one")
            row = {k: d[k] for k in ("did", "txt", "modality") if d.get(k) is not None}
            if d.get("image") is not None:
                raw = decode_image_bytes(d["image"], f"{name}.image", self.limits)[1]
                image_ext(raw, d["did"])  # PNG, JPEG or WebP: what the index stores
                images[d["did"]] = raw
            rows.append(row)
        try:
            generation = index.add(rows, images=images)
        except DuplicateCandidate as e:
            raise RequestRefused(str(e), 409) from None
        return {"generation": generation, "added": len(rows), "count": index.meta.count}

    def delete_documents(self, dids: list[str]) -> dict:
        """Delete live candidates by did; an unknown did answers 404 and deletes nothing."""
        from retrv.runtime.index.store import UnknownCandidate

        index = self._writable_index()
        if not dids or len(dids) > self.limits.max_documents:
            raise RequestRefused(f"dids: got {len(dids):,}; expected 1 to {self.limits.max_documents:,}")
        try:
            generation = index.delete(dids)
        except UnknownCandidate as e:
            raise RequestRefused(str(e), 404) from None
        return {"generation": generation, "deleted": len(set(dids)), "count": index.meta.count}
