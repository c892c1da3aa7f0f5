"""calibration/matrix.py: one matrix at a time, in MatMulNBits' layout, as ONNX Runtime reads it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from retrv.calibration.matrix import dequantize_int4, int4_graph, quantize_int4
from retrv.runtime.errors import InputError


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("zero_point", ["float", "int", "symmetric"])
def test_matmulnbits_computes_the_dequantized_weights(zero_point):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(72, 24)).astype(np.float32) + 0.3  # K=72: a partial last block of 32
    x = rng.normal(size=(2, 72)).astype(np.float32)
    model = _matmul_model(w)
    assert int4_graph(model, ("/proj/MatMul",), 32, zero_point, accuracy_level=0) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    assert not any(t.name == "w" for t in model.graph.initializer)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    deq = dequantize_int4(quantize_int4(w, 32, zero_point))
    np.testing.assert_allclose(got, x @ deq, rtol=1e-4, atol=1e-4)
    assert np.abs(deq - w).max() < 0.5  # and the weights are close to the originals


def test_float_zero_points_reproduce_a_q4_1_grid_exactly():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, size=(64, 8)).astype(np.float64)
    q[0], q[1], q[32], q[33] = 0, 15, 0, 15  # each block uses both ends of the grid
    d, m = 0.013, -0.07
    w = (q * d + m).astype(np.float32)  # a Q4_1 block: w = q * d + min
    np.testing.assert_allclose(dequantize_int4(quantize_int4(w, 32, "float")), w, atol=1e-6)
    assert np.abs(dequantize_int4(quantize_int4(w, 32, "int")) - w).max() > 1e-3


def test_bad_matrix_is_refused_by_name():
    with pytest.raises(InputError, match="expected a 2-D float array"):
        quantize_int4(np.zeros(8, np.float32))
    with pytest.raises(InputError, match="block_size: got 24"):
        quantize_int4(np.zeros((32, 2), np.float32), block_size=24)
    with pytest.raises(InputError, match="NaN or inf"):
        quantize_int4(np.full((32, 2), np.nan, np.float32))
