"""Writing the candidate token cache: new caches built atomically, appends that survive a crash.

The format and the reader are in `retrv.runtime.index.token_cache`; this module only writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrv.runtime.errors import InputError
from retrv.runtime.fsutil import atomic_dir, atomic_write_json
from retrv.runtime.index.token_cache import (CACHE_JSON, FORMAT_VERSION, KIND, LOCK_NAME, T_CON_DTYPES, T_CON_MAX_REL_ERROR,
                                       data_file, dtypes_of, cache_error, hash_prefix, is_int, file_layout, read_meta,
                                       quantize_int8)

logger = logging.getLogger(__name__)


class TokenCacheWriter:
    """Streams candidates into a new cache (the constructor) or onto an existing one (`extend`).

        with TokenCacheWriter("index/tokens", hidden=2048, has_t_con=True) as w:
            i = w.add(tokens, grid=(1, 16, 16), t_con=t_con)     # tokens float32 (L, H); i = 0, 1, 2, ...

    Leaving the block with an exception (or calling `abort()`) discards what this writer added. A directory that
    already exists and is not empty is refused unless `overwrite=True` (then it is replaced on `close()`).
    """

    def __init__(self, directory: str | os.PathLike, hidden: int, has_t_con: bool, *,
                 t_con_dtype: str = "float16", overwrite: bool = False):
        if not is_int(hidden) or hidden < 1:
            raise InputError(f"hidden: got {hidden!r}; expected an integer >= 1")
        if not isinstance(has_t_con, bool):
            raise InputError(f"has_t_con: got {has_t_con!r}; expected True or False")
        if t_con_dtype not in T_CON_DTYPES:
            raise InputError(f"t_con_dtype: got {t_con_dtype!r}; expected one of {sorted(T_CON_DTYPES)}")
        final = Path(directory)
        if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
            raise cache_error(f"{final}: already exists; expected a new directory (pass overwrite=True to replace it, "
                        f"or use TokenCacheWriter.extend to append)")
        self._dir_cm = atomic_dir(final)
        root = self._dir_cm.__enter__()
        self._setup(final, root, int(hidden), t_con_dtype if has_t_con else None, 0, 0, {}, mode="new")

    @classmethod
    def extend(cls, directory: str | os.PathLike, meta_in: str | os.PathLike | None = None,
               meta_out: str | os.PathLike | None = None) -> TokenCacheWriter:
        """Open an existing cache for appending (see the module docstring for the crash-safety argument).
        Always hashes the existing data once, to continue its sha256 and to refuse a modified cache.

        `meta_in` / `meta_out`: where the description is read from and written to on `close()` (default
        `cache.json` in the directory). An index gives each generation its own description: the old one keeps
        describing a valid prefix of the data files until the new generation is committed."""
        self = cls.__new__(cls)
        root = Path(directory)
        if not root.is_dir():
            raise cache_error(f"{root}: token cache directory not found; expected a directory with {CACHE_JSON}")
        self._lock_fd = _lock(root)
        try:
            meta = read_meta(root, None if meta_in is None else Path(meta_in))
            hashes = {}
            for name in meta["layout"]:
                recorded = meta["files"][name]
                path = data_file(root, name, recorded["bytes"])
                h = hash_prefix(path, recorded["bytes"])
                if h.hexdigest() != recorded["sha256"]:
                    raise cache_error(f"{path}: sha256 of the first {recorded['bytes']} bytes {h.hexdigest()}; "
                                f"expected {recorded['sha256']} (modified file)")
                if os.path.getsize(path) > recorded["bytes"]:
                    logger.warning("%s: truncating the tail of an interrupted append", path)
                    os.truncate(path, recorded["bytes"])
                hashes[name] = (h, recorded["bytes"])
            self._dir_cm = None
            self._setup(root, root, meta["hidden"], meta["t_con_dtype"], meta["count"], meta["total_tokens"],
                        hashes, mode="extend", extra=meta.get("extra"))
            if meta_out is not None:
                self._meta_out = Path(meta_out)
        except BaseException:
            self._release_lock()
            raise
        return self

    def _setup(self, final: Path, root: Path, hidden: int, t_con_dtype: str | None, count: int, total: int,
               hashes: dict, mode: str, extra: dict | None = None) -> None:
        self._final, self._root = final, root
        self._meta_out = root / CACHE_JSON
        self._hidden, self._t_con_dtype = hidden, t_con_dtype
        self._count, self._total = count, total
        self._extra = extra or {}
        self.file_layout = file_layout(hidden, t_con_dtype)
        self._files: dict[str, Any] = {}
        self._hash: dict[str, Any] = {}
        self._size: dict[str, int] = {}
        self._start_size: dict[str, int] = {}
        self._closed = False
        self._broken = False
        if mode == "new":
            self._lock_fd = None
        try:
            for name in self.file_layout:
                h, size = hashes.get(name, (hashlib.sha256(), 0))
                self._hash[name], self._size[name], self._start_size[name] = h, size, size
                self._files[name] = open(root / name, "ab" if mode == "extend" else "xb")
        except BaseException as e:
            self._abort(e)
            raise

    @property
    def hidden(self) -> int:
        return self._hidden

    @property
    def has_t_con(self) -> bool:
        return self._t_con_dtype is not None

    @property
    def count(self) -> int:
        """Candidates in the cache so far, including those already there before an `extend`."""
        return self._count

    def add(self, tokens: np.ndarray, grid: Sequence[int] | np.ndarray | None = None,
            t_con: np.ndarray | None = None) -> int:
        """Append one candidate; returns its index. `tokens` float (L, H), L >= 0; `grid` (t, h, w) positive ints,
        given exactly when L > 0, with t*h*w a multiple of L (Qwen2.5-VL: t*h*w = 4L after the 2x2 merge);
        `t_con` float (H,) given exactly when the cache has a content token."""
        if self._closed or self._broken:
            raise InputError(f"{self._final}: token cache writer is {'closed' if self._closed else 'broken'}; "
                             f"expected an open writer")
        x = np.asarray(tokens)
        if x.ndim != 2 or x.shape[1] != self._hidden or x.dtype.kind != "f":
            raise InputError(f"tokens: got {x.dtype} {x.shape}; expected float (L, {self._hidden})")
        if not np.isfinite(x).all():
            raise InputError(f"tokens: got {int(np.size(x) - np.isfinite(x).sum())} non-finite values; "
                             f"expected finite floats")
        g = self._check_grid(grid, x.shape[0])
        t = self._check_t_con(t_con)
        return self._append(*quantize_int8(x), g, t)

    def add_quantized(self, q: np.ndarray, scales: np.ndarray, grid: Sequence[int] | np.ndarray | None = None,
                      t_con: np.ndarray | None = None) -> int:
        """Append one candidate as another cache stores it (`TokenCache.quantized`): int8 (L, H) and float32 (L,)
        scales, written as they are (byte-identical; re-quantizing dequantized rows could round differently)."""
        if self._closed or self._broken:
            raise InputError(f"{self._final}: token cache writer is {'closed' if self._closed else 'broken'}; "
                             f"expected an open writer")
        q, s = np.asarray(q), np.asarray(scales)
        if q.ndim != 2 or q.shape[1] != self._hidden or q.dtype != np.int8 or s.shape != (q.shape[0],) \
                or s.dtype.kind != "f" or not np.isfinite(s).all() or (s < 0).any():
            raise InputError(f"quantized tokens: got {q.dtype} {q.shape} with scales {s.dtype} {s.shape}; expected "
                             f"int8 (L, {self._hidden}) and finite non-negative float32 (L,)")
        g = self._check_grid(grid, q.shape[0])
        t = self._check_t_con(t_con)
        return self._append(q, s.astype(np.float32), g, t)

    def _append(self, q: np.ndarray, scales: np.ndarray, g: np.ndarray, t: np.ndarray | None) -> int:
        n = q.shape[0]
        try:
            self._write("tokens.i8", q.tobytes())
            self._write("scales.f32", scales.astype("<f4").tobytes())
            self._write("lengths.i64", np.array([n], "<i8").tobytes())
            self._write("grids.i64", g.tobytes())
            if t is not None:
                self._write(next(k for k in self.file_layout if k.startswith("t_con.")), t.tobytes())
        except BaseException:
            self._broken = True  # a partial candidate is on disk: only abort() is allowed now
            raise
        self._count += 1
        self._total += n
        return self._count - 1

    def _check_grid(self, grid: Any, n: int) -> np.ndarray:
        if grid is None:
            if n:
                raise InputError(f"grid: got None for a candidate with {n} vision tokens; expected (t, h, w)")
            return np.zeros(3, "<i8")
        g = np.asarray(grid)
        if n == 0:
            raise InputError(f"grid: got {g.tolist()} for a candidate with 0 vision tokens; expected None")
        if g.shape != (3,) or g.dtype.kind not in "iu" or (g < 1).any():
            raise InputError(f"grid: got {g.tolist()!r}; expected three positive integers (t, h, w)")
        cells = int(np.prod(g.astype(np.int64)))
        if cells % n:
            raise InputError(f"grid: got {g.tolist()} ({cells} patches) for {n} tokens; expected a multiple of "
                             f"the token count (t*h*w = merge^2 x L)")
        return g.astype("<i8")

    def _check_t_con(self, t_con: Any) -> np.ndarray | None:
        if self._t_con_dtype is None:
            if t_con is not None:
                raise InputError("t_con: got a vector for a cache written with has_t_con=False; expected None")
            return None
        if t_con is None:
            raise InputError(f"t_con: got None; expected float ({self._hidden},) (the cache has has_t_con=True)")
        v = np.asarray(t_con)
        if v.shape != (self._hidden,) or v.dtype.kind != "f" or not np.isfinite(v).all():
            raise InputError(f"t_con: got {v.dtype} {v.shape}; expected finite float ({self._hidden},)")
        with np.errstate(over="ignore"):  # an fp16 overflow becomes inf and is refused just below
            stored = v.astype(T_CON_DTYPES[self._t_con_dtype])
        norm = float(np.linalg.norm(v.astype(np.float64)))
        if norm > 0:
            err = float(np.linalg.norm(stored.astype(np.float64) - v)) / norm
            if not err <= T_CON_MAX_REL_ERROR:  # also catches inf from an fp16 overflow
                raise InputError(f"t_con: {self._t_con_dtype} relative error {err:.3g} (max |value| "
                                 f"{float(np.abs(v).max()):.3g}); expected <= {T_CON_MAX_REL_ERROR}: "
                                 f"write the cache with t_con_dtype='float32'")
        return stored

    def _write(self, name: str, data: bytes) -> None:
        self._files[name].write(data)
        self._hash[name].update(data)
        self._size[name] += len(data)

    def close(self) -> Path:
        """Flush the data, write cache.json last (atomically), and for a new cache rename it into place."""
        if self._closed:
            return self._final
        if self._broken:
            self.abort()
            raise cache_error(f"{self._final}: a write failed part-way through a candidate; the additions were discarded")
        try:
            for f in self._files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            meta = {
                "kind": KIND, "format_version": FORMAT_VERSION, "hidden": self._hidden, "count": self._count,
                "total_tokens": self._total, "has_t_con": self.has_t_con, "dtypes": dtypes_of(self.file_layout),
                "files": {n: {"bytes": self._size[n], "sha256": self._hash[n].hexdigest()} for n in self.file_layout},
                "extra": self._extra,
            }
            atomic_write_json(self._meta_out, meta)
        except BaseException as e:
            self._abort(e)
            raise
        self._closed = True
        if self._dir_cm is not None:
            self._dir_cm.__exit__(None, None, None)  # fsync the tree, rename it into place
        self._release_lock()
        logger.info("%s: %d candidates, %d tokens", self._final, self._count, self._total)
        return self._final

    def abort(self) -> None:
        """Discard this writer's additions: a new cache is deleted; an extended one is cut back to its old size."""
        self._abort(InputError("token cache writer aborted"))

    def _abort(self, exc: BaseException) -> None:
        if self._closed:
            return
        self._closed = True
        for f in getattr(self, "_files", {}).values():
            with contextlib.suppress(OSError):
                f.close()
        try:
            if self._dir_cm is not None:
                self._dir_cm.__exit__(type(exc), exc, exc.__traceback__)  # deletes the temporary directory
            else:
                for name, size in self._start_size.items():
                    with contextlib.suppress(OSError):
                        os.truncate(self._root / name, size)
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        # Closed once only: a second os.close could hit a descriptor number the process has reused since.
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        _unlock(fd)

    def __enter__(self) -> TokenCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self._abort(exc)


def _lock(root: Path) -> int | None:
    """An exclusive, non-blocking flock on `root/.lock`; released by `_unlock` or when the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one appender at a time is the caller's business there
        return None
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise cache_error(f"{root / LOCK_NAME}: held by another appender; expected one appender at a time") from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the descriptor releases the flock


# ---------------------------------------------------------------------------------------------- reading


