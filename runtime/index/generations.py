"""One index generation on disk: the commit record (`index.json`), the rows, and how a generation is read,
checked, written, committed and cleaned up. `store.Index` composes these into add/delete/search; the layout and the
crash-safety argument are in its module docstring and in docs/ARCHITECTURE.md ("Index generations").
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrv.runtime.errors import IndexFileError, RetrvError
from retrv.runtime.folder import (WriterLock, check_table, check_version, describe, is_int, member, one_line,
                                  read_manifest, verify_files)
from retrv.runtime.fsutil import atomic_write_json, atomic_write_text, fsync_dir
from retrv.runtime.index.ann import HnswIndex, HnswParams
from retrv.runtime.index.ann_files import HNSW_BIN
from retrv.runtime.index.milvus import MilvusStore, MilvusView, check_record, ids_digest
from retrv.runtime.index.token_cache import CACHE_JSON, TokenCache

log = logging.getLogger(__name__)

INDEX_KIND = "retrv-index"
INDEX_FORMAT_VERSION = 2  # 2: generations (g00000N/) and a file table; 1 (a flat folder) is refused: rebuild
INDEX_JSON = "index.json"
CACHE_DIR = "cache"
ROWS = "candidates.jsonl"
ANN_DIR = "ann"
MAX_INDEX_JSON_BYTES = 1 << 20  # a real index.json is about 2 KB
GEN_RE = re.compile(r"g(\d{6,})")
OPEN_RETRIES = 20  # a reader opening generation N while writers commit N+1 and N+2 (which deletes N) starts over
IMAGES_DIR = "images"  # candidate images given inline (`Index.add(images=...)`, `POST /v1/documents`)
IMAGE_EXTS = ("png", "jpg", "webp")
IMAGE_NAME = re.compile(rf"{IMAGES_DIR}/[0-9a-f]{{64}}\.(?:{'|'.join(IMAGE_EXTS)})")  # content-addressed



def gen_dir(generation: int) -> str:
    return f"g{generation:06d}"


def gen_files(generation: int, store: str = "hnsw") -> list[str]:
    g = gen_dir(generation)
    ann = [f"{g}/{ANN_DIR}/{HNSW_BIN}", f"{g}/{ANN_DIR}/ann.json"] if store == "hnsw" else []  # milvus: no files
    return [f"{g}/{ROWS}", f"{g}/{CACHE_JSON}", *ann]


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
    # Where the vectors live: {"store": "hnsw"} (files in the generation) or Milvus's record (milvus.py).
    vectors: dict = field(default_factory=lambda: {"store": "hnsw"})

    @property
    def store(self) -> str:
        return self.vectors["store"]

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
        check_record(d.get("vectors", {"store": "hnsw"}), where)
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Head:
    """index.json, checked: the committed generation, its parameters and its file table."""

    meta: IndexMeta
    files: dict  # name -> {"bytes", "sha256"}: every file of the generation
    cache_files: dict  # cache/<name> -> {"bytes", "sha256"}: the prefix of each append-only data file
    stamp: tuple  # (inode, mtime_ns, size) of index.json when read: a cheap "did it change?"
    images: dict = field(default_factory=dict)  # images/<sha256>.<ext> -> {"bytes", "sha256"}: those live rows use


def stamp_of(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def read_head(root: Path) -> Head:
    path = root / INDEX_JSON
    if not root.is_dir():
        raise IndexFileError(f"{root}: index directory not found; expected a directory built by `retrv index build`")
    stamp = stamp_of(path)
    d = read_manifest(path, IndexFileError, MAX_INDEX_JSON_BYTES, "an index.json written by `retrv index build`")
    if d.get("kind", INDEX_KIND) != INDEX_KIND:
        raise IndexFileError(one_line(f"{path}: kind {d.get('kind')!r}; expected {INDEX_KIND!r}"))
    check_version(path, d.get("format_version"), INDEX_FORMAT_VERSION, IndexFileError, oldest=2,
                  older_hint="rebuild it with `retrv index build` (generations replaced the flat layout)")
    meta = IndexMeta.from_dict(d, str(path))
    files = check_table(path, d.get("files"), IndexFileError)
    cache_files = check_table(path, d.get("cache_files"), IndexFileError)
    want = sorted(gen_files(meta.generation, meta.store))
    if sorted(files) != want:
        raise IndexFileError(one_line(f"{path}: files {sorted(files)}; expected {want}"))
    if not all(n.startswith(f"{CACHE_DIR}/") and n.count("/") == 1 for n in cache_files):
        raise IndexFileError(one_line(f"{path}: cache_files {sorted(cache_files)}; expected files in {CACHE_DIR}/"))
    images = check_table(path, d.get("images", {}), IndexFileError)  # absent in an index that never had one
    if bad := next((n for n in images if not IMAGE_NAME.fullmatch(n)), None):
        raise IndexFileError(one_line(f"{path}: images has {bad!r}; expected {IMAGES_DIR}/<sha256>.<"
                                      f"{'|'.join(IMAGE_EXTS)}>"))
    return Head(meta, files, cache_files, stamp, images)


# ---------------------------------------------------------------------------------------------- rows


def _images_prefix(root: Path) -> str:
    return os.path.join(os.path.abspath(root), IMAGES_DIR) + os.sep


def write_rows(path: Path, rows: list[dict], root: Path | None = None) -> None:
    """Rows as JSON lines. An image inside `root`'s images/ is written relative ("images/<sha>.<ext>"), so the index
    folder can move; every other img_path stays absolute."""
    prefix = _images_prefix(root) if root is not None else None

    def portable(r: dict) -> dict:
        if prefix and r.get("img_path", "").startswith(prefix):
            return {**r, "img_path": f"{IMAGES_DIR}/{r['img_path'][len(prefix):]}"}
        return r

    atomic_write_text(path, "".join(json.dumps(portable(r), ensure_ascii=False) + "\n" for r in rows))


def image_names(root: Path, rows) -> set[str]:
    """The index's own images (in images/) that live rows use, as names relative to `root`."""
    prefix = _images_prefix(root)
    return {f"{IMAGES_DIR}/{r['img_path'][len(prefix):]}" for r in rows
            if not r["deleted"] and r.get("img_path", "").startswith(prefix)}


