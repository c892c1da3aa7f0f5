"""hnsw.bin and ann.json checked before hnswlib's loader sees them.

hnswlib's `load_index` trusts every size and id in the file: a crafted or truncated file can make it read or write
out of bounds. So the metadata is checked field by field, and the graph file is walked as hnswlib 0.8.0 writes it,
checking every size, count and neighbour id its loader or search would trust.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from retrv.runtime.errors import IndexFileError, InputError
from retrv.runtime.folder import check_version, read_manifest

ANN_FORMAT_VERSION = 1
MAX_ANN_JSON_BYTES = 1 << 20  # a real ann.json is under 1 KB
HNSW_BIN = "hnsw.bin"
MAX_CAPACITY = 2**32 - 1  # hnswlib's internal ids are 32-bit (`tableint`)

# hnswlib 0.8.0 `saveIndex` header: offsetLevel0, max_elements, cur_element_count, size_data_per_element,
# label_offset, offsetData (size_t); maxlevel (int); enterpoint_node (uint32); maxM, maxM0, M (size_t);
# mult (double); ef_construction (size_t). Then cur_element_count level-0 records, then one
# (uint32 size, bytes) upper-level link list per element.
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_HEADER_FIELDS = ("offset_level0", "max_elements", "element_count", "size_per_element", "label_offset",
                  "data_offset", "max_level", "entry_point", "max_m", "max_m0", "m", "mult", "ef_construction")


def first_duplicate(labels: np.ndarray) -> int | None:
    s = np.sort(labels)
    dup = np.flatnonzero(s[1:] == s[:-1])
    return int(s[dup[0]]) if dup.size else None


# ---------------------------------------------------------------------------------------------- exact oracle


def _params_from_dict(d):
    from retrv.runtime.index.ann import HnswParams  # here, not at the top: ann imports this module

    return HnswParams.from_dict(d)


def read_meta(path: Path) -> dict[str, Any]:
    """ann.json, checked field by field; `params` comes back as HnswParams."""
    meta = read_manifest(path, IndexFileError, MAX_ANN_JSON_BYTES, "the index metadata written by HnswIndex.save")

    def integer(name: str, value: Any, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise IndexFileError(f"{path}: {name} is {value!r}; expected an integer in [{lo}, {hi}]")
        return value

    check_version(path, meta.get("format_version"), ANN_FORMAT_VERSION, IndexFileError)
    try:
        meta["params"] = _params_from_dict(meta.get("params"))
    except (InputError, TypeError) as e:
        raise IndexFileError(f"{path}: params invalid ({e})") from None
    capacity = integer("capacity", meta.get("capacity"), 1, MAX_CAPACITY)
    elements = integer("element_count", meta.get("element_count"), 0, capacity)
    integer("count", meta.get("count"), 0, elements)
    if meta.get("label_dtype") != "int64":
        raise IndexFileError(f"{path}: label_dtype is {meta.get('label_dtype')!r}; expected 'int64'")
    entry = meta.get(HNSW_BIN)
    if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256"))):
        raise IndexFileError(f"{path}: {HNSW_BIN} entry is {entry!r}; expected {{'size': int, 'sha256': 64 hex}}")
    integer(f"{HNSW_BIN}.size", entry.get("size"), _HEADER.size, 2**62)
    return meta


def check_graph(path: Path, params, elements: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk hnsw.bin as hnswlib 0.8.0 wrote it and check every size and id that its loader or search would trust.

    Returns (labels uint64 (n,), deleted bool (n,)) in internal-id order.
    """

    def bad(what: str, expected: Any) -> IndexFileError:
        return IndexFileError(f"{path}: {what}; expected {expected}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        h = dict(zip(_HEADER_FIELDS, _HEADER.unpack(f.read(_HEADER.size))))
    m = params.M
    links0 = 2 * m * 4 + 4  # level-0 record: uint32 count/flags word, then maxM0 = 2M uint32 neighbour ids
    links = m * 4 + 4  # upper-level list: the same with maxM = M
    data = params.dim * 4
    want = {"offset_level0": 0, "max_elements": capacity, "element_count": elements,
            "size_per_element": links0 + data + 8, "label_offset": links0 + data, "data_offset": links0,
            "max_m": m, "max_m0": 2 * m, "m": m, "ef_construction": max(params.ef_construction, m)}
    for name, value in want.items():
        if h[name] != value:
            raise bad(f"header {name} is {h[name]}", f"{value} for {params}")
    if not math.isclose(h["mult"], 1 / math.log(m), rel_tol=1e-12):
        raise bad(f"header mult is {h['mult']}", 1 / math.log(m))
    spe, body = h["size_per_element"], _HEADER.size + elements * h["size_per_element"]
    if elements == 0:
        if size != _HEADER.size or h["max_level"] != -1:
            raise bad(f"empty index of {size} bytes, max_level {h['max_level']}", f"{_HEADER.size} bytes, max_level -1")
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    if size < body + 4 * elements:
        raise bad(f"{size} bytes", f"at least {body + 4 * elements} for {elements} elements")
    if not 0 <= h["max_level"] <= 64 or h["entry_point"] >= elements:  # 64 levels: M**64 elements, far past 2**32
        raise bad(f"max_level {h['max_level']}, entry point {h['entry_point']}", f"[0, 64] and < {elements}")

    level0 = np.memmap(path, np.uint8, "r", offset=_HEADER.size, shape=(elements, spe))
    labels = np.empty(elements, np.uint64)
    deleted = np.empty(elements, bool)
    step = max(1, (64 << 20) // spe)  # check 64 MiB of records at a time
    for lo in range(0, elements, step):
        rec = np.array(level0[lo:lo + step])  # (c, spe)
        head = rec[:, :links0].view("<u4")  # (c, 1 + 2M)
        counts = head[:, 0] & 0xFFFF
        if (counts > 2 * m).any():
            raise bad(f"element {lo + int(np.argmax(counts > 2 * m))} has {counts.max()} level-0 links", f"<= {2 * m}")
        used = np.arange(2 * m)[None, :] < counts[:, None]
        if (head[:, 1:][used] >= elements).any():
            raise bad("a level-0 neighbour id out of range", f"< {elements}")
        if not np.isfinite(rec[:, links0:links0 + data].view("<f4")).all():
            raise bad("a stored vector holds NaN or Inf", "finite values")
        deleted[lo:lo + step] = (rec[:, 2] & 1).astype(bool)  # hnswlib's DELETE_MARK, byte 2 of the count word
        labels[lo:lo + step] = rec[:, links0 + data:].view("<u8")[:, 0]
    del level0
    if labels.max() > np.iinfo(np.int64).max:
        raise bad(f"label {int(labels.max())}", "non-negative int64 labels")
    if (dup := first_duplicate(labels.astype(np.int64))) is not None:
        raise bad(f"label {dup} stored twice", "unique labels")

    with open(path, "rb") as f:
        f.seek(body)
        tail = f.read()
    pos, top = 0, np.zeros(elements, np.int64)
    for i in range(elements):
        if pos + 4 > len(tail):
            raise bad(f"file ends inside the link lists at element {i}", f"{elements} link lists")
        (n,) = struct.unpack_from("<I", tail, pos)
        pos += 4
        if not n:
            continue
        level = n // links
        if n % links or level > h["max_level"] or pos + n > len(tail):
            raise bad(f"element {i} link list of {n} bytes", f"a multiple of {links}, at most {h['max_level']} levels")
        lists = np.frombuffer(tail, "<u4", count=n // 4, offset=pos).reshape(level, 1 + m)
        cnt = lists[:, 0] & 0xFFFF
        if (cnt > m).any() or (lists[:, 1:][np.arange(m)[None, :] < cnt[:, None]] >= elements).any():
            raise bad(f"element {i} upper-level links out of range", f"<= {m} links, ids < {elements}")
        top[i] = level
        pos += n
    if pos != len(tail):
        raise bad(f"{len(tail) - pos} bytes after the last link list", "none")
    if top[h["entry_point"]] != h["max_level"]:
        raise bad(f"entry point at level {top[h['entry_point']]}", f"max_level {h['max_level']}")
    return labels, deleted
