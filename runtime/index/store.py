"""The index a query searches: candidate rows, their HNSW vectors and their cached tokens, in versioned generations.

    INDEX/
      index.json          the commit record, written last and atomically: kind, format_version, generation N, the
                          index parameters (pack fingerprint, metric, M, ef_construction, ef_search, count, dim),
                          and every file of generation N with its size and sha256
      .lock               the writers' lock (flock: one writer at a time, across threads and processes)
      images/             candidate images given inline (`add(images=...)`, `POST /v1/documents`), named by their
                          sha256; listed in index.json (those live rows use) and verified like the other files
      cache/              the candidate token cache's data files (int8 tokens, scales, grids, t_con): append-only,
                          shared by every generation
      g00000N/
        candidates.jsonl  one row per label: did, txt, img_path (absolute, or images/<sha256>.<ext> inside the
                          folder), modality, deleted
        cache.json        the token cache's description of generation N: a prefix of each file in cache/
        ann/              the HNSW graph over the candidates' vectors (hnsw.bin + ann.json)

Labels are candidate positions in the token cache, so a row, its cached tokens and its vector share one integer.

**Updates are generations with an atomic switch** (docs/ARCHITECTURE.md, "Index generations"). `add` and `delete`
take the writer lock, read the committed generation N from disk, write generation N+1 beside it (appending to the
token cache's files, whose generation-N description still covers exactly their old prefix), fsync it, and commit by
replacing `index.json` (temp file + rename). A kill -9 at any moment leaves index.json naming N (complete, never
touched) or N+1 (complete: fsynced before the commit). The next writer deletes what a killed one left: generations
other than N and N-1 (N-1 stays for a reader that is still opening it), temporary files, and token-cache bytes past
N's prefix, and images/ files that neither N nor N-1 uses (a killed add's; a deleted candidate's, once no
generation a reader may hold still uses it).

**Readers never see a half-applied update.** An `Index` serves searches from an immutable `IndexSnapshot` (rows,
ANN, token cache of one generation) that a writer replaces in one assignment after its commit; a search takes the
snapshot once, so its labels, rows and tokens always agree. Other processes' commits are picked up on the next
`search`/`snapshot()` (one `stat` of index.json per call) or on `refresh()`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from retrv.runtime.errors import IndexFileError, InputError, RetrvError
from retrv.runtime.folder import WriterLock
from retrv.runtime.fsutil import atomic_dir, atomic_write_bytes, atomic_write_text
from retrv.runtime.index.ann import DEFAULT_EF_CONSTRUCTION, DEFAULT_EF_SEARCH, DEFAULT_M, HnswIndex, HnswParams
from retrv.runtime.index.generations import (ANN_DIR, CACHE_DIR, IMAGES_DIR, INDEX_FORMAT_VERSION, INDEX_JSON, ROWS,
                                             Head, IndexMeta, IndexSnapshot, check_consistent, clean, clean_images,
                                             commit, fsync_generation, gen_dir, hnsw_params, image_names, load,
                                             read_head, stamp_of, write_rows)
from retrv.runtime.index.milvus import LOCAL_DB, MilvusStore, MilvusView, MilvusWriter, StoreSpec, release_local
from retrv.runtime.index.token_cache import CACHE_JSON, TokenCache, TokenCacheWriter
from retrv.runtime.inputs.corpus import Candidate, candidates_from_rows, read_candidates

log = logging.getLogger(__name__)

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))


class DuplicateCandidate(InputError):
    """`add` was given a did the index already holds live (HTTP 409)."""


class UnknownCandidate(InputError):
    """`delete` was given a did the index does not hold live (HTTP 404)."""


def image_ext(raw: bytes, did: str = "") -> str:
    """The file extension of an image's bytes, from its signature: png, jpg or webp; anything else is refused."""
    for magic, ext in _MAGIC:
        if raw.startswith(magic):
            return ext
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    raise InputError(f"images[{did!r}]: starts with {bytes(raw[:8])!r}; expected PNG, JPEG or WebP data")


