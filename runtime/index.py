"""`retrv index build`: a corpus in, an index directory out; and the index a query searches.

    INDEX/
      index.json        format_version, pack fingerprint, metric, M, ef_construction, ef_search, count, dim, ...
      ann/              the HNSW graph over candidate embeddings (hnsw.bin + ann.json, checksummed)
      candidates.jsonl  one row per label: did, txt, img_path, modality, deleted
      cache/            the candidate token cache: merged vision tokens (int8), grids, t_con

Labels are candidate positions in the token cache, so a row, its cached tokens and its vector share one integer.
Writes are atomic and index.json is written last; `Index.open` verifies every part before it returns, and refuses
an index built with another pack (its embeddings and cached tokens would be meaningless).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrv.runtime.ann import HnswIndex, HnswParams
from retrv.runtime.corpus import Candidate, read_candidates
from retrv.runtime.errors import IndexFileError, InputError
from retrv.runtime.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from retrv.runtime.token_cache import TokenCache, TokenCacheWriter

log = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1  # bump when an older reader would misread an index


@dataclass(frozen=True)
class IndexMeta:
    format_version: int
    pack_sha256: str
    metric: str
    m: int
    ef_construction: int
    ef_search: int
    count: int  # live candidates
    dim: int
    has_t_con: bool
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "IndexMeta":
        if not isinstance(d, dict):
            raise IndexFileError(f"{where}: got a JSON {type(d).__name__}; expected an object")
        v = d.get("format_version")
        if not isinstance(v, int) or v < 1:
            raise IndexFileError(f"{where}: format_version {v!r}; expected an integer from 1 to {INDEX_FORMAT_VERSION}")
        if v > INDEX_FORMAT_VERSION:
            raise IndexFileError(f"{where}: format_version {v} is newer than this retrv-edge supports "
                                 f"({INDEX_FORMAT_VERSION}); upgrade retrv-edge")
        try:
            return cls(**d)
        except TypeError as e:
            raise IndexFileError(f"{where}: {e}; expected the fields of an index.json") from None


class Index:
    def __init__(self, path: Path, meta: IndexMeta, ann: HnswIndex, rows: list[dict], cache: TokenCache) -> None:
        self.path, self.meta, self.ann, self.rows, self.cache = path, meta, ann, rows, cache
        self._write_lock = threading.Lock()  # one writer (add/delete) at a time; the ANN guards its own readers

    # -- open -------------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, pack=None, verify: str = "full") -> "Index":
        root = Path(path)
        meta_path = root / "index.json"
        if not meta_path.is_file():
            raise IndexFileError(f"{meta_path}: file not found; expected an index built by `retrv index build`")
        try:
            meta = IndexMeta.from_dict(json.loads(meta_path.read_text(encoding="utf-8")), str(meta_path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexFileError(f"{meta_path}: not valid JSON ({e}); expected an index.json") from None
        if pack is not None and pack.sha256 != meta.pack_sha256:
            raise IndexFileError(f"{root}: built with pack {meta.pack_sha256[:12]}; expected the pack given "
                                 f"({pack.sha256[:12]}): rebuild the index with this pack")
        params = HnswParams(metric=meta.metric, dim=meta.dim, M=meta.m, ef_construction=meta.ef_construction,
                            ef_search=meta.ef_search)
        ann = HnswIndex.load(root / "ann", expected_params=params)
        cache = TokenCache.open(root / "cache", verify=verify)
        rows = _read_rows(root / "candidates.jsonl")
        if len(rows) != cache.count:
            raise IndexFileError(f"{root / 'candidates.jsonl'}: {len(rows)} rows; expected {cache.count} (the token "
                                 f"cache's candidates)")
        live = sum(not r["deleted"] for r in rows)
        if live != meta.count or ann.count != live:
            raise IndexFileError(f"{meta_path}: count {meta.count}; the rows have {live} live candidates and the "
                                 f"ANN {ann.count}; expected all three equal")
        return cls(root, meta, ann, rows, cache)

    # -- build ------------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, encoder, corpus: str | Path | list[Candidate], out: str | Path, m: int = 16,
              ef_construction: int = 200, ef_search: int = 200, batch: int = 8) -> "Index":
        """`encoder`: a `CandidateEncoder` (vision tokens, t_con and vectors from the pack's backend)."""
        cands = read_candidates(corpus) if isinstance(corpus, (str, Path)) else list(corpus)
        out = Path(out)
        with atomic_dir(out) as tmp:
            params = HnswParams(metric="cosine", dim=encoder.dim, M=m, ef_construction=ef_construction,
                                ef_search=ef_search)
            ann = HnswIndex.create(params, capacity=max(16, len(cands)))
            with TokenCacheWriter(tmp / "cache", hidden=encoder.hidden, has_t_con=encoder.has_t_con) as writer:
                rows = _encode_into(encoder, cands, writer, ann, start=0, batch=batch)
            ann.save(tmp / "ann")
            _write_rows(tmp / "candidates.jsonl", rows)
            meta = IndexMeta(INDEX_FORMAT_VERSION, encoder.pack_sha256, "cosine", m, ef_construction, ef_search,
                             len(rows), encoder.dim, encoder.has_t_con, extra={"embed_template": encoder.template})
            atomic_write_json(tmp / "index.json", asdict(meta))
        return cls.open(out)

    # -- change without a rebuild -----------------------------------------------------------------------------
    def add(self, encoder, candidates: list[Candidate], batch: int = 8) -> None:
        known = {r["did"] for r in self.rows if not r["deleted"]}
        dup = [c.did for c in candidates if c.did in known]
        if dup:
            raise InputError(f"add: did {dup[0]!r} is already in the index; expected new candidate ids")
        if encoder.pack_sha256 != self.meta.pack_sha256:
            raise InputError("add: the encoder's pack differs from the one this index was built with")
        with self._write_lock:
            writer = self.cache.appender()
            with writer:
                new_rows = _encode_into(encoder, candidates, writer, self.ann, start=len(self.rows), batch=batch)
            self.cache = TokenCache.open(self.path / "cache", verify="size")
            self.rows = self.rows + new_rows
            self._persist()

    def delete(self, dids: list[str]) -> None:
        by_did = {r["did"]: i for i, r in enumerate(self.rows) if not r["deleted"]}
        missing = [d for d in dids if d not in by_did]
        if missing:
            raise InputError(f"delete: did {missing[0]!r} is not in the index; expected live candidate ids")
        with self._write_lock:
            self.ann.delete(np.asarray([by_did[d] for d in dids], dtype=np.int64))
            rows = [dict(r) for r in self.rows]
            for d in dids:
                rows[by_did[d]]["deleted"] = True
            self.rows = rows
            self._persist()

    def _persist(self) -> None:
        self.ann.save(self.path / "ann")
        _write_rows(self.path / "candidates.jsonl", self.rows)
        self.meta = IndexMeta(**{**asdict(self.meta), "count": sum(not r["deleted"] for r in self.rows)})
        atomic_write_json(self.path / "index.json", asdict(self.meta))

    # -- query ------------------------------------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, dim) vectors -> (labels (q, k'), cosine similarities (q, k'))."""
        return self.ann.search(np.asarray(vectors, dtype=np.float32), k)

    def row(self, label: int) -> dict:
        return self.rows[int(label)]

    def bytes_per_item(self) -> dict:
        ann_bytes = sum(p.stat().st_size for p in (self.path / "ann").iterdir())
        n = max(1, len(self.rows))
        return {"token_cache": self.cache.bytes_per_candidate(), "ann": ann_bytes / n,
                "rows": (self.path / "candidates.jsonl").stat().st_size / n}


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


def _write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise IndexFileError(f"{path}: file not found; expected the index's candidate rows")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise IndexFileError(f"{path}:{n}: not valid JSON; expected one candidate row per line") from None
        if not isinstance(row, dict) or "did" not in row or "deleted" not in row:
            raise IndexFileError(f"{path}:{n}: expected an object with 'did' and 'deleted'")
        rows.append(row)
    return rows
