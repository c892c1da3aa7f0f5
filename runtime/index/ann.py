"""The coarse stage: an HNSW index (hnswlib) over embedding vectors, safe to share between threads and verified on open.

Score convention (the same in `HnswIndex.search` and in the `exact_search` oracle), best first:

    cosine  score = 1 - hnswlib_distance = cos(q, x) in [-1, 1], higher is better. Both sides are normalized as
            hnswlib does, v / (|v| + 1e-30), so a zero vector scores 0 against everything.
    ip      score = 1 - hnswlib_distance = <q, x>, higher is better (exact up to float32 rounding of the 1 - d
            round trip, about 1e-7 * max(1, |<q, x>|)).
    l2      score = hnswlib_distance = |q - x|^2, the SQUARED Euclidean distance, lower is better.

Labels are non-negative int64 (hnswlib stores size_t and silently turns -1 into 2**64 - 1, so negatives are refused).

Duplicate labels, checked against hnswlib 0.8.0:
  * Adding a label that is already live replaces its vector in place (hnswlib's `updatePoint`, which also repairs
    the neighbours' links); the count does not change.
  * Adding a label that was deleted brings it back with the new vector (hnswlib unmarks it, then updates it).
  * The same label twice in ONE `add` call is refused: hnswlib inserts in parallel and which vector wins is a race.
  * The index is built with `allow_replace_deleted=False`. With it on, 0.8.0's `add_items(replace_deleted=True)`
    does not check whether the label already exists, so a live label re-added into a vacant slot is returned twice
    by a search (reproduced; nmslib/hnswlib#487, #541), and re-adding a deleted label raises. The price: a deleted
    item keeps its slot (memory and graph hops) until the index is rebuilt.

Thread safety: hnswlib is not safe to search while another thread inserts, resizes or deletes. Every call goes
through a writer-preferring readers-writer lock: any number of concurrent searches, exclusive add/delete/resize.
`save` holds the read side (searches continue while a large index is written) plus its own mutex.

Files (`save`/`load`): `hnsw.bin` (hnswlib's own format) and `ann.json` (params, counts, capacity, size and sha256
of hnsw.bin, format version), each written to a temporary name and renamed, ann.json last. `load` checks ann.json,
then the size and sha256 of hnsw.bin, then walks its header and graph (every size and neighbour id in range)
BEFORE hnswlib's loader sees it: hnswlib trusts the sizes in the file, so a crafted one overflows its buffers, and a
checksum alone only proves that the file is the one ann.json names, not that whoever wrote both meant well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrv.runtime.errors import IndexFileError, InputError
from retrv.runtime.index.ann_files import (ANN_FORMAT_VERSION, HNSW_BIN, MAX_CAPACITY, first_duplicate, check_graph,
                                    read_meta)
from retrv.runtime.fsutil import atomic_write_json, fsync_dir, sha256_file

log = logging.getLogger(__name__)

ANN_JSON = "ann.json"
METRICS = ("cosine", "ip", "l2")
# The defaults, written once (Index.build and the CLI read them from here):
DEFAULT_M = 16  # links per node; hnswlib's recommended default for 64-1024-d embeddings
DEFAULT_EF_CONSTRUCTION = 200  # build beam; hnswlib's default, recall@10 ~0.99 on typical embeddings
# Query beam; raised to k per query when k is larger (hnswlib needs ef >= k). 200, not hnswlib's 10 or our first 64:
# on 10k random 128-d vectors (HNSW's worst case) recall@10 is 0.63 at 64 and 0.92 at 200 (bench/index.py), and a
# search costs ~0.1 ms against hundreds of ms of reranking.
DEFAULT_EF_SEARCH = 200
MAX_M = 1024  # hnswlib keeps a link count in 16 bits (2*M <= 65535); past ~100 recall stops improving anyway
# Search and build beams: hnswlib takes a size_t, but a beam of a million already visits a million-item index
# exhaustively; larger values are typos, and ones past 2**64 would fail inside hnswlib's binding.
MAX_EF = 1_000_000
RANDOM_SEED = 100  # hnswlib's default level seed, written down so that a single-threaded build is reproducible
_COSINE_EPS = 1e-30  # hnswlib's normalize_vector: v / (|v| + 1e-30)
_ORACLE_CHUNK = 1 << 24  # exact_search scores at most this many (query, item) pairs at once: 64 MiB of float32



def _check_int(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi and value > hi):
        bound = f"an integer in [{lo}, {hi}]" if hi else f"an integer >= {lo}"
        raise InputError(f"{name}: got {value!r}; expected {bound}")
    return int(value)


@dataclass(frozen=True)
class HnswParams:
    """How the graph is built (M, ef_construction) and searched (ef_search). Saved in ann.json beside the index."""

    metric: str
    dim: int
    M: int = DEFAULT_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    ef_search: int = DEFAULT_EF_SEARCH

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InputError(f"HnswParams.metric: got {self.metric!r}; expected one of {', '.join(METRICS)}")
        _check_int("HnswParams.dim", self.dim)
        _check_int("HnswParams.M", self.M, 2, MAX_M)  # M >= 2: hnswlib's level multiplier is 1/ln(M)
        _check_int("HnswParams.ef_construction", self.ef_construction, 1, MAX_EF)
        _check_int("HnswParams.ef_search", self.ef_search, 1, MAX_EF)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HnswParams:
        if not isinstance(d, dict):
            raise InputError(f"HnswParams: got {type(d).__name__}; expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise InputError(f"HnswParams: got unknown field(s) {unknown}; expected only {sorted(known)}")
        return cls(**d)


class RWLock:
    """Many readers or one writer; a waiting writer stops new readers from entering (no writer starvation).

    Not reentrant: a thread holding either side must not ask for either side again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())  # a plain Lock: cheaper than the default RLock
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---------------------------------------------------------------------------------------------- input checks