class Index:
    """An index directory: search it from any number of threads while one writer at a time adds and deletes.

        index = Index.open("index/", pack=pack)              # verified before it returns
        index.add([{"did": "x1", "txt": "a red dress", "img_path": "x1.jpg"}])   # encoded with the pack
        index.delete(["x0"])
        labels, scores = index.search(vectors, k=50)

    `pack`: the pack the index was built with (refused otherwise); with it the index can encode what `add` is
    given (the backend opens on the first add). `auto_refresh`: pick up other processes' commits on each search.
    """

    def __init__(self, root: Path, head: Head, snap: IndexSnapshot, verify: str = "full", pack=None,
                 auto_refresh: bool = True, backend: str = "auto", backend_kwargs: dict | None = None) -> None:
        self.path = root
        self._head, self._snap = head, snap
        self._verify, self._auto_refresh = verify, auto_refresh
        self._pack, self._backend_name, self._backend_kwargs = pack, backend, backend_kwargs or {}
        self._encoder = None
        self._refresh_lock = threading.Lock()
        self._refused_stamp: tuple = ()
        self._token_store = None  # None: each generation's own token cache; else a TokenStore (use_token_store)
        self._with_tokens: IndexSnapshot | None = None

    # -- open -------------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, pack=None, verify: str = "full", backend: str = "auto",
             auto_refresh: bool = True, **backend_kwargs: Any) -> "Index":
        if verify not in ("full", "size"):
            raise InputError(f"verify: got {verify!r}; expected 'full' or 'size'")
        root = Path(path)
        head, snap = load(root, verify)
        if pack is not None and pack.sha256 != head.meta.pack_sha256:
            raise IndexFileError(f"{root}: built with pack {head.meta.pack_sha256[:12]}; expected the pack given "
                                 f"({pack.sha256[:12]}): rebuild the index with this pack")
        return cls(root, head, snap, verify, pack, auto_refresh, backend, backend_kwargs)

    # -- build ------------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, encoder, corpus: str | Path | list, out: str | os.PathLike, m: int = DEFAULT_M,
              ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef_search: int = DEFAULT_EF_SEARCH, batch: int = 8,
              image_root: str | os.PathLike | None = None, backend: str = "auto", vector_store: str = "hnsw",
              **backend_kwargs: Any) -> "Index":
        """`encoder`: a `Pack` (its backend is opened here) or a `CandidateEncoder`. `corpus`: an M-BEIR candidate
        JSONL (image paths relative to it, or to `image_root`) or a list of rows (dicts, paths relative to the
        current directory) / `Candidate`s. `vector_store`: "hnsw", "milvus" (Milvus Lite inside the index) or
        "milvus://HOST:PORT[/collection]" (milvus.py). The index is written beside `out` and renamed into place."""
        spec = StoreSpec.parse(vector_store)
        pack = None
        if not hasattr(encoder, "encode"):
            pack, encoder = encoder, _encoder_for(encoder, backend, backend_kwargs)
        if isinstance(corpus, (str, os.PathLike)):
            cands = read_candidates(corpus, image_root=image_root)
        else:
            cands = candidates_from_rows(corpus)
        out = Path(out)
        with atomic_dir(out) as tmp:
            params = HnswParams(metric="cosine", dim=encoder.dim, M=m, ef_construction=ef_construction,
                                ef_search=ef_search)
            g = tmp / gen_dir(1)
            g.mkdir()
            if spec.store == "hnsw":
                ann = HnswIndex.create(params, capacity=max(16, len(cands)))
            else:
                store = MilvusStore.create(spec, tmp, params)
                ann = MilvusWriter(store)
            with TokenCacheWriter(tmp / CACHE_DIR, hidden=encoder.hidden, has_t_con=encoder.has_t_con) as writer:
                rows = _encode_into(encoder, cands, writer, ann, start=0, batch=batch)
            os.replace(tmp / CACHE_DIR / CACHE_JSON, g / CACHE_JSON)
            if spec.store == "hnsw":
                ann.save(g / ANN_DIR)
                vectors = {"store": "hnsw"}
            else:
                vectors = store.record(np.arange(len(rows), dtype=np.int64))
            write_rows(g / ROWS, rows)
            meta = IndexMeta(encoder.pack_sha256, "cosine", m, ef_construction, ef_search, len(rows), encoder.dim,
                             encoder.has_t_con, generation=1, extra={"embed_template": encoder.template},
                             vectors=vectors)
            commit(tmp, meta)
            # Milvus Lite serves a database from this process by its path: stop it before the folder is renamed,
            # and stop any server on the index this one replaces.
            release_local(tmp / LOCAL_DB)
            release_local(out / LOCAL_DB)
        index = cls.open(out, pack=pack, backend=backend, **backend_kwargs)
        index.use_encoder(encoder)
        return index

    # -- the committed state ----------------------------------------------------------------------------------------
    def snapshot(self) -> IndexSnapshot:
        """The current generation (after picking up another process's commit, if auto_refresh)."""
        stamp = stamp_of(self.path / INDEX_JSON)
        if self._auto_refresh and stamp != self._head.stamp and stamp != self._refused_stamp:
            try:
                self.refresh()
            except RetrvError as e:
                # Keep serving the last good generation; `refresh()` raises for whoever asks explicitly. Remember
                # the refusal only if nobody has committed since (then it is the generation, not a race).
                log.warning("%s: keeping generation %d; the committed one is refused: %s", self.path,
                            self._snap.generation, e)
                if stamp_of(self.path / INDEX_JSON) == stamp:
                    self._refused_stamp = stamp
        snap = self._snap
        if self._token_store is None:
            return snap
        seen = self._with_tokens
        if seen is None or seen.generation != snap.generation:
            seen = self._with_tokens = snap.with_tokens(self._token_store)
        return seen

    def use_token_store(self, store) -> None:
        """Read candidates' tokens from `store` (a `TokenStore`, e.g. a `ShardedTokenStore` written from this
        index) instead of the index's own cache; refused unless it holds exactly the current generation's rows.
        Searches and the reranker are unchanged; `None` goes back to the index's cache."""
        self._with_tokens = None if store is None else self._snap.with_tokens(store)
        self._token_store = store

    def refresh(self) -> bool:
        """Load the committed generation if it is not the one held; True if it changed."""
        with self._refresh_lock:
            if stamp_of(self.path / INDEX_JSON) == self._head.stamp:
                return False
            head, snap = load(self.path, self._verify)
            if head.meta.pack_sha256 != self._head.meta.pack_sha256:
                raise IndexFileError(f"{self.path}: rebuilt with another pack ({head.meta.pack_sha256[:12]}) while "
                                     f"open; expected pack {self._head.meta.pack_sha256[:12]}: reopen it")
            changed = head.meta.generation != self._head.meta.generation
            self._head, self._snap = head, snap
            return changed

    @property
    def meta(self) -> IndexMeta:
        return self._snap.meta

    @property
    def rows(self) -> tuple[dict, ...]:
        return self._snap.rows

    @property
    def cache(self) -> TokenCache:
        return self._snap.cache

    @property
    def ann(self) -> HnswIndex:
        return self._snap.ann

    @property
    def generation(self) -> int:
        return self._snap.generation

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, dim) vectors -> (labels (q, k'), cosine similarities (q, k')). To read the rows of the labels
        returned, take `snapshot()` first and use it for both."""
        return self.snapshot().search(vectors, k)

    def row(self, label: int) -> dict:
        return self._snap.row(label)

    # -- change without a rebuild -----------------------------------------------------------------------------------
    def add(self, rows: list, encoder=None, batch: int = 8, base: str | os.PathLike | None = None,
            images: dict[str, bytes] | None = None) -> int:
        """Add candidates: M-BEIR candidate rows (dicts; image paths relative to `base`, default the current
        directory) or `Candidate`s. Encoded with `encoder`, or with the pack the index was opened with. All or
        nothing: a did already live in the index refuses the whole call (`DuplicateCandidate`). Returns the new
        generation.

        `images`: did -> the bytes of that row's image (PNG, JPEG or WebP; the row gives no img_path), stored in the
        index folder as images/<sha256>.<ext>, written and fsynced before the generation commits and listed (and
        verified) in index.json, so a committed row never points at a missing or altered image."""
        rows, stored = self._inline_images(rows, images or {})
        cands = candidates_from_rows(rows, base=base)
        encoder = encoder or self._default_encoder()
        if encoder.pack_sha256 != self._head.meta.pack_sha256:
            raise InputError(f"add: the encoder's pack {encoder.pack_sha256[:12]} differs from the one this index was "
                             f"built with ({self._head.meta.pack_sha256[:12]}); expected the same pack")

        def apply(root: Path, base_snap: IndexSnapshot, gdir: Path):
            live = base_snap.live_dids()
            if dup := next((c.did for c in cands if c.did in live), None):
                raise DuplicateCandidate(f"add: did {dup!r} is already in the index; expected new candidate ids")
            for name, raw in stored.items():  # under the writer lock: no other writer's clean-up can remove them
                (root / IMAGES_DIR).mkdir(exist_ok=True)
                atomic_write_bytes(root / name, raw)
            ann = _vector_writer(root, base_snap)
            with base_snap.cache.appender(meta_out=gdir / CACHE_JSON) as writer:
                new_rows = _encode_into(encoder, cands, writer, ann, start=len(base_snap.rows), batch=batch)
            return list(base_snap.rows) + new_rows, ann

        return self._update(apply)

    def delete(self, dids: list[str]) -> int:
        """Delete live candidates by did. All or nothing: an unknown did refuses the whole call. Returns the new
        generation. A deleted candidate's tokens stay in the cache (labels are positions) until a rebuild."""
        if isinstance(dids, str) or not all(isinstance(d, str) for d in dids):
            raise InputError(f"delete: got {dids!r}; expected a list of did strings")
        dids = list(dict.fromkeys(dids))

        def apply(root: Path, base_snap: IndexSnapshot, gdir: Path):
            missing = [d for d in dids if base_snap.label(d) is None]
            if missing:
                raise UnknownCandidate(f"delete: did {missing[0]!r} is not in the index; expected live candidate ids")
            ann = _vector_writer(root, base_snap)
            labels = [base_snap.label(d) for d in dids]
            ann.delete(np.asarray(labels, dtype=np.int64))
            rows = [dict(r) for r in base_snap.rows]
            for i in labels:
                rows[i]["deleted"] = True
            src = base_snap.cache.meta_path
            atomic_write_text(gdir / CACHE_JSON, src.read_text(encoding="utf-8"))  # the cache is unchanged
            return rows, ann

        return self._update(apply)

    def migrate(self, to: str) -> int:
        """Move the vectors to another store ("hnsw", "milvus" or "milvus://HOST:PORT[/collection]") as generation
        N+1: the new store is written (and flushed) first, the generation committed last; a Milvus collection left
        behind is dropped after the commit. Rows and cached tokens are unchanged. Returns the new generation."""
        spec = StoreSpec.parse(to)
        cur = self._head.meta.vectors
        same = (spec.store == "hnsw" == cur["store"]) or (spec.store == "milvus" and cur["store"] == "milvus" and (
            (spec.uri is None and cur["uri"] == LOCAL_DB) or (spec.uri == cur["uri"]
                                                             and spec.collection == cur["collection"])))
        if same:
            raise InputError(f"migrate: {self.path} already keeps its vectors in {to!r}; expected another store")
        left: list = []

        def apply(root: Path, base_snap: IndexSnapshot, gdir: Path):
            live = base_snap.ann.labels()
            vectors = _read_vectors(base_snap, live)  # (n, dim) float32
            params = hnsw_params(base_snap.meta)
            if spec.store == "hnsw":
                ann = HnswIndex.create(params, capacity=max(16, len(live)))
                ann.add(live, vectors)
            else:
                ann = MilvusWriter(MilvusStore.create(spec, root, params))
                ann.add(live, vectors)
            if base_snap.meta.store == "milvus":
                left.append(base_snap.ann.store)
            src = base_snap.cache.meta_path
            atomic_write_text(gdir / CACHE_JSON, src.read_text(encoding="utf-8"))  # the cache is unchanged
            return list(base_snap.rows), ann

        def after() -> None:
            for store in left:
                store.drop()
                if store.local:
                    release_local(self.path / LOCAL_DB)
                    shutil.rmtree(self.path / LOCAL_DB, ignore_errors=True)

        return self._update(apply, after)

    def _inline_images(self, rows, images: dict) -> tuple[list, dict[str, bytes]]:
        """Rows given with image bytes -> rows whose img_path is the image's place in images/, and name -> bytes."""
        if not isinstance(images, dict):
            raise InputError(f"images: got {type(images).__name__}; expected a dict did -> image bytes")
        if not images:
            return rows, {}
        if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__iter__"):
            raise InputError(f"rows: got {type(rows).__name__}; expected a list of candidate rows (dicts)")
        rows = list(rows)
        by_did = {r.get("did"): i for i, r in enumerate(rows) if isinstance(r, dict)}
        stored, out = {}, list(rows)
        for did, raw in images.items():
            if did not in by_did:
                raise InputError(f"images: did {did!r} is not among the rows; expected an image for a row added")
            if not isinstance(raw, (bytes, bytearray)) or not raw:
                raise InputError(f"images[{did!r}]: got {type(raw).__name__}; expected the image file's bytes")
            row = rows[by_did[did]]
            if row.get("img_path"):
                raise InputError(f"rows: did {did!r} has img_path {row['img_path']!r} and inline image bytes; "
                                 f"expected one of them")
            name = f"{IMAGES_DIR}/{hashlib.sha256(raw).hexdigest()}.{image_ext(raw, did)}"
            stored[name] = bytes(raw)
            out[by_did[did]] = {**row, "img_path": os.path.join(os.path.abspath(self.path), name)}
        return out, stored

    def _update(self, apply, after=None) -> int:
        root = self.path
        with WriterLock(root, IndexFileError):
            head = read_head(root)
            clean(root, head.meta.generation)
            if head.stamp == self._head.stamp:
                base_snap = self._snap  # nobody else committed: no need to read it back
            else:
                head, base_snap = load(root, self._verify, locked=True)
            new = head.meta.generation + 1
            gdir = root / gen_dir(new)
            gdir.mkdir()
            try:
                rows, ann = apply(root, base_snap, gdir)
                meta = replace(head.meta, generation=new, count=sum(not r["deleted"] for r in rows))
                if isinstance(ann, MilvusWriter):  # its adds are in Milvus already (flushed): the commit comes last
                    writer, ann = ann, MilvusView(ann.store, rows)
                    meta = replace(meta, vectors=ann.store.record(ann.labels()))
                else:
                    writer = None
                    meta = replace(meta, vectors={"store": "hnsw"})
                    ann.save(gdir / ANN_DIR)
                write_rows(gdir / ROWS, rows, root)
                images = image_names(root, rows)
                if lost := next((n for n in sorted(images) if not (root / n).is_file()), None):
                    raise IndexFileError(f"{root / lost}: missing; expected the image a live candidate uses")
                fsync_generation(gdir)
                cache = TokenCache.open(root / CACHE_DIR, verify="size", meta_path=gdir / CACHE_JSON)
                check_consistent(root, meta, ann, rows, cache)
            except BaseException:
                shutil.rmtree(gdir, ignore_errors=True)  # a refused update leaves nothing behind
                raise
            new_head = commit(root, meta, images)  # the commit point
            if writer is not None:
                writer.after_commit()  # Milvus deletes follow the commit: a kill here leaves orphans, repaired on open
            if after is not None:
                after()
            snap = IndexSnapshot(root, meta, ann, rows, cache)
            with self._refresh_lock:
                self._head, self._snap = new_head, snap
            old = root / gen_dir(new - 2)
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)  # N-1 stays for readers still opening it
            clean_images(root, set(new_head.images) | set(head.images))  # N-1's images stay, as its rows do
        return new

    def use_encoder(self, encoder) -> None:
        """The encoder `add` uses when it is given none (the one `build` encoded with)."""
        self._encoder = encoder

    def _default_encoder(self):
        if self._encoder is None:
            if self._pack is None:
                raise InputError(f"{self.path}: add needs an encoder; expected Index.open(path, pack=PACK) or "
                                 f"add(rows, encoder=...)")
            self._encoder = _encoder_for(self._pack, self._backend_name, self._backend_kwargs)
        return self._encoder

    # -- facts ------------------------------------------------------------------------------------------------------
    def bytes_per_item(self) -> dict:
        snap = self._snap
        g = self.path / gen_dir(snap.generation)
        ann_dir = g / ANN_DIR if snap.meta.store == "hnsw" else self.path / LOCAL_DB
        ann_bytes = sum(p.stat().st_size for p in ann_dir.rglob("*") if p.is_file()) if ann_dir.is_dir() else 0
        n = max(1, len(snap.rows))
        return {"token_cache": snap.cache.bytes_per_candidate(), "ann": ann_bytes / n,
                "rows": (g / ROWS).stat().st_size / n}

    def info(self) -> dict:
        snap = self.snapshot()
        m = snap.meta
        return {"path": str(self.path), "format_version": m.format_version, "generation": m.generation,
                "count": m.count, "deleted": len(snap.rows) - m.count, "dim": m.dim, "metric": m.metric, "m": m.m,
                "ef_construction": m.ef_construction, "ef_search": m.ef_search, "has_t_con": m.has_t_con,
                "pack_sha256": m.pack_sha256, "vector_store": _store_info(m.vectors), "token_cache_tokens": snap.cache.total_tokens,
                "bytes_per_item": self.bytes_per_item()}


