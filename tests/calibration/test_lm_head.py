"""`--lm-head`: the LM head as 8-/4-bit MatMulNBits in any mode; a tied head stored once, the runtime's embedding
lookup reading the same bytes; the flags, their aliases and the refusals."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from retrv.calibration.cli import build_config, register
from retrv.calibration.matrix import QuantMatrix, dequantize_matrix
from retrv.calibration.quantize import Int4WeightOnlyConfig, Int8StaticConfig, Int8WeightOnlyConfig, quantize_pack
from retrv.export.pack_export import export_pack
from retrv.model.tiny import write_tiny_checkpoint
from retrv.runtime.errors import InputError, PackError
from retrv.runtime.generate import load_pack_generator
from retrv.runtime.inputs.table import NBITS_FILE, QuantizedTable
from retrv.runtime.pack import Pack

GATE = dict(gate_tokens=4, num_heldout=2)


@pytest.fixture(scope="module")
def tied_pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    ckpt = write_tiny_checkpoint(root / "ckpt", icm=True, seed=3, tie_word_embeddings=True)
    return export_pack(ckpt, root / "pack")


@pytest.fixture(scope="module")
def tied_int8(tied_pack, tmp_path_factory):
    return quantize_pack(tied_pack, tmp_path_factory.mktemp("q") / "int8w", Int8WeightOnlyConfig(**GATE))


def _head(pack_dir) -> QuantMatrix:
    """The decoder's quantized LM head, read through ONNX (external data resolved), as calibration.matrix holds it."""
    model = onnx.load(str(pack_dir / "decoder.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "/lm_head/" in n.name)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    attrs = {a.name: a.i for a in node.attribute}
    packed, scales, zeros = (inits[i] for i in node.input[1:4])
    return QuantMatrix(packed, scales, zeros, attrs["K"], attrs["N"], attrs["block_size"], "int", attrs["bits"])


def test_tied_int8_head_is_stored_once_and_the_lookup_reads_its_rows(tied_int8, tied_pack):
    pack = Pack.open(tied_int8.out)
    files = pack.manifest.files
    assert NBITS_FILE in files and "embed_tokens.npy" not in files  # one copy: the head's bytes
    head = files["decoder.onnx"].quantization["lm_head"]
    assert head["bits"] == 8 and head["block_size"] == 32 and head["tied_to_embedding"] and head["stored_with_embedding"]
    gen = load_pack_generator(tied_int8.out, cache_dir=None)
    assert isinstance(gen.embed_table, QuantizedTable)
    want = dequantize_matrix(_head(tied_int8.out)).T  # (vocab, hidden): what the head multiplies by
    ids = np.arange(want.shape[0])
    np.testing.assert_array_equal(gen.lookup(ids), want[ids])
    # close to the fp32 table it replaces: one 8-bit step per block at most
    table = np.load(tied_pack / "embed_tokens.npy")
    assert np.abs(gen.lookup(ids) - table).max() <= (table.max() - table.min()) / 255
    result = gen.generate("What is in the picture?", max_new_tokens=4, stop_at_eos=False)
    assert len(result.token_ids) == 4
    gate = pack.manifest.validation["gate"]
    assert gate["positions"] == 4 * gate["prompts"] and 0 <= gate["drop"] <= 1  # the gate ran on the quantized head
    fp32_bytes = sum(e.bytes for e in Pack.open(tied_pack).manifest.files.values())
    assert sum(e.bytes for e in files.values()) < fp32_bytes


def test_a_tampered_table_record_is_refused_on_open(tied_int8, tmp_path):
    copy = tmp_path / "pack"
    shutil.copytree(tied_int8.out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][NBITS_FILE]["quantization"]["scales"]["offset"] += 1 << 20
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="embed_tokens.nbits quantization.scales"):
        Pack.open(copy)


def test_untied_head_is_quantized_in_the_graph_and_the_table_stays(tiny_pack, tmp_path):
    report = quantize_pack(tiny_pack, tmp_path / "q", Int4WeightOnlyConfig(lm_head="int4", **GATE))
    files = Pack.open(report.out).manifest.files
    assert "embed_tokens.npy" in files and NBITS_FILE not in files
    head = files["decoder.onnx"].quantization["lm_head"]
    assert head["bits"] == 4 and not head["tied_to_embedding"]
    model = onnx.load(str(report.out / "decoder.onnx"))
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and "/lm_head/" in n.name]


def test_fp32_head_stays_a_matmul(tied_pack, tmp_path):
    report = quantize_pack(tied_pack, tmp_path / "q", Int8WeightOnlyConfig(lm_head="fp32", **GATE))
    files = Pack.open(report.out).manifest.files
    assert "embed_tokens.npy" in files and files["decoder.onnx"].quantization["lm_head"] == {"format": "fp32"}
    model = onnx.load(str(report.out / "decoder.onnx"))
    assert [n.name for n in model.graph.node if n.op_type == "MatMul" and "/lm_head/" in n.name] == ["/lm_head/MatMul"]


def test_lm_head_config_is_validated():
    assert Int4WeightOnlyConfig().lm_head == "int8" and Int8WeightOnlyConfig().lm_head == "int8"
    with pytest.raises(InputError, match=r"--lm-head: got 'int2'; expected one of \['fp32', 'int8', 'int4'\]"):
        Int4WeightOnlyConfig(lm_head="int2")
    with pytest.raises(InputError, match="TensorRT refuses"):
        Int8StaticConfig(calib="x", lm_head="int8")
    assert Int8StaticConfig(calib="x", activations="uint8", lm_head="int8").lm_head == "int8"


def _parse(argv):
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    return ap.parse_args(["quantize", "p", "o", *argv])


@pytest.mark.parametrize("argv,want", [
    (["--mode", "int4"], "int8"),
    (["--mode", "int4", "--lm-head", "int4"], "int4"),
    (["--mode", "int4", "--keep-lm-head"], "fp32"),
    (["--mode", "int4", "--no-keep-lm-head"], "int4"),
    (["--mode", "int8-weight", "--no-keep-lm-head"], "int8"),
    (["--mode", "int8-dynamic"], "int8"),
    (["--mode", "int8-dynamic", "--keep-lm-head"], "fp32"),
    (["--mode", "int8-static", "--calib", "c"], "fp32"),
])
def test_cli_lm_head_and_its_aliases(argv, want):
    assert build_config(_parse(argv)).lm_head == want


def test_cli_alias_with_lm_head_is_refused():
    with pytest.raises(InputError, match="--no-keep-lm-head: an alias of --lm-head int4; got --lm-head int8 too"):
        build_config(_parse(["--mode", "int4", "--no-keep-lm-head", "--lm-head", "int8"]))
