"""The token embedding table a pack's prompts are looked up in: a memory-mapped `.npy`, or the LM head's bytes.

When the checkpoint ties the embedding and the LM head and the head is quantized (`retrv quantize --lm-head
int8|int4`), the pack stores the quantized head once, in `embed_tokens.nbits` (role `embed_tokens_nbits`): the
decoder's MatMulNBits reads its B, scales and zero points there as ONNX external data, and this module reads the
same bytes. MatMulNBits' B is (N, K/block, block*bits/8), row-major by output row, and for the LM head an output
row is a vocabulary id: row v dequantized is token v's embedding. `QuantizedTable[ids]` dequantizes only the rows
asked for, exactly as `retrv.calibration.matrix.dequantize_matrix` does (the weights the head multiplies by).

The file's layout is recorded in its manifest entry's `quantization` (checked here, on open: a record that does not
fit the file is refused, never read past its end). numpy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrv.runtime.errors import InputError, PackError

NBITS_ROLE = "embed_tokens_nbits"
NBITS_FILE = "embed_tokens.nbits"
ZERO_POINTS = ("float", "int", "symmetric")
PARTS = ("packed", "scales", "zero_points")


def _int(where: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PackError(f"{where}: got {value!r}; expected an integer >= {low}")
    return value


class QuantizedTable:
    """(vocab, hidden) float32 rows, dequantized on lookup from MatMulNBits blocks. Quacks like the 2-D array the
    runtime indexes (`table[ids]`, `.shape`, `.ndim`, `.dtype`)."""

    def __init__(self, path: str | Path, record: dict) -> None:
        where = f"{Path(path).name} quantization"
        if not isinstance(record, dict):
            raise PackError(f"{where}: got {type(record).__name__}; expected the table's layout record")
        self.bits = record.get("bits")
        if self.bits not in (4, 8):
            raise PackError(f"{where}.bits: got {self.bits!r}; expected 4 or 8")
        self.block = _int(f"{where}.block_size", record.get("block_size"), 16)
        self.rows = _int(f"{where}.rows", record.get("rows"), 1)
        self.cols = _int(f"{where}.cols", record.get("cols"), 1)
        self.zero_point = record.get("zero_point")
        if self.zero_point not in ZERO_POINTS or (self.bits == 8 and self.zero_point == "float"):
            raise PackError(f"{where}.zero_point: got {self.zero_point!r} with {self.bits} bits; expected one of "
                            f"{list(ZERO_POINTS)} ('float' with 4 bits only)")
        self.blocks = -(-self.cols // self.block)
        n, b = self.rows, self.blocks
        zp_shape = {"float": ((n, b), np.float32), "symmetric": None,
                    "int": ((n, b), np.uint8) if self.bits == 8 else ((n, -(-b // 2)), np.uint8)}[self.zero_point]
        expect = {"packed": ((n, b, self.block * self.bits // 8), np.uint8), "scales": ((n, b), np.float32),
                  "zero_points": zp_shape}
        size = Path(path).stat().st_size
        self.parts: dict[str, np.ndarray | None] = {}
        for part in PARTS:
            spec, want = record.get(part), expect[part]
            if want is None:
                if spec is not None:
                    raise PackError(f"{where}.{part}: got {spec!r}; expected null for {self.zero_point} zero points")
                self.parts[part] = None
                continue
            if not isinstance(spec, dict):
                raise PackError(f"{where}.{part}: got {spec!r}; expected {{'offset': int, 'bytes': int}}")
            offset, nbytes = _int(f"{where}.{part}.offset", spec.get("offset")), _int(f"{where}.{part}.bytes",
                                                                                        spec.get("bytes"))
            shape, dtype = want
            need = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if nbytes != need or offset + nbytes > size:
                raise PackError(f"{where}.{part}: got {nbytes} bytes at offset {offset} in a {size}-byte file; "
                                f"expected {need} bytes ({shape} {np.dtype(dtype).name}) inside the file")
            self.parts[part] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

    # -- the array protocol the runtime uses ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, ids) -> np.ndarray:
        """Token ids (any shape of integers) -> ids.shape + (hidden,) float32, dequantized rows."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"token ids: got dtype {ids.dtype}; expected integers")
        flat = ids.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < -self.rows or flat.max() >= self.rows):
            raise InputError(f"token ids: got values in [{flat.min()}, {flat.max()}]; expected ids below the "
                             f"vocabulary size {self.rows}")
        return self.dequantize(flat).reshape(ids.shape + (self.cols,))

    def dequantize(self, rows: np.ndarray) -> np.ndarray:
        """(n,) row ids -> (n, hidden) float32: (q - zero) * scale per block, as MatMulNBits multiplies."""
        p = self.parts["packed"][rows]  # (n, blocks, block * bits / 8)
        if self.bits == 8:
            q = p.astype(np.float64)
        else:
            q = np.empty(p.shape[:2] + (self.block,), np.float64)
            q[..., 0::2] = p & 0x0F
            q[..., 1::2] = p >> 4
        scale = self.parts["scales"][rows].astype(np.float64)[..., None]  # (n, blocks, 1)
        if self.zero_point == "symmetric":
            zp = float(1 << (self.bits - 1))
        elif self.zero_point == "float" or self.bits == 8:
            zp = self.parts["zero_points"][rows].astype(np.float64)[..., None]
        else:  # two 4-bit zero points a byte, the lower block in the low nibble
            z = self.parts["zero_points"][rows]
            zp = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(len(rows), -1)[:, : self.blocks, None]
            zp = zp.astype(np.float64)
        w = ((q - zp) * scale).reshape(len(rows), -1)[:, : self.cols]
        return w.astype(np.float32)


def open_table(pack, role: str = "embed_tokens"):
    """The pack's embedding table: the `.npy` (memory-mapped, never unpickled) when the pack has one, else the
    quantized head's rows (`QuantizedTable`)."""
    if pack.has(role) or role != "embed_tokens" or not pack.has(NBITS_ROLE):
        return np.load(pack.file(role), mmap_mode="r", allow_pickle=False)
    path = pack.file(NBITS_ROLE)
    return QuantizedTable(path, pack.manifest.files[path.name].quantization)
