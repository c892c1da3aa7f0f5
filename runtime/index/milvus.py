"""The coarse stage on Milvus: the candidates' vectors in a Milvus collection instead of an hnswlib file.

Where the vectors live is the index's choice (`index.json` records it under `vectors`), made at build time with
`retrv index build ... --vector-store`:

    hnsw                         hnswlib files inside each generation (`g00000N/ann/`): the default
    milvus                       an embedded Milvus Lite database inside the index folder, `INDEX/vectors.db`
    milvus://HOST:PORT[/NAME]    a Milvus server or cluster (collection NAME, default `retrv_<random>`)

Milvus Lite allows one process per database file; serving one index from several processes needs a server.

Milvus is state outside the generations, so the commit protocol (store.py, docs/ARCHITECTURE.md "Index
generations") is extended, not replaced:

* an add inserts the new labels' vectors into Milvus and flushes them *before* generation N+1 is committed; a kill
  in between leaves rows in Milvus whose labels no committed row has (orphans);
* a delete commits generation N+1 first and deletes from Milvus after; a kill in between leaves vectors of rows
  that generation N+1 marks deleted (orphans again).

So a kill only ever leaves orphans, never a live row without its vector. On open the collection's ids are listed
and compared with the live rows: orphans are deleted under the writer lock (repaired), a missing live vector is
refused in one line. `index.json` records the collection, its schema and index parameters (HNSW M, efConstruction,
ef; metric), the live count and the sha256 of the sorted live ids; all are checked on open.

A search of generation N filters `label < len(rows)` inside Milvus (an in-flight add's labels are never returned)
and drops labels the rows mark deleted (a delete's vectors between its commit and its Milvus delete).

pymilvus (and milvus-lite for a local file) are imported here, lazily: `import retrv.runtime` stays light.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrv.runtime.errors import IndexFileError, InputError, MissingDependencyError
from retrv.runtime.folder import is_int, one_line
from retrv.runtime.index.ann import HnswParams, as_labels, as_vectors

log = logging.getLogger(__name__)

LOCAL_DB = "vectors.db"  # Milvus Lite's data directory inside the index folder
LOCAL_COLLECTION = "vectors"
PAGE = 16384  # Milvus's largest topk and query limit: ids are listed and vectors read in label ranges of this width
INSERT_BATCH = 2048  # rows per insert: 2048 x 4 KB at dim 1024 keeps a gRPC message (64 MB cap) small
CONNECT_TIMEOUT_S = 10.0  # an unreachable server fails the command in seconds, not after gRPC's long default
METRIC_TO_MILVUS = {"cosine": "COSINE", "ip": "IP", "l2": "L2"}  # the same score conventions as ann.py
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # Milvus's collection-name rule
_SPEC_RE = re.compile(r"milvus://(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})(?:/(?P<name>[^/]*))?")
STORES = ("hnsw", "milvus")


@dataclass(frozen=True)
class StoreSpec:
    """What `--vector-store` asked for: `hnsw`, `milvus` (Milvus Lite in INDEX/vectors.db) or a Milvus server."""

    store: str  # "hnsw" | "milvus"
    uri: str | None = None  # None: the local Milvus Lite file; else "http://HOST:PORT"
    collection: str | None = None

    @classmethod
    def parse(cls, text: Any) -> "StoreSpec":
        if text in ("hnsw", "milvus"):
            return cls(text, None, LOCAL_COLLECTION if text == "milvus" else None)
        m = _SPEC_RE.fullmatch(text) if isinstance(text, str) else None
        if m is None or not 0 < int(m["port"]) < 65536:
            raise InputError(one_line(f"--vector-store: got {text!r}; expected hnsw, milvus or "
                                      f"milvus://HOST:PORT[/collection]"))
        name = m["name"] or f"retrv_{secrets.token_hex(6)}"
        if not _NAME_RE.fullmatch(name):
            raise InputError(one_line(f"--vector-store: collection {name!r}; expected letters, digits and _ "
                                      f"(not starting with a digit)"))
        return cls("milvus", f"http://{m['host']}:{m['port']}", name)


def ids_digest(labels: np.ndarray) -> str:
    """sha256 of the sorted ids as little-endian int64: what index.json records of the collection."""
    return hashlib.sha256(np.sort(np.asarray(labels, dtype="<i8")).tobytes()).hexdigest()


def check_record(d: Any, where: str) -> dict:
    """index.json's `vectors` object, type-checked (a one-line IndexFileError otherwise)."""
    if not isinstance(d, dict) or d.get("store") not in STORES:
        raise IndexFileError(one_line(f"{where}: vectors is {d!r}; expected an object with store 'hnsw' or 'milvus'"))
    if d["store"] == "hnsw":
        return d
    checks = {"uri": lambda v: isinstance(v, str) and (v == LOCAL_DB or re.fullmatch(r"http://[^/\s]+:\d+", v)),
              "collection": lambda v: isinstance(v, str) and _NAME_RE.fullmatch(v),
              "count": lambda v: is_int(v) and v >= 0,
              "ids_sha256": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v),
              "schema": lambda v: isinstance(v, dict), "index": lambda v: isinstance(v, dict)}
    for name, ok in checks.items():
        if not ok(d.get(name)):
            raise IndexFileError(one_line(f"{where}: vectors.{name} is {d.get(name)!r}; expected a valid value "
                                          f"(see retrv.runtime.index.milvus)"))
    return d


