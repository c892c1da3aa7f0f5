"""The candidate token cache: every candidate's merged vision tokens, written once at index time, read every query.
(The format and the reader are here; writing is in `token_cache_writer`.)

A query never re-encodes a candidate image: the vision tower's merged tokens are stored here as int8 with one
fp32 scale per token, memory-mapped on read, together with the vision grid needed for M-RoPE positions and, for a
model with an ICM, the query-independent content token `t_con` (PAPERS.md: Retrv-R1's ICM).

    cache/
      cache.json     format_version, hidden, count, total_tokens, dtypes, and every data file's bytes and sha256
      tokens.i8      int8     (total_tokens, hidden)  candidates' rows back to back, in candidate order
      scales.f32     <f4      (total_tokens,)         one symmetric scale per token row: max|row| / 127
      lengths.i64    <i8      (count,)                L_i, tokens of candidate i (0 for a text-only candidate)
      grids.i64      <i8      (count, 3)              (t, h, w) as the vision tower's image_grid_thw; 0 0 0 = none
      t_con.f16      <f2      (count, hidden)         only with has_t_con (t_con.f32 with t_con_dtype="float32")

The data files are raw little-endian arrays with no header, so the reader maps them with `np.memmap` and never
reads a token it does not return. Candidate i's rows start at sum(lengths[:i]) (computed once at open).

Quantization: symmetric per token, `scale = max|row| / 127`, `q = rint(row / scale)` in [-127, 127] (-128 unused,
so the grid is symmetric). Dequantized `q * scale` is within scale/2 of the original (plus the float32 rounding of
the product, at most 2^-24 * 127 * scale). A zero row gets scale 0 and dequantizes to zeros (no 0/0); so does a
row whose max is below 127 x the smallest float32 subnormal (< 1.8e-43), whose scale underflows to 0. Measured
relative Frobenius error: 0.8% on gaussian rows, 2.8% on heavy-tailed (student-t, 3 d.o.f.) rows of width 2048.

`t_con` is stored as float16 by default. Measured on 10,000 vectors of width 2048 (gaussian at scales 1e-3, 1
and 100, and student-t): relative L2 error 2.1e-4 mean, 3.6e-4 worst; 1 - cosine <= 3e-7; that is 40x below the
int8 error of the tokens it summarizes and at the rounding level of an fp16 decoder, for half the bytes. The writer
measures each vector's fp16 error and refuses one above 1e-3 (a value beyond fp16's range, or a vector living in
its subnormals), naming `t_con_dtype="float32"` as the way out; the choice is recorded in cache.json.

Writes. A new cache is built in a temporary sibling directory (fsutil.atomic_dir) and renamed into place on
`close()`, after `cache.json` is written last; until then the old directory (if any) is untouched. Data are
appended to the files as candidates arrive (nothing accumulates in memory) and hashed on the way.

Appends (`TokenCacheWriter.extend(dir)` or `TokenCache.appender()`) add candidates in place, without a rebuild:
1. take an exclusive lock (`.lock`, flock; one appender at a time; POSIX only, elsewhere the caller must ensure it),
2. read and hash the prefix that cache.json describes, refusing a mismatch, and truncate any tail beyond it (the
   leftovers of an append that crashed),
3. append to the data files, continuing the hashes, then fsync them,
4. replace cache.json atomically (temp file + rename).
A crash before step 4 leaves the old cache.json valid: it describes a prefix of each file, and `TokenCache.open`
checks exactly that prefix (size >= recorded; sha256 of the first `bytes` bytes) and ignores the tail. So a file
longer than cache.json says is accepted (logged), a shorter one is refused as truncated. The cost: an append
re-reads the existing data once to continue the sha256 (stdlib hashes cannot be saved), which also verifies it.
A reader opened before an append keeps seeing the old candidates; reopen to see the new ones.

numpy + stdlib only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrv.runtime.errors import CacheFileError, InputError
from retrv.runtime.folder import check_version, read_manifest
from retrv.runtime.fsutil import CHUNK

logger = logging.getLogger(__name__)

# Bump when a reader of the previous version would misread a cache written by this one (a file's layout or
# meaning changes). Readers refuse a newer version. Additive information goes under `extra`.
FORMAT_VERSION = 1
KIND = "retrv-token-cache"
CACHE_JSON = "cache.json"
LOCK_NAME = ".lock"
QMAX = 127  # symmetric int8: the grid -127..127 has a zero and is its own negation
T_CON_DTYPES = {"float16": "<f2", "float32": "<f4"}
# fp16 rounds a vector within 2.1e-4 (mean) / 3.6e-4 (worst) relative L2 error when it is in range (measured, see
# the module docstring); 1e-3 leaves headroom for that and flags overflow or subnormal vectors.
T_CON_MAX_REL_ERROR = 1e-3
VERIFY_MODES = ("full", "size")
# A real cache.json is under 2 KB; the cap keeps a hostile one from exhausting memory before it is parsed.
MAX_CACHE_JSON_BYTES = 1 << 20

_SHA_RE = re.compile(r"[0-9a-f]{64}")
_TOP_KEYS = {"kind", "format_version", "hidden", "count", "total_tokens", "has_t_con", "dtypes", "files", "extra"}


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())  # the CLI prints errors as one line, and they may quote untrusted JSON


def cache_error(msg: str) -> CacheFileError:
    return CacheFileError(_one_line(msg))


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def file_layout(hidden: int, t_con_dtype: str | None) -> dict[str, tuple[str, str, int]]:
    """file name -> (dtype, what one row is per: "token" or "candidate", items per row)."""
    files = {
        "tokens.i8": ("|i1", "token", hidden),
        "scales.f32": ("<f4", "token", 1),
        "lengths.i64": ("<i8", "candidate", 1),
        "grids.i64": ("<i8", "candidate", 3),
    }
    if t_con_dtype is not None:
        dt = T_CON_DTYPES[t_con_dtype]
        files[f"t_con.{'f16' if t_con_dtype == 'float16' else 'f32'}"] = (dt, "candidate", hidden)
    return files


def _expected_bytes(dtype: str, per: str, width: int, count: int, total_tokens: int) -> int:
    return (total_tokens if per == "token" else count) * width * np.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------- quantization


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (L, H) -> (int8 (L, H), float32 scales (L,)), symmetric per row. Computed in float64 from the stored
    float32 scale, so that dequantization with that scale is within scale/2 of the input."""
    x = np.asarray(tokens, dtype=np.float64)  # (L, H)
    if x.ndim != 2:
        raise InputError(f"tokens: got shape {x.shape}; expected (L, H)")
    scales = (np.abs(x).max(axis=1) / QMAX).astype(np.float32) if x.shape[0] else np.zeros(0, np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)[:, None]  # zero rows: 0 / 1 = 0, no NaN
    q = np.clip(np.rint(x / safe), -QMAX, QMAX).astype(np.int8)  # (L, H)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(int8 (L, H), float32 (L,)) -> float32 (L, H)."""
    return q.astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


