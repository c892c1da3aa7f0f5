"""Read a safetensors checkpoint one tensor at a time, into fresh numpy buffers, without memory-mapping it.

`safe_open` maps the whole shard: every page it touches counts in the process's RSS until the shard is closed, so
reading a 5 GB shard tensor by tensor would still end with 5 GB resident. Here each tensor is `readinto` a buffer
of its own (the kernel's page cache holds the file, not this process) and dropped by the caller after use, so the
resident set is the largest tensor being converted, whatever the shard size. Large tensors can be read in row
chunks (`read_rows`), which bounds it further.

The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrv.runtime.errors import CheckpointError

# safetensors dtype -> numpy dtype of the raw bytes; bf16 is read as uint16 and widened by `to_float32`.
_RAW = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors of one shard in file order; a truncated or malformed shard is refused by name."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not JSON ({e})") from None
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = meta.get("dtype") if isinstance(meta, dict) else None
        if dtype not in _RAW:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype!r}; expected one of {sorted(_RAW)}")
        shape = tuple(int(d) for d in meta["shape"])
        begin, end = (int(x) for x in meta["data_offsets"])
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_RAW[dtype]).itemsize
        if end - begin != want or 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor '{name}' spans bytes [{begin}, {end}); expected {want} bytes "
                                  f"inside the file")
        out.append(TensorInfo(name, path, dtype, shape, 8 + n + begin, want))
    return sorted(out, key=lambda t: t.start)


def to_float32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Raw tensor bytes (as `_RAW[dtype]`) -> float32, exactly (bf16 is the top half of an fp32); into `out` (a
    float32 array of raw's size) when given, with no temporary beyond it."""
    if out is None:
        out = np.empty(raw.shape, dtype=np.float32)
    if dtype == "BF16":
        bits = out.view(np.uint32)
        np.copyto(bits, raw, casting="unsafe")
        bits <<= 16
        return out
    np.copyto(out, raw, casting="unsafe")
    return out


READ_CHUNK = 32 << 20  # raw bytes read and converted at a time: a tensor's float32 copy is its only whole buffer


def read_rows(info: TensorInfo, row0: int = 0, rows: int | None = None) -> np.ndarray:
    """Rows [row0, row0 + rows) of the tensor (all rows by default) as float32, read into a fresh buffer in
    chunks (peak: the float32 result plus one chunk)."""
    shape = info.shape or (1,)
    rows = shape[0] - row0 if rows is None else rows
    row_elems = int(np.prod(shape[1:], dtype=np.int64))
    item = np.dtype(_RAW[info.dtype]).itemsize
    total = rows * row_elems
    out = np.empty(total, dtype=np.float32)
    step = max(1, READ_CHUNK // item)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start + row0 * row_elems * item)
        for e in range(0, total, step):
            n = min(step, total - e)
            raw = np.empty(n, dtype=_RAW[info.dtype])
            got = f.readinto(memoryview(raw).cast("B"))
            if got != raw.nbytes:
                raise CheckpointError(f"{info.file}: tensor '{info.name}' is truncated (read "
                                      f"{e * item + got} of {total * item} bytes)")
            to_float32(raw, info.dtype, out[e:e + n])
    return out.reshape((rows, *shape[1:]) if info.shape else ())


def read_tensor(info: TensorInfo) -> np.ndarray:
    return read_rows(info)