def read_rows(path: Path, root: Path | None = None) -> list[dict]:
    """The rows of a candidates.jsonl; with `root`, an "images/<sha>.<ext>" img_path comes back absolute inside it."""
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
        if root is not None and row.get("img_path", "").startswith(f"{IMAGES_DIR}/"):
            if not IMAGE_NAME.fullmatch(row["img_path"]):
                raise IndexFileError(one_line(f"{path}:{n}: img_path {row['img_path']!r}; expected {IMAGES_DIR}/"
                                              f"<sha256>.<{'|'.join(IMAGE_EXTS)}> or an absolute path"))
            row["img_path"] = os.path.join(os.path.abspath(root), row["img_path"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- one generation


class IndexSnapshot:
    """One committed generation, immutable: its rows, ANN and token cache always agree. Every search and every
    row/token lookup of one query goes through the same snapshot."""

    def __init__(self, root: Path, meta: IndexMeta, ann: HnswIndex | MilvusView, rows: list[dict], cache: TokenCache
                 ) -> None:
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

    def with_tokens(self, store) -> "IndexSnapshot":
        """This generation reading its candidates' tokens from another `TokenStore` (token_store.py), which must
        hold exactly these rows: the same count, hidden size, content tokens and dids in the same order."""
        from retrv.runtime.index.token_store import dids_digest

        got = (store.count, store.hidden, store.has_t_con)
        want = (len(self.rows), self.cache.hidden, self.cache.has_t_con)
        if got != want or getattr(store, "dids_sha256", None) != dids_digest([r["did"] for r in self.rows]):
            raise IndexFileError(f"{getattr(store, 'path', store)}: a token store of (count, hidden, has_t_con) = "
                                 f"{got}; expected {want} and the dids of {self.path} generation {self.generation} "
                                 f"(write the store again from this generation)")
        return IndexSnapshot(self.path, self.meta, self.ann, list(self.rows), store)


def hnsw_params(meta: IndexMeta) -> HnswParams:
    return HnswParams(metric=meta.metric, dim=meta.dim, M=meta.m, ef_construction=meta.ef_construction,
                      ef_search=meta.ef_search)


def load_generation(root: Path, head: Head, verify: str, locked: bool = False) -> IndexSnapshot:
    meta = head.meta
    verify_files(root, head.files, IndexFileError, verify)
    verify_files(root, head.images, IndexFileError, verify)
    for name in head.cache_files:
        member(root, name, IndexFileError)  # no symlink among the shared data files; TokenCache checks the rest
    g = root / gen_dir(meta.generation)
    cache = TokenCache.open(root / CACHE_DIR, verify=verify, meta_path=g / CACHE_JSON)
    recorded = {f"{CACHE_DIR}/{n}": e for n, e in cache.files.items()}
    if recorded != head.cache_files:
        raise IndexFileError(f"{g / CACHE_JSON}: describes {sorted(recorded)} unlike {INDEX_JSON}'s cache_files; "
                             f"expected the same prefixes")
    rows = read_rows(g / ROWS, root)
    if meta.store == "hnsw":
        ann = HnswIndex.load(g / ANN_DIR, expected_params=hnsw_params(meta))
    else:
        ann = MilvusView(open_milvus(root, head, rows, locked), rows)
    check_consistent(root, meta, ann, rows, cache)
    if (used := image_names(root, rows)) != set(head.images):
        raise IndexFileError(one_line(f"{root / INDEX_JSON}: images {sorted(head.images)}; the live rows use "
                                      f"{sorted(used)}; expected the same"))
    return IndexSnapshot(root, meta, ann, rows, cache)


class _Moved(Exception):
    """The committed generation changed while a Milvus mismatch waited for the writer lock: open again."""


def open_milvus(root: Path, head: Head, rows: list[dict], locked: bool) -> MilvusStore:
    """The collection of this generation, its ids checked against the live rows: orphans (a killed add's inserts,
    a killed delete's leftovers) are deleted under the writer lock; a live row without a vector is refused."""
    meta, rec = head.meta, head.meta.vectors
    store = MilvusStore.open(rec, root, hnsw_params(meta))
    live = np.array([i for i, r in enumerate(rows) if not r["deleted"]], dtype=np.int64)
    if rec["count"] != len(live) or rec["ids_sha256"] != ids_digest(live):
        raise IndexFileError(f"{root / INDEX_JSON}: vectors.count/ids_sha256 do not describe the live rows "
                             f"({len(live)}); expected the record of generation {meta.generation}")
    ids = store.ids(upto=len(rows))
    missing = np.setdiff1d(live, ids)
    if len(missing):
        raise IndexFileError(f"Milvus at {store.uri}: collection {store.collection!r} lacks {len(missing)} live "
                             f"candidates' vectors (label {int(missing[0])}, did {rows[int(missing[0])]['did']!r}); "
                             f"expected all {len(live)}: rebuild the index (or restore the collection)")
    orphans = np.setdiff1d(ids, live)
    if len(orphans):
        if locked:
            _delete_orphans(root, store, orphans)
        else:
            with WriterLock(root, IndexFileError):
                if stamp_of(root / INDEX_JSON) != head.stamp:
                    raise _Moved()
                _delete_orphans(root, store, np.setdiff1d(store.ids(upto=len(rows)), live))
    return store


def _delete_orphans(root: Path, store: MilvusStore, orphans: np.ndarray) -> None:
    log.warning("%s: deleting %d orphan vectors from Milvus collection %r (an interrupted update): labels %s",
                root, len(orphans), store.collection, orphans[:8].tolist())
    store.delete(orphans)


def check_consistent(root: Path, meta: IndexMeta, ann: HnswIndex, rows: list[dict], cache: TokenCache) -> None:
    where = root / gen_dir(meta.generation)
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


def load(root: Path, verify: str, locked: bool = False) -> tuple[Head, IndexSnapshot]:
    """Open the committed generation; start over if a writer moved past it (and deleted it) meanwhile. `locked`:
    the caller holds the writer lock (Milvus orphans are then deleted without taking it)."""
    for attempt in range(OPEN_RETRIES):
        head = read_head(root)
        try:
            return head, load_generation(root, head, verify, locked)
        except _Moved:
            continue
        except (RetrvError, OSError) as e:
            # A file of this generation vanished or changed under us (the token cache's description, the graph:
            # any of them): if a writer committed meanwhile, that is why; read the new head and start over.
            if attempt + 1 < OPEN_RETRIES and stamp_of(root / INDEX_JSON) != head.stamp:
                continue
            if isinstance(e, OSError):
                raise IndexFileError(f"{root}: {e.strerror or e} ({e.filename}); expected the files of generation "
                                     f"{head.meta.generation}") from None
            raise
    raise AssertionError("unreachable")


def commit(root: Path, meta: IndexMeta, images=()) -> Head:
    """Describe generation `meta.generation` (already written and fsynced, like the `images` its live rows use) in
    a new index.json: the commit point."""
    g = meta.generation
    files = {name: describe(root, name) for name in gen_files(g, meta.store)}
    cache = TokenCache.open(root / CACHE_DIR, verify="size", meta_path=root / gen_dir(g) / CACHE_JSON)
    cache_files = {f"{CACHE_DIR}/{n}": e for n, e in cache.files.items()}
    image_table = {name: describe(root, name) for name in sorted(images)}
    record = {"kind": INDEX_KIND, **asdict(meta), "files": files, "cache_files": cache_files}
    if image_table:  # absent otherwise: an index without inline images reads as it did before they existed
        record["images"] = image_table
    atomic_write_json(root / INDEX_JSON, record)
    return Head(meta, files, cache_files, stamp_of(root / INDEX_JSON), image_table)


def clean_images(root: Path, keep: set[str]) -> list[str]:
    """Remove images/ files no kept generation uses (a deleted candidate's, a killed add's) and temporary files."""
    removed = []
    if not (root / IMAGES_DIR).is_dir():
        return removed
    for entry in os.scandir(root / IMAGES_DIR):
        name = f"{IMAGES_DIR}/{entry.name}"
        if name not in keep and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(name)
    return removed


def fsync_generation(gdir: Path) -> None:
    for dirpath, _, names in os.walk(gdir):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
    fsync_dir(gdir.parent)


def clean(root: Path, generation: int) -> list[str]:
    """Remove what killed writers left: generations other than `generation` and the one before it, and temporary
    files (`.<name>.<random>.tmp`). Called under the writer lock, so none of it belongs to a live writer."""
    removed = []
    for entry in os.scandir(root):
        m = GEN_RE.fullmatch(entry.name)
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
    keep = set(read_head(root).images)
    previous = root / gen_dir(generation - 1) / ROWS
    if previous.exists():  # generation N-1 stays readable, with the images its rows use
        keep |= image_names(root, read_rows(previous, root))
    removed += clean_images(root, keep)
    if removed:
        log.info("%s: removed leftovers of interrupted writes: %s", root, ", ".join(sorted(removed)))
    return removed


# ---------------------------------------------------------------------------------------------- the index