# ---------------------------------------------------------------------------------------------- cache.json


def hash_prefix(path: Path, nbytes: int) -> Any:
    """A sha256 object fed with the first `nbytes` bytes of `path` (the file may be longer)."""
    h = hashlib.sha256()
    left = nbytes
    with open(path, "rb") as f:
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise cache_error(f"{path}: ended {left} bytes early; expected at least {nbytes} bytes (truncated file)")
            h.update(chunk)
            left -= len(chunk)
    return h


def read_meta(root: Path, meta_path: Path | None = None) -> dict:
    """Parse and check cache.json (`root/cache.json`, or `meta_path` where the description lives outside the data
    folder, as in an index generation); returns it with `t_con_dtype` and `layout` added. Touches no data file."""
    path = root / CACHE_JSON if meta_path is None else Path(meta_path)
    meta = read_manifest(path, CacheFileError, MAX_CACHE_JSON_BYTES, "the token cache description")
    if meta.get("kind") != KIND:
        raise cache_error(f"{path}: kind {meta.get('kind')!r}; expected {KIND!r}")
    check_version(path, meta.get("format_version"), FORMAT_VERSION, CacheFileError)
    missing = sorted(_TOP_KEYS - {"extra"} - set(meta))
    unknown = sorted(set(meta) - _TOP_KEYS)
    if missing or unknown:
        problem = f"missing fields {missing}" if missing else f"unknown fields {unknown}"
        raise cache_error(f"{path}: {problem}; expected {sorted(_TOP_KEYS)} (additive information goes in 'extra')")
    for key in ("hidden", "count", "total_tokens"):
        if not is_int(meta[key]) or meta[key] < (1 if key == "hidden" else 0):
            raise cache_error(f"{path}: {key} {meta[key]!r}; expected an integer >= {1 if key == 'hidden' else 0}")
    if not isinstance(meta["has_t_con"], bool):
        raise cache_error(f"{path}: has_t_con {meta['has_t_con']!r}; expected true or false")
    dtypes = meta["dtypes"]
    t_con_dtype = None
    if meta["has_t_con"]:
        t_con_dtype = next((k for k, d in T_CON_DTYPES.items() if isinstance(dtypes, dict)
                            and dtypes.get("t_con") == d), None)
        if t_con_dtype is None:
            got = dtypes.get("t_con") if isinstance(dtypes, dict) else dtypes
            raise cache_error(f"{path}: dtypes.t_con {got!r}; expected one of {sorted(T_CON_DTYPES.values())}")
    layout = file_layout(meta["hidden"], t_con_dtype)
    if dtypes != dtypes_of(layout):
        raise cache_error(f"{path}: dtypes {dtypes!r}; expected {dtypes_of(layout)!r}")
    files = meta["files"]
    if not isinstance(files, dict) or set(files) != set(layout):
        got = sorted(files) if isinstance(files, dict) else files
        raise cache_error(f"{path}: files {got!r}; expected {sorted(layout)}")
    for name, (dtype, per, width) in layout.items():
        entry = files[name]
        if not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"} or not is_int(entry["bytes"]) \
                or not isinstance(entry["sha256"], str) or not _SHA_RE.fullmatch(entry["sha256"]):
            raise cache_error(f"{path}: files[{name!r}] {entry!r}; expected {{'bytes': int, 'sha256': 64 hex digits}}")
        want = _expected_bytes(dtype, per, width, meta["count"], meta["total_tokens"])
        if entry["bytes"] != want:
            raise cache_error(f"{path}: files[{name!r}].bytes {entry['bytes']}; expected {want} for count "
                        f"{meta['count']}, total_tokens {meta['total_tokens']}, hidden {meta['hidden']}")
    if "extra" in meta and not isinstance(meta["extra"], dict):
        raise cache_error(f"{path}: extra {meta['extra']!r}; expected a JSON object")
    return {**meta, "t_con_dtype": t_con_dtype, "layout": layout}


