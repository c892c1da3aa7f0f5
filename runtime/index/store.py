"""The index a query searches: candidate rows, their HNSW vectors and their cached tokens, in versioned generations.

    INDEX/
      index.json          the commit record, written last and atomically: kind, format_version, generation N, the
                          index parameters (pack fingerprint, metric, M, ef_construction, ef_search, count, dim),
                          and every file of generation N with its size and sha256
      .lock               the writers' lock (flock: one writer at a time, across threads and processes)
      cache/              the candidate token cache's data files (int8 tokens, scales, grids, t_con): append-only,
                          shared by every generation
      g00000N/
        candidates.jsonl  one row per label: did, txt, img_path (absolute), modality, deleted
        cache.json        the token cache's description of generation N: a prefix of each file in cache/
        ann/              the HNSW graph over the candidates' vectors (hnsw.bin + ann.json)

Labels are candidate positions in the token cache, so a row, its cached tokens and its vector share one integer.

**Updates are generations with an atomic switch** (docs/ARCHITECTURE.md, "Index generations"). `add` and `delete`
take the writer lock, read the committed generation N from disk, write generation N+1 beside it (appending to the
token cache's files, whose generation-N description still covers exactly their old prefix), fsync it, and commit by
replacing `index.json` (temp file + rename). A kill -9 at any moment leaves index.json naming N (complete, never
touched) or N+1 (complete: fsynced before the commit). The next writer deletes what a killed one left: generations
other than N and N-1 (N-1 stays for a reader that is still opening it), temporary files, and token-cache bytes past
N's prefix.

**Readers never see a half-applied update.** An `Index` serves searches from an immutable `IndexSnapshot` (rows,
ANN, token cache of one generation) that a writer replaces in one assignment after its commit; a search takes the
snapshot once, so its labels, rows and tokens always agree. Other processes' commits are picked up on the next
`search`/`snapshot()` (one `stat` of index.json per call) or on `refresh()`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrv.runtime.index.ann import DEFAULT_EF_CONSTRUCTION, DEFAULT_EF_SEARCH, DEFAULT_M, HnswIndex, HnswParams
from retrv.runtime.index.ann_files import HNSW_BIN
from retrv.runtime.inputs.corpus import Candidate, candidates_from_rows, read_candidates
from retrv.runtime.errors import IndexFileError, InputError, RetrvError
from retrv.runtime.folder import (WriterLock, check_table, check_version, describe, is_int, member,
                                  one_line, read_manifest, verify_files)
from retrv.runtime.fsutil import atomic_dir, atomic_write_json, atomic_write_text, fsync_dir
from retrv.runtime.index.token_cache import CACHE_JSON, TokenCache, TokenCacheWriter

log = logging.getLogger(__name__)

INDEX_KIND = "retrv-index"
INDEX_FORMAT_VERSION = 2  # 2: generations (g00000N/) and a file table; 1 (a flat folder) is refused: rebuild
INDEX_JSON = "index.json"
CACHE_DIR = "cache"
ROWS = "candidates.jsonl"
ANN_DIR = "ann"
MAX_INDEX_JSON_BYTES = 1 << 20  # a real index.json is about 2 KB
_GEN_RE = re.compile(r"g(\d{6,})")
_OPEN_RETRIES = 20  # a reader opening generation N while writers commit N+1 and N+2 (which deletes N) starts over



def _gen_dir(generation: int) -> str:
    return f"g{generation:06d}"


def _gen_files(generation: int) -> list[str]:
    g = _gen_dir(generation)
    return [f"{g}/{ROWS}", f"{g}/{CACHE_JSON}", f"{g}/{ANN_DIR}/{HNSW_BIN}", f"{g}/{ANN_DIR}/ann.json"]


@dataclass(frozen=True)
class IndexMeta:
    """The index's parameters, as recorded in index.json."""

    pack_sha256: str
    metric: str
    m: int
    ef_construction: int
    ef_search: int
    count: int  # live candidates
    dim: int
    has_t_con: bool
    generation: int = 1
    format_version: int = INDEX_FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "IndexMeta":
        ints = {"m": 2, "ef_construction": 1, "ef_search": 1, "count": 0, "dim": 1, "generation": 1}
        for name, lo in ints.items():
            if not is_int(d.get(name)) or d[name] < lo:
                raise IndexFileError(one_line(f"{where}: {name} is {d.get(name)!r}; expected an integer >= {lo}"))
        if not isinstance(d.get("pack_sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", d["pack_sha256"]):
            raise IndexFileError(one_line(f"{where}: pack_sha256 is {d.get('pack_sha256')!r}; expected 64 hex digits"))
        if d.get("metric") not in ("cosine", "ip", "l2"):
            raise IndexFileError(one_line(f"{where}: metric is {d.get('metric')!r}; expected 'cosine', 'ip' or 'l2'"))
        if not isinstance(d.get("has_t_con"), bool):
            raise IndexFileError(one_line(f"{where}: has_t_con is {d.get('has_t_con')!r}; expected true or false"))
        if not isinstance(d.get("extra", {}), dict):
            raise IndexFileError(one_line(f"{where}: extra is {d.get('extra')!r}; expected an object"))
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class _Head:
    """index.json, checked: the committed generation, its parameters and its file table."""

    meta: IndexMeta
    files: dict  # name -> {"bytes", "sha256"}: every file of the generation
    cache_files: dict  # cache/<name> -> {"bytes", "sha256"}: the prefix of each append-only data file
    stamp: tuple  # (inode, mtime_ns, size) of index.json when read: a cheap "did it change?"


def _stamp(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read_head(root: Path) -> _Head:
    path = root / INDEX_JSON
    if not root.is_dir():
        raise IndexFileError(f"{root}: index directory not found; expected a directory built by `retrv index build`")
    stamp = _stamp(path)
    d = read_manifest(path, IndexFileError, MAX_INDEX_JSON_BYTES, "an index.json written by `retrv index build`")
    if d.get("kind", INDEX_KIND) != INDEX_KIND:
        raise IndexFileError(one_line(f"{path}: kind {d.get('kind')!r}; expected {INDEX_KIND!r}"))
    check_version(path, d.get("format_version"), INDEX_FORMAT_VERSION, IndexFileError, oldest=2,
                  older_hint="rebuild it with `retrv index build` (generations replaced the flat layout)")
    meta = IndexMeta.from_dict(d, str(path))
    files = check_table(path, d.get("files"), IndexFileError)
    cache_files = check_table(path, d.get("cache_files"), IndexFileError)
    if sorted(files) != sorted(_gen_files(meta.generation)):
        raise IndexFileError(one_line(f"{path}: files {sorted(files)}; expected {sorted(_gen_files(meta.generation))}"))
    if not all(n.startswith(f"{CACHE_DIR}/") and n.count("/") == 1 for n in cache_files):
        raise IndexFileError(one_line(f"{path}: cache_files {sorted(cache_files)}; expected files in {CACHE_DIR}/"))
    return _Head(meta, files, cache_files, stamp)


# ---------------------------------------------------------------------------------------------- rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    import json

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_rows(path: Path) -> list[dict]:
    import json

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise IndexFileError(f"{path}: not UTF-8 text; expected the index's candidate rows") from None
    except OSError as e:
        raise IndexFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise IndexFileError(f"{path}:{n}: not valid JSON; expected one candidate row per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("did"), str) or not isinstance(row.get("deleted"), bool) \
                or not all(isinstance(row.get(k, ""), str) for k in ("txt", "img_path", "modality")):
            raise IndexFileError(f"{path}:{n}: expected an object with 'did' (string), 'deleted' (bool) and string "
                                 f"'txt', 'img_path', 'modality'")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- one generation


class IndexSnapshot:
    """One committed generation, immutable: its rows, ANN and token cache always agree. Every search and every
    row/token lookup of one query goes through the same snapshot."""

    def __init__(self, root: Path, meta: IndexMeta, ann: HnswIndex, rows: list[dict], cache: TokenCache) -> None:
        self.path, self.meta, self.ann, self.cache = root, meta, ann, cache
        self.rows = tuple(rows)
        self.generation = meta.generation
        self._by_did = {r["did"]: i for i, r in enumerate(self.rows) if not r["deleted"]}

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, dim) vectors -> (labels (q, k'), cosine similarities (q, k'))."""
        return self.ann.search(np.asarray(vectors, dtype=np.float32), k)

    def row(self, label: int) -> dict:
        return self.rows[int(label)]

    def label(self, did: str) -> int | None:
        """The live candidate's label, or None."""
        return self._by_did.get(did)

    def live_dids(self) -> set[str]:
        return set(self._by_did)


def _load_generation(root: Path, head: _Head, verify: str) -> IndexSnapshot:
    meta = head.meta
    verify_files(root, head.files, IndexFileError, verify)
    for name in head.cache_files:
        member(root, name, IndexFileError)  # no symlink among the shared data files; TokenCache checks the rest
    g = root / _gen_dir(meta.generation)
    params = HnswParams(metric=meta.metric, dim=meta.dim, M=meta.m, ef_construction=meta.ef_construction,
                        ef_search=meta.ef_search)
    ann = HnswIndex.load(g / ANN_DIR, expected_params=params)
    cache = TokenCache.open(root / CACHE_DIR, verify=verify, meta_path=g / CACHE_JSON)
    recorded = {f"{CACHE_DIR}/{n}": e for n, e in cache.files.items()}
    if recorded != head.cache_files:
        raise IndexFileError(f"{g / CACHE_JSON}: describes {sorted(recorded)} unlike {INDEX_JSON}'s cache_files; "
                             f"expected the same prefixes")
    rows = _read_rows(g / ROWS)
    _check_consistent(root, meta, ann, rows, cache)
    return IndexSnapshot(root, meta, ann, rows, cache)


def _check_consistent(root: Path, meta: IndexMeta, ann: HnswIndex, rows: list[dict], cache: TokenCache) -> None:
    where = root / _gen_dir(meta.generation)
    if len(rows) != cache.count:
        raise IndexFileError(f"{where / ROWS}: {len(rows)} rows; expected {cache.count} (the token cache's candidates)")
    live = [i for i, r in enumerate(rows) if not r["deleted"]]
    if len(live) != meta.count or ann.count != len(live):
        raise IndexFileError(f"{root / INDEX_JSON}: count {meta.count}; the rows have {len(live)} live candidates and "
                             f"the ANN {ann.count}; expected all three equal")
    if not np.array_equal(ann.labels(), np.asarray(live, dtype=np.int64)):
        raise IndexFileError(f"{where / ANN_DIR}: its live labels differ from the live rows; expected the same set")
    dids = [rows[i]["did"] for i in live]
    if len(set(dids)) != len(dids):
        raise IndexFileError(f"{where / ROWS}: a live did appears twice; expected unique candidate ids")
    if cache.has_t_con != meta.has_t_con:
        raise IndexFileError(f"{where / CACHE_JSON}: has_t_con {cache.has_t_con}; expected {meta.has_t_con}")


def _load(root: Path, verify: str) -> tuple[_Head, IndexSnapshot]:
    """Open the committed generation; start over if a writer moved past it (and deleted it) meanwhile."""
    for attempt in range(_OPEN_RETRIES):
        head = _read_head(root)
        try:
            return head, _load_generation(root, head, verify)
        except (RetrvError, OSError) as e:
            # A file of this generation vanished or changed under us (the token cache's description, the graph:
            # any of them): if a writer committed meanwhile, that is why; read the new head and start over.
            if attempt + 1 < _OPEN_RETRIES and _stamp(root / INDEX_JSON) != head.stamp:
                continue
            if isinstance(e, OSError):
                raise IndexFileError(f"{root}: {e.strerror or e} ({e.filename}); expected the files of generation "
                                     f"{head.meta.generation}") from None
            raise
    raise AssertionError("unreachable")


def _commit(root: Path, meta: IndexMeta) -> _Head:
    """Describe generation `meta.generation` (already written and fsynced) in a new index.json: the commit point."""
    g = meta.generation
    files = {name: describe(root, name) for name in _gen_files(g)}
    cache = TokenCache.open(root / CACHE_DIR, verify="size", meta_path=root / _gen_dir(g) / CACHE_JSON)
    cache_files = {f"{CACHE_DIR}/{n}": e for n, e in cache.files.items()}
    record = {"kind": INDEX_KIND, **asdict(meta), "files": files, "cache_files": cache_files}
    atomic_write_json(root / INDEX_JSON, record)
    return _Head(meta, files, cache_files, _stamp(root / INDEX_JSON))


def _fsync_generation(gdir: Path) -> None:
    for dirpath, _, names in os.walk(gdir):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
    fsync_dir(gdir.parent)


def _clean(root: Path, generation: int) -> list[str]:
    """Remove what killed writers left: generations other than `generation` and the one before it, and temporary
    files (`.<name>.<random>.tmp`). Called under the writer lock, so none of it belongs to a live writer."""
    removed = []
    for entry in os.scandir(root):
        m = _GEN_RE.fullmatch(entry.name)
        stale_gen = m is not None and int(m.group(1)) not in (generation, generation - 1)
        stale_tmp = entry.name.startswith(".") and entry.name.endswith((".tmp", ".tmpdir"))
        if stale_gen or stale_tmp:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
    for sub in (root / CACHE_DIR,):
        for entry in os.scandir(sub):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                os.unlink(entry.path)
                removed.append(f"{CACHE_DIR}/{entry.name}")
    if removed:
        log.info("%s: removed leftovers of interrupted writes: %s", root, ", ".join(sorted(removed)))
    return removed


# ---------------------------------------------------------------------------------------------- the index


class Index:
    """An index directory: search it from any number of threads while one writer at a time adds and deletes.

        index = Index.open("index/", pack=pack)              # verified before it returns
        index.add([{"did": "x1", "txt": "a red dress", "img_path": "x1.jpg"}])   # encoded with the pack
        index.delete(["x0"])
        labels, scores = index.search(vectors, k=50)

    `pack`: the pack the index was built with (refused otherwise); with it the index can encode what `add` is
    given (the backend opens on the first add). `auto_refresh`: pick up other processes' commits on each search.
    """

    def __init__(self, root: Path, head: _Head, snap: IndexSnapshot, verify: str = "full", pack=None,
                 auto_refresh: bool = True, backend: str = "auto", backend_kwargs: dict | None = None) -> None:
        self.path = root
        self._head, self._snap = head, snap
        self._verify, self._auto_refresh = verify, auto_refresh
        self._pack, self._backend_name, self._backend_kwargs = pack, backend, backend_kwargs or {}
        self._encoder = None
        self._refresh_lock = threading.Lock()
        self._refused_stamp: tuple = ()

    # -- open -------------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, pack=None, verify: str = "full", backend: str = "auto",
             auto_refresh: bool = True, **backend_kwargs: Any) -> "Index":
        if verify not in ("full", "size"):
            raise InputError(f"verify: got {verify!r}; expected 'full' or 'size'")
        root = Path(path)
        head, snap = _load(root, verify)
        if pack is not None and pack.sha256 != head.meta.pack_sha256:
            raise IndexFileError(f"{root}: built with pack {head.meta.pack_sha256[:12]}; expected the pack given "
                                 f"({pack.sha256[:12]}): rebuild the index with this pack")
        return cls(root, head, snap, verify, pack, auto_refresh, backend, backend_kwargs)

    # -- build ------------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, encoder, corpus: str | Path | list, out: str | os.PathLike, m: int = DEFAULT_M,
              ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef_search: int = DEFAULT_EF_SEARCH, batch: int = 8,
              image_root: str | os.PathLike | None = None, backend: str = "auto", **backend_kwargs: Any) -> "Index":
        """`encoder`: a `Pack` (its backend is opened here) or a `CandidateEncoder`. `corpus`: an M-BEIR candidate
        JSONL (image paths relative to it, or to `image_root`) or a list of rows (dicts, paths relative to the
        current directory) / `Candidate`s. The index is written beside `out` and renamed into place."""
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
            g = tmp / _gen_dir(1)
            g.mkdir()
            ann = HnswIndex.create(params, capacity=max(16, len(cands)))
            with TokenCacheWriter(tmp / CACHE_DIR, hidden=encoder.hidden, has_t_con=encoder.has_t_con) as writer:
                rows = _encode_into(encoder, cands, writer, ann, start=0, batch=batch)
            os.replace(tmp / CACHE_DIR / CACHE_JSON, g / CACHE_JSON)
            ann.save(g / ANN_DIR)
            _write_rows(g / ROWS, rows)
            meta = IndexMeta(encoder.pack_sha256, "cosine", m, ef_construction, ef_search, len(rows), encoder.dim,
                             encoder.has_t_con, generation=1, extra={"embed_template": encoder.template})
            _commit(tmp, meta)
        index = cls.open(out, pack=pack, backend=backend, **backend_kwargs)
        index.use_encoder(encoder)
        return index

    # -- the committed state ----------------------------------------------------------------------------------------
    def snapshot(self) -> IndexSnapshot:
        """The current generation (after picking up another process's commit, if auto_refresh)."""
        stamp = _stamp(self.path / INDEX_JSON)
        if self._auto_refresh and stamp != self._head.stamp and stamp != self._refused_stamp:
            try:
                self.refresh()
            except RetrvError as e:
                # Keep serving the last good generation; `refresh()` raises for whoever asks explicitly. Remember
                # the refusal only if nobody has committed since (then it is the generation, not a race).
                log.warning("%s: keeping generation %d; the committed one is refused: %s", self.path,
                            self._snap.generation, e)
                if _stamp(self.path / INDEX_JSON) == stamp:
                    self._refused_stamp = stamp
        return self._snap

    def refresh(self) -> bool:
        """Load the committed generation if it is not the one held; True if it changed."""
        with self._refresh_lock:
            if _stamp(self.path / INDEX_JSON) == self._head.stamp:
                return False
            head, snap = _load(self.path, self._verify)
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
    def add(self, rows: list, encoder=None, batch: int = 8, base: str | os.PathLike | None = None) -> int:
        """Add candidates: M-BEIR candidate rows (dicts; image paths relative to `base`, default the current
        directory) or `Candidate`s. Encoded with `encoder`, or with the pack the index was opened with. All or
        nothing: a did already live in the index refuses the whole call. Returns the new generation."""
        cands = candidates_from_rows(rows, base=base)
        encoder = encoder or self._default_encoder()
        if encoder.pack_sha256 != self._head.meta.pack_sha256:
            raise InputError(f"add: the encoder's pack {encoder.pack_sha256[:12]} differs from the one this index was "
                             f"built with ({self._head.meta.pack_sha256[:12]}); expected the same pack")

        def apply(root: Path, base_snap: IndexSnapshot, gdir: Path):
            live = base_snap.live_dids()
            if dup := next((c.did for c in cands if c.did in live), None):
                raise InputError(f"add: did {dup!r} is already in the index; expected new candidate ids")
            ann = HnswIndex.load(root / _gen_dir(base_snap.generation) / ANN_DIR,
                                 expected_params=base_snap.ann.params)
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
                raise InputError(f"delete: did {missing[0]!r} is not in the index; expected live candidate ids")
            ann = HnswIndex.load(root / _gen_dir(base_snap.generation) / ANN_DIR,
                                 expected_params=base_snap.ann.params)
            labels = [base_snap.label(d) for d in dids]
            ann.delete(np.asarray(labels, dtype=np.int64))
            rows = [dict(r) for r in base_snap.rows]
            for i in labels:
                rows[i]["deleted"] = True
            src = base_snap.cache.meta_path
            atomic_write_text(gdir / CACHE_JSON, src.read_text(encoding="utf-8"))  # the cache is unchanged
            return rows, ann

        return self._update(apply)

    def _update(self, apply) -> int:
        root = self.path
        with WriterLock(root, IndexFileError):
            head = _read_head(root)
            _clean(root, head.meta.generation)
            if head.stamp == self._head.stamp:
                base_snap = self._snap  # nobody else committed: no need to read it back
            else:
                head, base_snap = _load(root, self._verify)
            new = head.meta.generation + 1
            gdir = root / _gen_dir(new)
            gdir.mkdir()
            try:
                rows, ann = apply(root, base_snap, gdir)
                ann.save(gdir / ANN_DIR)
                _write_rows(gdir / ROWS, rows)
                _fsync_generation(gdir)
                meta = replace(head.meta, generation=new, count=sum(not r["deleted"] for r in rows))
                cache = TokenCache.open(root / CACHE_DIR, verify="size", meta_path=gdir / CACHE_JSON)
                _check_consistent(root, meta, ann, rows, cache)
            except BaseException:
                shutil.rmtree(gdir, ignore_errors=True)  # a refused update leaves nothing behind
                raise
            new_head = _commit(root, meta)  # the commit point
            snap = IndexSnapshot(root, meta, ann, rows, cache)
            with self._refresh_lock:
                self._head, self._snap = new_head, snap
            old = root / _gen_dir(new - 2)
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)  # N-1 stays for readers still opening it
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
        g = self.path / _gen_dir(snap.generation)
        ann_bytes = sum(p.stat().st_size for p in (g / ANN_DIR).iterdir())
        n = max(1, len(snap.rows))
        return {"token_cache": snap.cache.bytes_per_candidate(), "ann": ann_bytes / n,
                "rows": (g / ROWS).stat().st_size / n}

    def info(self) -> dict:
        snap = self.snapshot()
        m = snap.meta
        return {"path": str(self.path), "format_version": m.format_version, "generation": m.generation,
                "count": m.count, "deleted": len(snap.rows) - m.count, "dim": m.dim, "metric": m.metric, "m": m.m,
                "ef_construction": m.ef_construction, "ef_search": m.ef_search, "has_t_con": m.has_t_con,
                "pack_sha256": m.pack_sha256, "token_cache_tokens": snap.cache.total_tokens,
                "bytes_per_item": self.bytes_per_item()}


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


__all__ = ["Index", "IndexMeta", "IndexSnapshot", "INDEX_FORMAT_VERSION", "DEFAULT_M", "DEFAULT_EF_CONSTRUCTION",
           "DEFAULT_EF_SEARCH"]