def _as_vectors(x: Any, dim: int, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] != dim:
        raise InputError(f"{name}: got shape {a.shape}; expected (n, {dim})")
    if a.dtype.kind not in "fiu":
        raise InputError(f"{name}: got dtype {a.dtype}; expected a real number dtype (float32 preferred)")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        row = int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
        raise InputError(f"{name}: row {row} holds NaN or Inf; expected finite values")
    return a


def _as_labels(x: Any, name: str = "labels") -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise InputError(f"{name}: got shape {a.shape}; expected (n,)")
    if a.size and a.dtype.kind not in "iu":
        raise InputError(f"{name}: got dtype {a.dtype}; expected integers (int64)")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise InputError(f"{name}: got label {int(a.max())}; expected at most {np.iinfo(np.int64).max}")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise InputError(f"{name}: got label {int(a.min())}; expected non-negative labels")
    return a


as_vectors, as_labels = _as_vectors, _as_labels  # the same input checks for other vector stores (milvus.py)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + np.float32(_COSINE_EPS))


def exact_search(matrix: Any, labels: Any, queries: Any, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k: `(labels int64 (q, k'), scores float32 (q, k'))`, k' = min(k, n), best first.

    Same score convention as `HnswIndex.search` (module docstring). Ties are broken by label, ascending, so the
    result is a function of the inputs alone. Computed in float32, `_ORACLE_CHUNK` pairs at a time.
    """
    if metric not in METRICS:
        raise InputError(f"metric: got {metric!r}; expected one of {', '.join(METRICS)}")
    m = np.asarray(matrix)
    if m.ndim != 2:
        raise InputError(f"matrix: got shape {m.shape}; expected (n, dim)")
    m = _as_vectors(m, m.shape[1], "matrix")
    lab = _as_labels(labels)
    if lab.shape[0] != m.shape[0]:
        raise InputError(f"labels: got {lab.shape[0]} labels; expected one per matrix row ({m.shape[0]})")
    q = _as_vectors(queries, m.shape[1], "queries")
    k = min(_check_int("k", k), m.shape[0])
    if k == 0:
        return np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
    if metric == "cosine":
        m, q = _normalize(m), _normalize(q)
    sq_norms = np.einsum("ij,ij->i", m, m) if metric == "l2" else None  # (n,)
    out_l = np.empty((q.shape[0], k), np.int64)
    out_s = np.empty((q.shape[0], k), np.float32)
    step = max(1, _ORACLE_CHUNK // m.shape[0])
    for lo in range(0, q.shape[0], step):
        qc = q[lo:lo + step]  # (c, dim)
        dots = qc @ m.T  # (c, n)
        if metric == "l2":
            dist = np.maximum(np.einsum("ij,ij->i", qc, qc)[:, None] + sq_norms[None, :] - 2 * dots, 0)
            key, score = -dist, dist  # key: higher is better
        else:
            key = score = dots
        top = np.argpartition(-key, k - 1, axis=1)[:, :k] if k < key.shape[1] else np.tile(np.arange(k), (len(qc), 1))
        rows = np.arange(len(qc))[:, None]
        order = np.lexsort((lab[top], -key[rows, top]), axis=-1)
        top = top[rows, order]  # (c, k), best first
        # argpartition picks arbitrarily among items tied with the k-th: redo those rows with the label tie-break.
        kth = key[rows[:, 0], top[:, -1]]
        for r in np.flatnonzero((key >= kth[:, None]).sum(axis=1) > k):
            cand = np.flatnonzero(key[r] >= kth[r])
            top[r] = cand[np.lexsort((lab[cand], -key[r, cand]))[:k]]
        out_l[lo:lo + step] = lab[top]
        out_s[lo:lo + step] = score[rows, top]
    return out_l, out_s


# ---------------------------------------------------------------------------------------------- the index


def _hnswlib():
    import hnswlib  # a core dependency of the runtime; imported here so `import retrv.runtime` stays cheap

    return hnswlib


class HnswIndex:
    """An hnswlib index with explicit label semantics, automatic growth, a readers-writer lock and verified files.

    Build with `HnswIndex.create(params)`, open with `HnswIndex.load(dir)`; the constructor is internal.
    """

    def __init__(self, params: HnswParams, index: Any, live: set[int], deleted: set[int]) -> None:
        self._params = params
        self._index = index
        self._live = live  # labels a search may return
        self._deleted = deleted  # labels marked deleted; their slots stay in the graph (no replace_deleted)
        self._lock = RWLock()
        self._save_lock = threading.Lock()

    @classmethod
    def create(cls, params: HnswParams, capacity: int = 1024) -> HnswIndex:
        if not isinstance(params, HnswParams):
            raise InputError(f"params: got {type(params).__name__}; expected HnswParams")
        capacity = _check_int("capacity", capacity, 1, MAX_CAPACITY)
        index = _hnswlib().Index(space=params.metric, dim=params.dim)
        index.init_index(max_elements=capacity, ef_construction=params.ef_construction, M=params.M,
                         random_seed=RANDOM_SEED, allow_replace_deleted=False)
        index.set_ef(params.ef_search)
        return cls(params, index, set(), set())

    # -- read-only views

    @property
    def params(self) -> HnswParams:
        return self._params

    @property
    def dim(self) -> int:
        return self._params.dim

    @property
    def count(self) -> int:
        """Live items: added and not deleted."""
        with self._lock.read():
            return len(self._live)

    @property
    def deleted_count(self) -> int:
        """Deleted items still holding a slot (they cost memory and graph hops until a rebuild)."""
        with self._lock.read():
            return len(self._deleted)

    @property
    def capacity(self) -> int:
        with self._lock.read():
            return int(self._index.max_elements)

    def labels(self) -> np.ndarray:
        """Live labels, ascending, int64 (n,)."""
        with self._lock.read():
            return np.array(sorted(self._live), dtype=np.int64)

    def __len__(self) -> int:
        return self.count

    # -- writes (exclusive)

    def add(self, labels: Any, vectors: Any, num_threads: int = -1) -> None:
        """Insert or replace: `labels` int64 (n,), `vectors` float32 (n, dim). A live label gets the new vector; a
        deleted label comes back with it. Grows the capacity as needed (at least doubling, so growth is amortised).
        `num_threads=-1` uses every core (hnswlib's convention)."""
        lab = _as_labels(labels)
        vec = _as_vectors(vectors, self.dim, "vectors")
        if lab.shape[0] != vec.shape[0]:
            raise InputError(f"labels: got {lab.shape[0]} labels for {vec.shape[0]} vectors; expected one per row")
        if (dup := first_duplicate(lab)) is not None:
            raise InputError(f"labels: got label {dup} twice in one add; expected unique labels per call")
        if not lab.size:
            return
        batch = lab.tolist()
        with self._lock.write():
            new = sum(1 for x in batch if x not in self._live and x not in self._deleted)
            need = int(self._index.element_count) + new
            if need > self._index.max_elements:
                self._grow(need)
            try:
                self._index.add_items(vec, lab, num_threads=num_threads)
            except BaseException:
                self._resync(batch)
                raise
            self._live.update(batch)
            self._deleted.difference_update(batch)

    def delete(self, labels: Any) -> None:
        """Mark live labels deleted; a search never returns them again. Unknown or already deleted -> InputError, and
        then nothing is deleted."""
        lab = np.unique(_as_labels(labels)).tolist()
        with self._lock.write():
            unknown = [x for x in lab if x not in self._live]
            if unknown:
                raise InputError(f"delete: label {unknown[0]} is not a live label of the index ({len(unknown)} of "
                                 f"{len(lab)} unknown or already deleted); expected live labels, nothing deleted")
            for x in lab:
                self._index.mark_deleted(x)
                self._live.discard(x)
                self._deleted.add(x)

    def vectors(self, labels: Any) -> np.ndarray:
        """float32 (n, dim): the stored vectors of live labels, in their order (for cosine, normalized as hnswlib
        stores them). Moving an index to another vector store reads them here."""
        lab = _as_labels(labels)
        with self._lock.read():
            if unknown := [x for x in lab.tolist() if x not in self._live]:
                raise InputError(f"vectors: label {unknown[0]} is not a live label of the index; expected live labels")
            if not lab.size:
                return np.zeros((0, self.dim), np.float32)
            return np.asarray(self._index.get_items(lab.tolist()), dtype=np.float32).reshape(len(lab), self.dim)

    def set_ef_search(self, ef_search: int) -> None:
        """Change the query beam (saved with the index on the next `save`)."""
        params = dataclasses.replace(self._params, ef_search=ef_search)
        with self._lock.write():
            self._params = params
            self._index.set_ef(ef_search)

    def _grow(self, need: int) -> None:
        if need > MAX_CAPACITY:
            raise InputError(f"add: the index would hold {need} items; expected at most {MAX_CAPACITY}")
        new_cap = min(max(need, 2 * int(self._index.max_elements)), MAX_CAPACITY)
        log.debug("resizing HNSW index from %d to %d slots", self._index.max_elements, new_cap)
        self._index.resize_index(new_cap)

    def _resync(self, batch: list[int]) -> None:
        # add_items failed part way (out of memory): learn from hnswlib which of the batch got in.
        for x in batch:
            try:
                self._index.get_items([x])
            except RuntimeError:
                continue
            self._live.add(x)
            self._deleted.discard(x)

    # -- search (shared)

    def search(self, vectors: Any, k: int, num_threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: `(labels int64 (q, k'), scores float32 (q, k'))`, k' = min(k, count), best first, scores
        as in the module docstring. A k above ef_search runs alone (it has to raise hnswlib's global ef)."""
        q = _as_vectors(vectors, self.dim, "vectors")
        k = _check_int("k", k)
        with self._lock.read():
            if min(k, len(self._live)) <= self._params.ef_search:
                return self._search_locked(q, k, num_threads)
        with self._lock.write():
            self._index.set_ef(max(min(k, len(self._live)), self._params.ef_search))  # hnswlib's ef is a C int
            try:
                return self._search_locked(q, k, num_threads)
            finally:
                self._index.set_ef(self._params.ef_search)

    def _search_locked(self, q: np.ndarray, k: int, num_threads: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self._live))
        if k == 0 or not len(q):
            return np.zeros((len(q), k), np.int64), np.zeros((len(q), k), np.float32)
        try:
            lab, dist = self._index.knn_query(q, k=k, num_threads=num_threads)
        except RuntimeError as e:
            # Fewer than k live items reachable from the entry point (many deletions; nmslib/hnswlib#321).
            log.warning("hnswlib returned fewer than k=%d results (%s); answering by exact search", k, e)
            live = np.array(sorted(self._live), dtype=np.int64)
            stored = np.asarray(self._index.get_items(live.tolist()), dtype=np.float32)  # cosine: already normalized
            return exact_search(stored, live, q, k, self._params.metric)
        scores = dist if self._params.metric == "l2" else 1.0 - dist
        return lab.astype(np.int64), scores.astype(np.float32, copy=False)

    # -- files

    def save(self, directory: str | os.PathLike) -> None:
        """Write `hnsw.bin` then `ann.json` into `directory` (created if missing), each atomically. Other files in the
        directory are left alone. A crash between the two renames leaves a pair that `load` refuses (sha256)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with self._save_lock, self._lock.read():
            tmp = d / f".{HNSW_BIN}.{secrets.token_hex(6)}.tmp"
            try:
                self._index.save_index(str(tmp))
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                meta = {
                    "format_version": ANN_FORMAT_VERSION,
                    "kind": "hnswlib",
                    "params": self._params.to_dict(),
                    "count": len(self._live),
                    "element_count": int(self._index.element_count),
                    "capacity": int(self._index.max_elements),
                    "label_dtype": "int64",
                    HNSW_BIN: {"size": tmp.stat().st_size, "sha256": sha256_file(tmp)},
                }
                os.replace(tmp, d / HNSW_BIN)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsync_dir(d)
            atomic_write_json(d / ANN_JSON, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike, expected_params: HnswParams | None = None) -> HnswIndex:
        """Open an index written by `save`, verifying everything before hnswlib reads a byte; IndexFileError on any
        mismatch. `expected_params`: metric, dim, M and ef_construction must match; its ef_search is then used.
        The loaded index has room for exactly the stored items; the next `add` grows it."""
        d = Path(directory)
        meta = read_meta(d / ANN_JSON)
        params = meta["params"]
        if expected_params is not None:
            for name in ("metric", "dim", "M", "ef_construction"):
                got, want = getattr(params, name), getattr(expected_params, name)
                if got != want:
                    raise IndexFileError(f"{d / ANN_JSON}: index {name} is {got!r}; expected {want!r}")
            params = dataclasses.replace(params, ef_search=expected_params.ef_search)
        path = d / HNSW_BIN
        if not path.is_file():
            raise IndexFileError(f"{path}: missing; expected the graph file named in {ANN_JSON}")
        size, (want_size, digest) = path.stat().st_size, (meta[HNSW_BIN]["size"], meta[HNSW_BIN]["sha256"])
        if size != want_size:
            raise IndexFileError(f"{path}: size {size} bytes; expected {want_size} (truncated or replaced)")
        if sha256_file(path) != digest:
            raise IndexFileError(f"{path}: sha256 differs from {ANN_JSON}; expected {digest} (modified file)")
        labels, deleted = check_graph(path, params, meta["element_count"], meta["capacity"])
        if len(labels) - int(deleted.sum()) != meta["count"]:
            raise IndexFileError(f"{path}: {len(labels) - int(deleted.sum())} live items; expected {meta['count']}")
        index = _hnswlib().Index(space=params.metric, dim=params.dim)
        slots = max(meta["element_count"], 1)
        try:
            # Allocate for the items the file proves it holds, not for the capacity it claims: hnswlib sizes its
            # buffers, locks and visited lists by max_elements, so a forged capacity of 2**32 would exhaust memory.
            index.load_index(str(path), max_elements=slots, allow_replace_deleted=False)
        except (RuntimeError, MemoryError) as e:
            raise IndexFileError(f"{path}: hnswlib refused it ({e}); expected an hnswlib 0.8 index") from None
        if (index.element_count, index.dim, index.max_elements) != (meta["element_count"], params.dim, slots):
            raise IndexFileError(f"{path}: loaded (elements, dim, capacity) = ({index.element_count}, {index.dim}, "
                                 f"{index.max_elements}); expected ({meta['element_count']}, {params.dim}, {slots})")
        index.set_ef(params.ef_search)
        lab = labels.tolist()
        return cls(params, index, {x for x, dl in zip(lab, deleted.tolist()) if not dl},
                   {x for x, dl in zip(lab, deleted.tolist()) if dl})


# ---------------------------------------------------------------------------------------------- verification