def _int_or_none(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return -1  # reported but not a number: never equal to what was asked


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise MissingDependencyError("pymilvus is not installed; install it with: pip install 'retrv-edge[scale]' "
                                     "(or use --vector-store hnsw)") from None
    return pymilvus


def _milvus_error(e: Exception) -> bool:
    return type(e).__module__.startswith(("pymilvus", "grpc"))


_CLIENTS: dict[str, Any] = {}  # one client per uri in a process (Milvus Lite: one server per database file)
_CLIENTS_LOCK = threading.Lock()


def _client(uri: str) -> Any:
    with _CLIENTS_LOCK:
        if uri not in _CLIENTS:
            try:
                _CLIENTS[uri] = _pymilvus().MilvusClient(uri=uri, timeout=CONNECT_TIMEOUT_S)
            except Exception as e:
                if not _milvus_error(e):
                    raise
                raise IndexFileError(one_line(f"Milvus at {uri}: cannot connect ({e}); expected a reachable Milvus "
                                              f"server (or --vector-store milvus for Milvus Lite)")) from None
        return _CLIENTS[uri]


def release_local(db_path: Path) -> None:
    """Stop this process's Milvus Lite server on `db_path` (before its folder is renamed or replaced)."""
    uri = str(Path(db_path).absolute())
    with _CLIENTS_LOCK:
        client = _CLIENTS.pop(uri, None)
    if client is None:
        return
    client.close()
    from milvus_lite import server_manager_instance  # installed with pymilvus's local mode (milvus-lite)

    server_manager_instance.release_server(uri)


class MilvusStore:
    """One Milvus collection holding (label INT64 primary key, vector FLOAT_VECTOR(dim)) with an HNSW index."""

    def __init__(self, uri: str, collection: str, params: HnswParams, local: bool) -> None:
        self.uri, self.collection, self.params, self.local = uri, collection, params, local
        self.client = _client(uri)
        self.milvus_metric = METRIC_TO_MILVUS[params.metric]

    # -- create / open ----------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, spec: StoreSpec, root: Path, params: HnswParams) -> "MilvusStore":
        """A new, empty collection. A server collection of that name must not exist (refused); a local one left in
        `root` by a killed build or migration is dropped."""
        local = spec.uri is None
        uri = str((root / LOCAL_DB).absolute()) if local else spec.uri
        store = cls(uri, spec.collection, params, local)
        c, pm = store.client, _pymilvus()
        with store.errors("create the collection"):
            if c.has_collection(store.collection):
                if not local:
                    raise InputError(one_line(f"Milvus at {uri}: collection {store.collection!r} already exists; "
                                              f"expected a new name (drop it, or name another in milvus://.../NAME)"))
                c.drop_collection(store.collection)
            schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("label", pm.DataType.INT64, is_primary=True)
            schema.add_field("vector", pm.DataType.FLOAT_VECTOR, dim=params.dim)
            index = c.prepare_index_params()
            index.add_index(field_name="vector", index_type="HNSW", metric_type=store.milvus_metric,
                            params={"M": params.M, "efConstruction": params.ef_construction})
            c.create_collection(store.collection, schema=schema, index_params=index)
        return store

    @classmethod
    def open(cls, record: dict, root: Path, params: HnswParams) -> "MilvusStore":
        """The collection `record` (index.json's `vectors`) names, its schema and index checked against it."""
        local = record["uri"] == LOCAL_DB
        uri = str((root / LOCAL_DB).absolute()) if local else record["uri"]
        if local and not (root / LOCAL_DB).is_dir():
            raise IndexFileError(f"{root / LOCAL_DB}: missing; expected the Milvus Lite database that index.json names")
        store = cls(uri, record["collection"], params, local)
        with store.errors("open the collection"):
            if not store.client.has_collection(store.collection):
                raise IndexFileError(one_line(f"Milvus at {uri}: collection {store.collection!r} not found; expected "
                                              f"the collection index.json names (rebuild or migrate the index)"))
            got, want = store.describe(), store.requested()
            for key in ("schema", "index"):
                if want[key] != record[key] or any(v is not None and v != want[key][n] for n, v in got[key].items()):
                    raise IndexFileError(one_line(f"Milvus at {uri}: collection {store.collection!r} {key} is "
                                                  f"{got[key]}; expected {record[key]} (as index.json records)"))
            store.client.load_collection(store.collection)
        return store

    def requested(self) -> dict:
        """The schema and index parameters this store asks for (what index.json records)."""
        return {"schema": {"primary": "label", "vector": "vector", "dim": self.params.dim},
                "index": {"type": "HNSW", "metric": self.milvus_metric, "M": self.params.M,
                          "efConstruction": self.params.ef_construction, "ef": self.params.ef_search}}

    def describe(self) -> dict:
        """The collection's schema and index parameters as the server reports them; None where it does not
        (Milvus Lite reports no HNSW M/efConstruction; ef is a search parameter, never stored)."""
        c = self.client
        desc = c.describe_collection(self.collection)
        fields = {f["name"]: f for f in desc["fields"]}
        dim = fields.get("vector", {}).get("params", {}).get("dim")
        schema = {"primary": "label" if fields.get("label", {}).get("is_primary") else "?",
                  "vector": "vector" if "vector" in fields else "?", "dim": None if dim is None else int(dim)}
        idx = c.describe_index(self.collection, "vector") or {}
        params = idx.get("params") if isinstance(idx.get("params"), dict) else idx
        index = {"type": idx.get("index_type"), "metric": idx.get("metric_type"),
                 "M": _int_or_none(params.get("M")), "efConstruction": _int_or_none(params.get("efConstruction")),
                 "ef": None}
        return {"schema": schema, "index": index}

    def record(self, live: np.ndarray) -> dict:
        """index.json's `vectors` object for a generation whose live labels are `live`."""
        uri = LOCAL_DB if self.local else self.uri
        return {"store": "milvus", "uri": uri, "collection": self.collection, **self.requested(),
                "count": int(len(live)), "ids_sha256": ids_digest(live)}

    # -- writes -------------------------------------------------------------------------------------------------------
    def add(self, labels: Any, vectors: Any) -> None:
        """Insert (or replace) vectors; durable (flushed) when this returns."""
        lab = as_labels(labels)
        vec = as_vectors(vectors, self.params.dim, "vectors")
        if lab.shape[0] != vec.shape[0]:
            raise InputError(f"labels: got {lab.shape[0]} labels for {vec.shape[0]} vectors; expected one per row")
        with self.errors("insert"):
            for a in range(0, len(lab), INSERT_BATCH):
                rows = [{"label": int(x), "vector": v} for x, v in zip(lab[a:a + INSERT_BATCH].tolist(),
                                                                      vec[a:a + INSERT_BATCH].tolist())]
                self.client.upsert(self.collection, rows)
            self.client.flush(self.collection)

    def delete(self, labels: Any) -> None:
        lab = as_labels(labels)
        with self.errors("delete"):
            for a in range(0, len(lab), PAGE):
                self.client.delete(self.collection, ids=lab[a:a + PAGE].tolist())
            self.client.flush(self.collection)

    def drop(self) -> None:
        with self.errors("drop the collection"):
            self.client.drop_collection(self.collection)

    # -- reads ----------------------------------------------------------------------------------------------------------
    def ids(self, upto: int) -> np.ndarray:
        """Every id in the collection, ascending int64: label ranges of PAGE up to `upto`, then past it until empty."""
        out, lo = [], 0
        with self.errors("list the ids"):
            while lo < upto or self.client.query(self.collection, filter=f"label >= {lo}", output_fields=["label"],
                                                  limit=1):
                got = self.client.query(self.collection, filter=f"label >= {lo} and label < {lo + PAGE}",
                                         output_fields=["label"], limit=PAGE)
                out.extend(r["label"] for r in got)
                lo += PAGE
        return np.array(sorted(out), dtype=np.int64)

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        """float32 (n, dim) of the given labels, in their order (migration reads every live vector)."""
        lab = as_labels(labels)
        found: dict[int, list] = {}
        with self.errors("read vectors"):
            for a in range(0, len(lab), PAGE):
                chunk = lab[a:a + PAGE].tolist()
                for r in self.client.get(self.collection, ids=chunk, output_fields=["label", "vector"]):
                    found[int(r["label"])] = r["vector"]
        if missing := [x for x in lab.tolist() if x not in found]:
            raise IndexFileError(one_line(f"Milvus at {self.uri}: label {missing[0]} has no vector in "
                                          f"{self.collection!r}; expected every live candidate's vector"))
        return np.asarray([found[x] for x in lab.tolist()], dtype=np.float32).reshape(len(lab), self.params.dim)

    def search(self, vectors: np.ndarray, k: int, below: int, deleted: frozenset = frozenset()
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among labels < `below` and not in `deleted`: (labels int64 (q, k'), scores float32 (q, k')), best
        first, scores as in ann.py (cosine similarity for cosine). k' = min(k, live)."""
        q = as_vectors(vectors, self.params.dim, "vectors")
        live = below - len(deleted)
        k = min(k, live, PAGE)
        if k <= 0 or not len(q):
            return np.zeros((len(q), max(k, 0)), np.int64), np.zeros((len(q), max(k, 0)), np.float32)
        hits = self._search(q, k, below)
        if deleted and any(sum(int(h["label"]) not in deleted for h in row) < k for row in hits):
            # A delete's vectors stay in Milvus between its commit and its Milvus delete (or after a kill): ask
            # again with room for every label the rows mark deleted. Rare: normally Milvus holds only live labels.
            hits = self._search(q, min(k + len(deleted), PAGE), below)
        labels = np.zeros((len(q), k), np.int64)
        scores = np.zeros((len(q), k), np.float32)
        for i, row in enumerate(hits):
            kept = [(int(h["label"]), float(h["distance"])) for h in row if int(h["label"]) not in deleted][:k]
            if len(kept) < labels.shape[1]:  # Milvus returned fewer than the live count allows
                labels, scores = labels[:, :len(kept)], scores[:, :len(kept)]
            for j, (lab, s) in enumerate(kept[:labels.shape[1]]):
                labels[i, j], scores[i, j] = lab, s
        return labels, scores

    def _search(self, q: np.ndarray, limit: int, below: int) -> list:
        with self.errors("search"):
            return self.client.search(self.collection, data=q.tolist(), limit=limit, filter=f"label < {below}",
                                      output_fields=["label"],
                                      search_params={"metric_type": self.milvus_metric,
                                                     "params": {"ef": max(self.params.ef_search, limit)}})

    def errors(self, what: str):
        return _MilvusErrors(self.uri, self.collection, what)


class _MilvusErrors:
    """pymilvus/gRPC failures as one-line IndexFileErrors naming the server, the collection and the operation."""

    def __init__(self, uri: str, collection: str, what: str) -> None:
        self.uri, self.collection, self.what = uri, collection, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and _milvus_error(exc):
            raise IndexFileError(one_line(f"Milvus at {self.uri}: {self.what} on {self.collection!r} failed ({exc}); "
                                          f"expected a reachable server and an intact collection")) from None
        return False


class MilvusView:
    """One generation's view of the collection: what `IndexSnapshot.ann` is for an index on Milvus (the same
    `search`, `count`, `labels()`, `params` as `HnswIndex`)."""

    def __init__(self, store: MilvusStore, rows: list[dict]) -> None:
        self.store, self.params = store, store.params
        self._below = len(rows)
        self._deleted = frozenset(i for i, r in enumerate(rows) if r["deleted"])
        self._live = np.array([i for i, r in enumerate(rows) if not r["deleted"]], dtype=np.int64)

    @property
    def dim(self) -> int:
        return self.params.dim

    @property
    def count(self) -> int:
        return len(self._live)

    def __len__(self) -> int:
        return self.count

    def labels(self) -> np.ndarray:
        return self._live

    def search(self, vectors: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k: got {k!r}; expected an integer >= 1")
        return self.store.search(vectors, int(k), self._below, self._deleted)


class MilvusWriter:
    """What an update writes through (`add` at once, `delete` after the commit): see the module docstring."""

    def __init__(self, store: MilvusStore) -> None:
        self.store, self.params = store, store.params
        self._pending_deletes: list[int] = []

    def add(self, labels: Any, vectors: Any) -> None:
        self.store.add(labels, vectors)

    def delete(self, labels: Any) -> None:
        self._pending_deletes.extend(as_labels(labels).tolist())

    def after_commit(self) -> None:
        if self._pending_deletes:
            self.store.delete(np.asarray(self._pending_deletes, dtype=np.int64))
            self._pending_deletes = []