def _read_vectors(snap: IndexSnapshot, labels: np.ndarray) -> np.ndarray:
    if snap.meta.store == "hnsw":
        return snap.ann.vectors(labels)
    return snap.ann.store.vectors(labels)


def _store_info(rec: dict) -> dict:
    return {k: rec[k] for k in ("store", "uri", "collection", "index") if k in rec}


def _vector_writer(root: Path, snap: IndexSnapshot):
    """What an update writes the next generation's vectors through: a private copy of generation N's hnswlib
    graph, or the Milvus collection itself (adds at once, deletes after the commit)."""
    if snap.meta.store == "hnsw":
        return HnswIndex.load(root / gen_dir(snap.generation) / ANN_DIR, expected_params=snap.ann.params)
    return MilvusWriter(snap.ann.store)


def _encoder_for(pack, backend: str, backend_kwargs: dict):
    from retrv.runtime.backends import open_backend
    from retrv.runtime.retriever import CandidateEncoder, Components

    return CandidateEncoder(Components(pack, open_backend(pack, backend, **backend_kwargs)))


def _encode_into(encoder, cands: list[Candidate], writer, ann: HnswIndex, start: int, batch: int) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    for b in range(0, len(cands), batch):
        chunk = cands[b:b + batch]
        encoded = encoder.encode(chunk)
        labels = np.arange(start + b, start + b + len(chunk), dtype=np.int64)
        for c, e in zip(chunk, encoded.items):
            writer.add(e.tokens, e.grid, e.t_con)
            rows.append({**c.to_row(), "deleted": False})
        ann.add(labels, encoded.vectors)
        log.info("indexed %d/%d candidates (%.1f s)", b + len(chunk), len(cands), time.perf_counter() - t0)
    return rows


__all__ = ["Index", "DuplicateCandidate", "UnknownCandidate", "image_ext", "IndexMeta", "IndexSnapshot", "INDEX_FORMAT_VERSION", "DEFAULT_M", "DEFAULT_EF_CONSTRUCTION",
           "DEFAULT_EF_SEARCH"]
