"""Where the candidates' full tokens live: the interface the runtime reads them through, and a sharded store.

The retriever and the reranker read a candidate's tokens through five calls on `snapshot.cache`, whatever holds
them: `tokens(i)` (dequantized float32 (L_i, H)), `quantized(i)`, `grid(i)`, `t_con(indices)` and `has_t_con`
(plus `count`, `hidden`, `lengths`). That is `TokenStore` below. Two implementations:

* `TokenCache` (token_cache.py): one memory-mapped folder, what every index writes today;
* `ShardedTokenStore` (here): several such folders, one per shard, a candidate's shard chosen by a hash of its
  candidate id, so that shards can live on different disks or machines (docs/SCALE.md sizes it). This machine
  exercises it with shard folders on one disk; a remote shard is the same reader behind a network fetch.

    STORE/
      shards.json    kind, format_version, count, hidden, has_t_con, t_con_dtype, shards, key, dids_sha256, and
                     locator.i64's size and sha256 (written last, atomically: the whole folder via atomic_dir)
      locator.i64    <i8 (count, 2): label -> (shard, position in that shard)
      s000/ s001/ …  each a token cache (token_cache.py), verified on open

Shard of a candidate: `sha256(did)[:8]` as a little-endian integer, modulo the shard count (stable across
processes and Python versions, unlike `hash()`). Tokens are copied as stored (int8 + scales), never re-quantized,
so a sharded store returns byte-identical tokens. `Index.use_token_store(store)` makes an index's snapshots read
from it (it must hold exactly the generation's rows: same count, same dids in the same order).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from retrv.runtime.errors import CacheFileError, InputError
from retrv.runtime.folder import check_table, check_version, describe, is_int, member, one_line, read_manifest, \
    verify_files
from retrv.runtime.fsutil import atomic_dir, atomic_write_bytes, atomic_write_json
from retrv.runtime.index.token_cache import TokenCache, TokenCacheWriter

SHARDS_JSON = "shards.json"
LOCATOR = "locator.i64"
KIND = "retrv-token-shards"
FORMAT_VERSION = 1
KEY = "sha256(did)[:8] little-endian mod shards"
MAX_SHARDS = 4096  # one folder each; past a few thousand a directory listing becomes the bottleneck
MAX_SHARDS_JSON_BYTES = 1 << 16  # a real shards.json is under 1 KB


@runtime_checkable
class TokenStore(Protocol):
    """What the runtime reads a candidate's tokens through (labels are the index's candidate positions)."""

    @property
    def count(self) -> int: ...

    @property
    def hidden(self) -> int: ...

    @property
    def has_t_con(self) -> bool: ...

    @property
    def lengths(self) -> np.ndarray: ...

    def quantized(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...

    def tokens(self, i: int) -> np.ndarray: ...

    def grid(self, i: int) -> tuple[int, int, int] | None: ...

    def t_con(self, indices: Sequence[int] | np.ndarray) -> np.ndarray: ...

    def bytes_per_candidate(self) -> float: ...


def shard_of(did: str, shards: int) -> int:
    return int.from_bytes(hashlib.sha256(did.encode("utf-8")).digest()[:8], "little") % shards


def dids_digest(dids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in dids:
        h.update(d.encode("utf-8") + b"\n")
    return h.hexdigest()


def _shard_dir(j: int) -> str:
    return f"s{j:03d}"


class ShardedTokenStore:
    """Candidates' tokens spread over shard folders by a hash of their id; reads as one `TokenStore`."""

    def __init__(self, root: Path, meta: dict, shards: list[TokenCache], locator: np.ndarray) -> None:
        self.path, self._meta, self._shards, self._loc = root, meta, shards, locator  # locator (count, 2)
        self._lengths = np.concatenate([s.lengths for s in shards])[self._order()] if len(locator) else \
            np.zeros(0, np.int64)
        self._lengths.flags.writeable = False

    def _order(self) -> np.ndarray:
        # position of each label's row in the shards' concatenated lengths
        starts = np.concatenate([[0], np.cumsum([s.count for s in self._shards])])[:-1]
        return starts[self._loc[:, 0]] + self._loc[:, 1]

    # -- write --------------------------------------------------------------------------------------------------------
    @classmethod
    def write(cls, source: TokenStore, dids: Sequence[str], out: str | os.PathLike, shards: int = 4
              ) -> "ShardedTokenStore":
        """Copy `source` (label i is candidate `dids[i]`) into `shards` shard folders at `out` (written beside it,
        renamed into place)."""
        if not is_int(shards) or not 1 <= shards <= MAX_SHARDS:
            raise InputError(f"shards: got {shards!r}; expected an integer in [1, {MAX_SHARDS}]")
        if len(dids) != source.count or not all(isinstance(d, str) for d in dids):
            raise InputError(f"dids: got {len(dids)} ids for {source.count} candidates; expected one string each")
        t_con_dtype = getattr(source, "t_con_dtype", None) or "float16"
        which = np.array([shard_of(d, shards) for d in dids], dtype=np.int64)  # (count,)
        locator = np.zeros((len(dids), 2), dtype="<i8")
        with atomic_dir(Path(out)) as tmp:
            writers = [TokenCacheWriter(tmp / _shard_dir(j), hidden=source.hidden, has_t_con=source.has_t_con,
                                        t_con_dtype=t_con_dtype) for j in range(shards)]
            try:
                for i in range(source.count):
                    j = int(which[i])
                    q, s = source.quantized(i)
                    t = source.t_con([i])[0] if source.has_t_con else None
                    locator[i] = (j, writers[j].add_quantized(q, s, source.grid(i), t))
            except BaseException:
                for w in writers:
                    w.abort()
                raise
            for w in writers:
                w.close()
            atomic_write_bytes(tmp / LOCATOR, locator.tobytes())
            atomic_write_json(tmp / SHARDS_JSON, {
                "kind": KIND, "format_version": FORMAT_VERSION, "count": len(dids), "hidden": source.hidden,
                "has_t_con": source.has_t_con, "t_con_dtype": t_con_dtype if source.has_t_con else None,
                "shards": shards, "key": KEY, "dids_sha256": dids_digest(dids),
                "files": {LOCATOR: describe(tmp, LOCATOR)}})
        return cls.open(out)

    # -- open ---------------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike, verify: str = "full") -> "ShardedTokenStore":
        root = Path(directory)
        path = root / SHARDS_JSON
        meta = read_manifest(path, CacheFileError, MAX_SHARDS_JSON_BYTES, "a shards.json written by "
                             "ShardedTokenStore.write")
        if meta.get("kind") != KIND:
            raise CacheFileError(one_line(f"{path}: kind {meta.get('kind')!r}; expected {KIND!r}"))
        check_version(path, meta.get("format_version"), FORMAT_VERSION, CacheFileError)
        for name, lo, hi in (("count", 0, None), ("hidden", 1, None), ("shards", 1, MAX_SHARDS)):
            v = meta.get(name)
            if not is_int(v) or v < lo or (hi is not None and v > hi):
                raise CacheFileError(one_line(f"{path}: {name} is {v!r}; expected an integer >= {lo}"))
        if meta.get("key") != KEY or not isinstance(meta.get("has_t_con"), bool) \
                or not isinstance(meta.get("dids_sha256"), str):
            raise CacheFileError(one_line(f"{path}: key/has_t_con/dids_sha256 are {meta.get('key')!r}/"
                                          f"{meta.get('has_t_con')!r}/{meta.get('dids_sha256')!r}; expected "
                                          f"{KEY!r}, a bool and a sha256"))
        files = check_table(path, meta.get("files"), CacheFileError)
        if sorted(files) != [LOCATOR] or files[LOCATOR]["bytes"] != meta["count"] * 16:
            raise CacheFileError(one_line(f"{path}: files {files}; expected {LOCATOR} of {meta['count'] * 16} bytes"))
        verify_files(root, files, CacheFileError, verify)
        locator = np.frombuffer(member(root, LOCATOR, CacheFileError).read_bytes(), dtype="<i8").reshape(-1, 2)
        shards = [TokenCache.open(root / _shard_dir(j), verify=verify) for j in range(meta["shards"])]
        for j, shard in enumerate(shards):
            mine = np.sort(locator[locator[:, 0] == j, 1])
            if not np.array_equal(mine, np.arange(shard.count)):
                raise CacheFileError(f"{root / LOCATOR}: shard {j} positions are not 0..{shard.count - 1}; expected "
                                     f"each of the shard's {shard.count} candidates exactly once")
            if shard.hidden != meta["hidden"] or shard.has_t_con != meta["has_t_con"]:
                raise CacheFileError(f"{root / _shard_dir(j)}: hidden {shard.hidden}, has_t_con {shard.has_t_con}; "
                                     f"expected {meta['hidden']}, {meta['has_t_con']} (as {SHARDS_JSON} says)")
        if len(locator) != meta["count"] or (len(locator) and locator[:, 0].max() >= len(shards)):
            raise CacheFileError(f"{root / LOCATOR}: {len(locator)} entries; expected {meta['count']} in range")
        return cls(root, meta, shards, np.array(locator))

    # -- the TokenStore interface ---------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self._meta["count"]

    def __len__(self) -> int:
        return self.count

    @property
    def hidden(self) -> int:
        return self._meta["hidden"]

    @property
    def has_t_con(self) -> bool:
        return self._meta["has_t_con"]

    @property
    def t_con_dtype(self) -> str | None:
        return self._meta["t_con_dtype"]

    @property
    def shards(self) -> int:
        return len(self._shards)

    @property
    def dids_sha256(self) -> str:
        return self._meta["dids_sha256"]

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def total_tokens(self) -> int:
        return int(self._lengths.sum())

    def _where(self, i) -> tuple[TokenCache, int]:
        if not is_int(i) and not isinstance(i, np.integer) or not 0 <= i < self.count:
            raise InputError(f"candidate index {i!r}: out of range; expected an integer 0 <= i < {self.count}")
        j, pos = self._loc[int(i)]
        return self._shards[int(j)], int(pos)

    def quantized(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        shard, pos = self._where(i)
        return shard.quantized(pos)

    def tokens(self, i: int) -> np.ndarray:
        shard, pos = self._where(i)
        return shard.tokens(pos)

    def grid(self, i: int) -> tuple[int, int, int] | None:
        shard, pos = self._where(i)
        return shard.grid(pos)

    def t_con(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise InputError(f"indices: got {idx.dtype} {idx.shape}; expected a 1-D sequence of integers")
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            bad = int(idx[(idx < 0) | (idx >= self.count)][0])
            raise InputError(f"candidate index {bad}: out of range; expected 0 <= i < {self.count}")
        out = np.empty((len(idx), self.hidden), np.float32)  # (k, H)
        loc = self._loc[idx.astype(np.int64)]
        for j in np.unique(loc[:, 0]).tolist():  # one gather per shard touched
            mask = loc[:, 0] == j
            out[mask] = self._shards[j].t_con(loc[mask, 1])
        return out

    def bytes_per_candidate(self) -> float:
        total = sum(s.nbytes for s in self._shards) + (self.path / LOCATOR).stat().st_size
        return total / self.count if self.count else 0.0

    def __repr__(self) -> str:
        return f"ShardedTokenStore({str(self.path)!r}, count={self.count}, shards={self.shards})"