def dtypes_of(layout: dict) -> dict[str, str]:
    return {name.split(".")[0]: dtype for name, (dtype, _, _) in layout.items()}


def data_file(root: Path, name: str, recorded: int) -> Path:
    """`root/name`, refused unless it is a regular file of at least `recorded` bytes."""
    path = root / name
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise cache_error(f"{path}: file not found; expected it (listed in {CACHE_JSON})") from None
    if not stat.S_ISREG(st.st_mode):
        raise cache_error(f"{path}: not a regular file; expected a data file of the token cache")
    if st.st_size < recorded:
        raise cache_error(f"{path}: {st.st_size} bytes; expected at least {recorded} (truncated file)")
    if st.st_size > recorded:
        logger.info("%s: %d bytes beyond the %d that %s covers (an interrupted append?); ignored",
                    path, st.st_size - recorded, recorded, CACHE_JSON)
    return path


# ---------------------------------------------------------------------------------------------- writing


class TokenCache:
    """An opened, verified token cache; build it with `TokenCache.open`. Read-only and memory-mapped."""

    def __init__(self, root: Path, meta: dict, arrays: dict[str, np.ndarray], lengths: np.ndarray,
                 meta_path: Path | None = None):
        self._root, self._meta = root, meta
        self._meta_path = root / CACHE_JSON if meta_path is None else Path(meta_path)
        self._q = arrays["tokens.i8"]  # (total_tokens, H) int8, memory-mapped
        self._scales = arrays["scales.f32"]  # (total_tokens,)
        self._grids = arrays["grids.i64"]  # (count, 3)
        self._t_con = next((a for n, a in arrays.items() if n.startswith("t_con.")), None)  # (count, H)
        self._lengths = lengths
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (count + 1,)
        self._nbytes = sum(e["bytes"] for e in meta["files"].values()) + os.path.getsize(self._meta_path)

    @classmethod
    def open(cls, directory: str | os.PathLike, verify: str = "full", meta_path: str | os.PathLike | None = None
             ) -> TokenCache:
        """Check cache.json and the data files, then memory-map them; or raise `CacheFileError` naming the file.

        `verify="full"` also hashes the prefix of every data file that cache.json covers (reads the whole cache
        once, seconds per GB); `verify="size"` checks only sizes: instant, catches truncation and missing files,
        not a modification that keeps the size. Either way a file may be longer than recorded (an interrupted
        append); the tail is ignored. `meta_path`: read the description from there instead of `cache.json` in
        the directory (an index keeps one description per generation over shared, append-only data files).
        """
        if verify not in VERIFY_MODES:
            raise InputError(f"verify: got {verify!r}; expected one of {list(VERIFY_MODES)}")
        root = Path(directory)
        if not root.is_dir():
            raise cache_error(f"{root}: token cache directory not found; expected a directory with {CACHE_JSON}")
        meta = read_meta(root, None if meta_path is None else Path(meta_path))
        paths = {name: data_file(root, name, meta["files"][name]["bytes"]) for name in meta["layout"]}
        if verify == "full":
            for name, path in paths.items():
                recorded = meta["files"][name]
                digest = hash_prefix(path, recorded["bytes"]).hexdigest()
                if digest != recorded["sha256"]:
                    raise cache_error(f"{path}: sha256 {digest}; expected {recorded['sha256']} (modified file)")
        arrays = {}
        for name, (dtype, per, width) in meta["layout"].items():
            rows = meta["total_tokens"] if per == "token" else meta["count"]
            shape = (rows, width) if width > 1 else (rows,)
            if rows == 0:  # mmap cannot map zero bytes
                arrays[name] = np.zeros(shape, dtype)
                arrays[name].flags.writeable = False
            else:
                arrays[name] = np.memmap(paths[name], dtype=dtype, mode="r", shape=shape)
        lengths = np.array(arrays["lengths.i64"], dtype=np.int64)  # (count,), 8 bytes a candidate: read it all
        if (lengths < 0).any() or int(lengths.sum()) != meta["total_tokens"]:
            raise cache_error(f"{paths['lengths.i64']}: lengths sum to {int(lengths.sum())} (min {lengths.min()}); "
                        f"expected non-negative lengths summing to total_tokens {meta['total_tokens']}")
        lengths.flags.writeable = False
        return cls(root, meta, arrays, lengths, None if meta_path is None else Path(meta_path))

    @property
    def path(self) -> Path:
        return self._root

    @property
    def count(self) -> int:
        return self._meta["count"]

    def __len__(self) -> int:
        return self._meta["count"]

    @property
    def hidden(self) -> int:
        return self._meta["hidden"]

    @property
    def total_tokens(self) -> int:
        return self._meta["total_tokens"]

    @property
    def has_t_con(self) -> bool:
        return self._t_con is not None

    @property
    def t_con_dtype(self) -> str | None:
        return self._meta["t_con_dtype"]

    @property
    def lengths(self) -> np.ndarray:
        """int64 (count,), read-only: L_i for each candidate."""
        return self._lengths

    @property
    def nbytes(self) -> int:
        """Bytes on disk covered by cache.json: every data file plus cache.json itself."""
        return self._nbytes

    def bytes_per_candidate(self) -> float:
        """Mean bytes on disk per candidate, all files included (0.0 for an empty cache)."""
        return self._nbytes / self.count if self.count else 0.0

    def _check(self, i: Any) -> int:
        if not is_int(i) or not 0 <= i < self.count:
            raise InputError(f"candidate index {i!r}: out of range; expected an integer 0 <= i < {self.count}")
        return int(i)

    def quantized(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidate i as stored: (int8 (L_i, H), float32 (L_i,)), read-only views into the memory map."""
        i = self._check(i)
        a, b = self._offsets[i], self._offsets[i + 1]
        return self._q[a:b], self._scales[a:b]

    def tokens(self, i: int) -> np.ndarray:
        """Candidate i's merged vision tokens, dequantized: a new float32 (L_i, H) array (L_i may be 0)."""
        return dequantize_int8(*self.quantized(i))

    def grid(self, i: int) -> tuple[int, int, int] | None:
        """Candidate i's vision grid (t, h, w), or None for a candidate without vision tokens."""
        g = self._grids[self._check(i)]
        return None if not g.any() else (int(g[0]), int(g[1]), int(g[2]))

    def t_con(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Content tokens of the given candidates, in the given order: float32 (k, H)."""
        if self._t_con is None:
            raise InputError(f"{self._root}: t_con requested from a cache written with has_t_con=False; "
                             f"expected a cache built for a model with an ICM")
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise InputError(f"indices: got {idx.dtype} {idx.shape}; expected a 1-D sequence of integers")
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            bad = int(idx[(idx < 0) | (idx >= self.count)][0])
            raise InputError(f"candidate index {bad}: out of range; expected 0 <= i < {self.count}")
        return np.asarray(self._t_con[idx.astype(np.int64)], dtype=np.float32).reshape(-1, self.hidden)

    @property
    def files(self) -> dict[str, dict]:
        """{data file name: {"bytes", "sha256"}}: the prefix of each data file this cache covers."""
        return {n: dict(e) for n, e in self._meta["files"].items()}

    @property
    def meta_path(self) -> Path:
        return self._meta_path

    def appender(self, meta_out: str | os.PathLike | None = None) -> "TokenCacheWriter":
        """A writer appending to this cache in place (see `TokenCacheWriter.extend`). This object keeps seeing
        the candidates it was opened with; reopen after `close()` to see the new ones."""
        return TokenCacheWriter.extend(self._root, meta_in=self._meta_path, meta_out=meta_out)

    def __repr__(self) -> str:
        return (f"TokenCache({str(self._root)!r}, count={self.count}, hidden={self.hidden}, "
                f"total_tokens={self.total_tokens}, t_con={self.t_con_dtype})")


from retrv.runtime.index.token_cache_writer import TokenCacheWriter  # noqa: E402  (the writer imports this module's helpers)
