"""The quantized embedding table: rows dequantized from MatMulNBits bytes equal the weights the head multiplies by,
and a layout record that does not fit its file is refused."""

from __future__ import annotations

import numpy as np
import pytest

from retrv.calibration.matrix import dequantize_matrix, quantize_matrix
from retrv.runtime.errors import InputError, PackError
from retrv.runtime.inputs.table import PARTS, QuantizedTable


def _write(path, m, pad: int = 4096) -> dict:
    """The three MatMulNBits tensors of `m` back to back (page-aligned), and their layout record."""
    record = {"bits": m.bits, "block_size": m.block_size, "zero_point": m.zero_point, "rows": m.n, "cols": m.k}
    with open(path, "wb") as f:
        for part, arr in zip(PARTS, (m.packed, m.scales, m.zero_points)):
            if arr is None:
                record[part] = None
                continue
            f.write(b"\0" * ((-f.tell()) % pad))
            record[part] = {"offset": f.tell(), "bytes": arr.nbytes}
            f.write(arr.tobytes())
    return record


@pytest.mark.parametrize("bits,zero_point", [(8, "int"), (8, "symmetric"), (4, "float"), (4, "int"), (4, "symmetric")])
def test_rows_equal_the_dequantized_head(tmp_path, bits, zero_point):
    rng = np.random.default_rng(bits)
    head = rng.normal(size=(80, 37)).astype(np.float32)  # (K = hidden 80: 3 blocks, one padded; N = vocab 37)
    m = quantize_matrix(head, bits, 32, zero_point)
    table = QuantizedTable(tmp_path / "t.nbits", _write(tmp_path / "t.nbits", m))
    want = dequantize_matrix(m).T  # (vocab, hidden): row v is token v's embedding
    ids = np.array([[0, 36, 5], [5, 1, 0]])
    assert table.shape == (37, 80) and table.ndim == 2
    got = table[ids]
    assert got.shape == (2, 3, 80) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want[ids])  # exact: the same weights as the head's
    np.testing.assert_array_equal(table[np.arange(37)], want)


def test_a_record_that_does_not_fit_the_file_is_refused(tmp_path):
    m = quantize_matrix(np.ones((64, 8), np.float32) * np.arange(8), 8, 32, "int")
    record = _write(tmp_path / "t.nbits", m)
    bad = {**record, "scales": {**record["scales"], "offset": record["scales"]["offset"] + 10_000}}
    with pytest.raises(PackError, match=r"scales: got \d+ bytes at offset \d+ in a \d+-byte file"):
        QuantizedTable(tmp_path / "t.nbits", bad)
    with pytest.raises(PackError, match="packed: got 1 bytes"):
        QuantizedTable(tmp_path / "t.nbits", {**record, "packed": {"offset": 0, "bytes": 1}})
    with pytest.raises(PackError, match="zero_point: got 'float' with 8 bits"):
        QuantizedTable(tmp_path / "t.nbits", {**record, "zero_point": "float"})
    with pytest.raises(PackError, match="bits: got 3"):
        QuantizedTable(tmp_path / "t.nbits", {**record, "bits": 3})


def test_out_of_range_ids_are_an_input_error(tmp_path):
    m = quantize_matrix(np.ones((32, 4), np.float32), 8, 32, "int")
    table = QuantizedTable(tmp_path / "t.nbits", _write(tmp_path / "t.nbits", m))
    with pytest.raises(InputError, match="below the vocabulary size 4"):
        table[np.array([4])]
    with pytest.raises(InputError, match="expected integers"):
        table[np.array([0.5])]
