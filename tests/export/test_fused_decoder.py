"""The fused decoder layout (export/fused_decoder.py): validated against PyTorch call by call in fp32 and fp16, the
same greedy tokens as the traced layout and the PyTorch model through the runtime, quantizable (int4, int8-weight)
with the LM head still found by name, and refused where it cannot go (the streaming export)."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from retrv.calibration.config import Int4WeightOnlyConfig, Int8DynamicConfig, Int8StaticConfig, Int8WeightOnlyConfig
from retrv.calibration.readers import DecoderReader, PackFeeds, load_items
from retrv.calibration.quantize import quantize_pack
from retrv.export.fused_decoder import (build_fused_decoder, matmul_projections, module_weights, save_fused_decoder,
                                        validate_fused)
from retrv.export.graphs import DecoderGraph
from retrv.export.onnx_export import ExportValidationError
from retrv.export.pack_export import export_pack
from retrv.export.torch_backend import TorchBackend
from retrv.export.verify import verification_images
from retrv.model.loading import load_checkpoint
from retrv.runtime.backends.ort import OrtBackend
from retrv.runtime.errors import InputError
from retrv.runtime.generate import Generator
from retrv.runtime.pack import Pack

GATE = dict(gate_tokens=4, num_heldout=1)  # the gate runs; its figures are not what these tests check


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_checkpoint(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def traced_pack(tiny_ckpt, tmp_path_factory):
    return export_pack(tiny_ckpt, tmp_path_factory.mktemp("traced") / "pack", decoder="traced")


def test_the_default_export_is_fused_and_records_its_validation(tiny_pack):
    pack = Pack.open(tiny_pack)
    assert pack.decoder_layout == "fused"
    assert set(pack.manifest.files["decoder.onnx"].inputs) >= {"seqlens_k", "total_sequence_length", "cos_cache"}
    val = pack.manifest.validation["decoder"]
    assert val["layout"] == "fused" and val["uses_cache"] is True and val["calls"] >= 10
    assert max(val["max_abs_diff"].values()) <= 1e-5  # exact up to fp32 reassociation
    ops = {(n.domain, n.op_type) for n in onnx.load(str(tiny_pack / "decoder.onnx")).graph.node}
    assert {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "SkipSimplifiedLayerNormalization")} <= ops


@pytest.mark.parametrize("precision,packed,conv", [("fp32", True, None), ("fp16", True, None), ("fp32", False, None),
                                                  ("fp32", True, False)],
                         ids=["fp32", "fp16", "fp32-unpacked", "fp32-matmul"])
def test_fused_graph_matches_pytorch_call_by_call(model, tmp_path, precision, packed, conv):
    """The default graph (q/k/v and gate/up each one packed projection; fp32 in the conv form, fp16 as MatMul),
    the one-projection-per-weight graph, and fp32 with MatMul projections."""
    m = copy.deepcopy(model).half() if precision == "fp16" else model
    path = tmp_path / "decoder.onnx"
    graph = build_fused_decoder(m.cfg, module_weights(m), "float16" if precision == "fp16" else "float32",
                                fuse_qkv=packed, fuse_mlp=packed, conv=conv)
    op = "Conv" if precision == "fp32" and conv is None else "MatMul"
    projections = sum(n.op_type == op for n in graph.graph.node)
    assert projections == model.cfg.text.num_hidden_layers * (4 if packed else 7) + 1  # + the LM head
    assert not any(n.op_type == {"Conv": "MatMul", "MatMul": "Conv"}[op] for n in graph.graph.node)
    save_fused_decoder(graph, path)
    report = validate_fused(path, model.cfg, DecoderGraph(model), precision)
    assert report["calls"] == 11 and report["max_abs_diff"]["logits"] <= report["tolerance"]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_the_conv_form_folds_back_into_exactly_the_matmul_graph(model, tmp_path, packed):
    """matmul_projections (what `retrv quantize` runs first) turns the fp32 conv form into the graph the builder
    writes with MatMul projections: the same nodes in the same order, the same initializers bit for bit."""
    weights = module_weights(model)
    conv = build_fused_decoder(model.cfg, weights, fuse_qkv=packed, fuse_mlp=packed)
    plain = build_fused_decoder(model.cfg, weights, fuse_qkv=packed, fuse_mlp=packed, conv=False)
    assert matmul_projections(conv) == model.cfg.text.num_hidden_layers * (4 if packed else 7) + 1
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in conv.graph.node] == \
        [(n.op_type, n.name, list(n.input), list(n.output)) for n in plain.graph.node]
    got = {t.name: onnx.numpy_helper.to_array(t) for t in conv.graph.initializer}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in plain.graph.initializer}
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
    assert {v.name for v in conv.graph.value_info} == {v.name for v in plain.graph.value_info}
    assert matmul_projections(conv) == 0  # nothing left to fold; a MatMul graph is left as it is


def test_a_wrong_graph_fails_validation_naming_the_output(model, tmp_path):
    weights = module_weights(model)

    def swapped(name: str) -> np.ndarray:  # layer 1's keys projected with layer 0's weights
        return weights(name.replace("layers.1.self_attn.k_proj", "layers.0.self_attn.k_proj"))

    path = tmp_path / "decoder.onnx"
    save_fused_decoder(build_fused_decoder(model.cfg, swapped), path)
    with pytest.raises(ExportValidationError, match=r"decoder.onnx \(fused\) output 'logits': max abs diff"):
        validate_fused(path, model.cfg, DecoderGraph(model))


@pytest.mark.parametrize("case", ["text", "two_images"])
def test_greedy_tokens_equal_across_fused_traced_and_pytorch(tiny_pack, traced_pack, model, case):
    prompt, images = (("Describe a red bicycle.", []) if case == "text" else
                      ("Which picture shows more circles?", verification_images()))
    tokens = {}
    for name, pack_dir in (("fused", tiny_pack), ("traced", traced_pack)):
        pack = Pack.open(pack_dir)
        gen = Generator.from_pack(pack, OrtBackend(pack, provider="cpu", cache_dir=None))
        tokens[name] = gen.generate(prompt, images, 24).token_ids
    pack = Pack.open(tiny_pack)
    tokens["torch"] = Generator.from_pack(pack, TorchBackend(model)).generate(prompt, images, 24).token_ids
    assert len(tokens["fused"]) == 24
    assert tokens["fused"] == tokens["traced"] == tokens["torch"]


MODES = {"int4": (Int4WeightOnlyConfig, "MatMulNBits"), "int8-weight": (Int8WeightOnlyConfig, "MatMulNBits"),
         "int8-dynamic": (Int8DynamicConfig, "MatMulInteger"), "int8-static": (Int8StaticConfig, "DequantizeLinear")}


@pytest.mark.parametrize("mode", list(MODES))
def test_quantize_rewrites_the_fused_graph_and_its_lm_head_as_the_mode_says(tiny_pack, traced_pack, tiny_corpus, tmp_path,
                                                                 mode):
    make, op = MODES[mode]
    config = make(calib=str(tiny_corpus / "corpus.jsonl"), **GATE)
    out = quantize_pack(tiny_pack, tmp_path / "q", replace(config, max_drop=None)).out
    pack = Pack.open(out)
    assert pack.decoder_layout == "fused"
    entry = pack.manifest.files["decoder.onnx"].quantization
    t = pack.model_config.text
    # the mode's quantizer never takes the head; the head option (INT8 by default for int4 / int8-weight) may
    head = config.lm_head != "fp32"
    assert entry["kept_nodes"] == ["/lm_head/MatMul"]
    assert entry["matmuls_quantized"] == 4 * t.num_hidden_layers + head  # packed q/k/v and gate/up, o, down
    assert pack.manifest.extra["decoder_projections"] == "matmul"  # the source's conv form folded back
    assert (entry.get("lm_head") or {}).get("bits") == ({"int8": 8, "int4": 4}.get(config.lm_head))
    nodes = onnx.load(str(out / "decoder.onnx")).graph.node
    if mode == "int8-dynamic":  # down_proj in 8-bit blocks (its input's range is not one per tensor), the rest dynamic
        assert sum(n.op_type == op for n in nodes) == 3 * t.num_hidden_layers
        blocks = [n.name for n in nodes if n.op_type == "MatMulNBits"]
        assert sum("/down_proj/" in b for b in blocks) == t.num_hidden_layers == entry["blockwise"]["matmuls"]
        assert len(blocks) == t.num_hidden_layers + head
    else:
        assert sum(n.op_type == op for n in nodes) >= 4 * t.num_hidden_layers
    assert any(n.op_type == "GroupQueryAttention" for n in nodes)
    if mode.startswith("int8-") and mode != "int8-weight":
        return  # activation quantization: the two layouts' activations differ in order of ops, tokens may too
    # the same quantization of the traced layout decodes the same tokens
    traced = Pack.open(quantize_pack(traced_pack, tmp_path / "qt", replace(config, max_drop=None)).out)
    got = {}
    for name, p in (("fused", pack), ("traced", traced)):
        got[name] = Generator.from_pack(p, OrtBackend(p, provider="cpu", cache_dir=None)).generate(
            "Describe a red bicycle.", [], 12).token_ids
    assert got["fused"] == got["traced"]


def test_calibration_feeds_the_fused_layout_its_own_inputs(tiny_pack, tiny_corpus):
    feeds = PackFeeds(tiny_pack)
    reader = DecoderReader(feeds, load_items(tiny_corpus / "corpus.jsonl")[:1], decode_steps=2)
    got = [reader.get_next() for _ in range(len(reader))]
    seq = got[0]["inputs_embeds"].shape[1]
    assert [int(f["total_sequence_length"]) for f in got] == [seq, seq + 1, seq + 2]
    assert [f["seqlens_k"].tolist() for f in got] == [[seq - 1], [seq], [seq + 1]]
    assert "attention_mask" not in got[0] and got[0]["past_key_0"].shape[2] == seq + 2  # one buffer, bound whole
    assert got[1]["past_key_0"][:, :, :seq].any()  # step 1 sees the prefill's keys
    assert not got[0]["past_key_0"].any()  # the prefill's own snapshot is still empty


def test_streaming_export_refuses_the_fused_layout_in_one_line(tiny_ckpt, tmp_path):
    with pytest.raises(InputError, match="--decoder fused: the streaming export writes the traced decoder only"):
        export_pack(tiny_ckpt, tmp_path / "pack", stream=True, decoder="fused")
    with pytest.raises(InputError, match=r"--decoder: got 'flat'; expected one of \['fused', 'traced'\]"):
        export_pack(tiny_ckpt, tmp_path / "pack", decoder="flat")


def test_cli_decoder_flag_reaches_the_export_and_errors_stay_one_line(tiny_ckpt, tmp_path, capsys):
    from retrv.app.cli import main as cli

    assert cli(["export", str(tiny_ckpt), str(tmp_path / "p"), "--decoder", "fused", "--stream", "on"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--decoder fused: the streaming export writes the traced decoder only" in err and "\n" not in err
    assert cli(["export", str(tiny_ckpt), str(tmp_path / "p"), "--decoder", "traced", "--projections", "matmul"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--projections matmul: applies to the fused decoder; got --decoder traced" in err and "\n" not in err


def test_a_blockwise_name_that_matches_no_projection_is_refused_and_nothing_is_written(tiny_pack, tmp_path):
    config = Int8DynamicConfig(blockwise=("down_prj",), max_drop=None, **GATE)
    with pytest.raises(InputError, match="--blockwise: got 'down_prj', which names no quantized MatMul of the "
                                         "decoder graph"):
        quantize_pack(tiny_pack, tmp_path / "q", config)
    assert not (tmp_path / "q").exists()


def test_blockwise_none_is_plain_dynamic_quantization(tiny_pack, tmp_path):
    config = Int8DynamicConfig(blockwise=(), lm_head="fp32", max_drop=None, **GATE)  # the form before stop 29
    out = quantize_pack(tiny_pack, tmp_path / "q", config).out
    nodes = onnx.load(str(out / "decoder.onnx")).graph.node
    layers = Pack.open(out).model_config.text.num_hidden_layers
    assert sum(n.op_type == "MatMulInteger" for n in nodes) == 4 * layers  # q/k/v, o, gate/up, down
    assert not any(n.op_type == "MatMulNBits" for n in nodes)
    assert "blockwise" not in Pack.open(out).manifest.files["decoder.onnx"].quantization


def test_projections_matmul_exports_the_matmul_form_validated_and_recorded(tiny_ckpt, tiny_pack, tmp_path):
    out = export_pack(tiny_ckpt, tmp_path / "mm", projections="matmul")
    pack = Pack.open(out)
    ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node}
    assert "Conv" not in ops and "MatMul" in ops
    assert pack.manifest.extra["decoder_projections"] == "matmul"
    assert pack.manifest.validation["decoder"]  # validated against the PyTorch decoder like the default form
    default = Pack.open(tiny_pack)
    assert default.manifest.extra["decoder_projections"] == "conv"
    assert "Conv" in {n.op_type for n in onnx.load(str(default.path / "decoder.onnx")).graph.node}
    tokens = [Generator.from_pack(p, OrtBackend(p, provider="cpu", cache_dir=None)).generate(
        "Describe a red bicycle.", [], 12).token_ids for p in (pack, default)]
    assert tokens[0] == tokens[1]


def test_projections_is_refused_where_it_does_not_apply_in_one_line(tiny_ckpt, tmp_path):
    cases = [(dict(projections="conv", decoder="traced"), "--projections conv: applies to the fused decoder"),
             (dict(projections="conv", precision="fp16"), "--projections conv: fp32 graphs only"),
             (dict(projections="matmul", stream=True), "--projections matmul: applies to the fused decoder; the "
                                                       "streaming export"),
             (dict(projections="gemm"), r"--projections: got 'gemm'; expected one of \['conv', 'matmul'\]")]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            export_pack(tiny_ckpt, tmp_path / "p", **kwargs)
        assert not (tmp_path / "p").exists()


def test_int_zero_projections_take_the_integer_form_and_the_rest_keep_the_offset_form(tiny_pack, tmp_path):
    def weights(config, name):
        out = quantize_pack(tiny_pack, tmp_path / name, replace(config, max_drop=None, **GATE)).out
        model = onnx.load(str(out / "decoder.onnx"))
        return Pack.open(out), {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}, model.graph.node

    mixed, got, nodes = weights(Int4WeightOnlyConfig(int_zero=("o_proj", "down_proj")), "mixed")
    _, offset, _ = weights(Int4WeightOnlyConfig(), "offset")
    _, integer, _ = weights(Int4WeightOnlyConfig(zero_point="int"), "int")
    layers = mixed.model_config.text.num_hidden_layers
    nbits = [n for n in nodes if n.op_type == "MatMulNBits" and "/lm_head/" not in n.name]
    assert len(nbits) == 4 * layers
    for node in nbits:
        plain = any(f"/{p}/" in node.name for p in ("o_proj", "down_proj"))
        want = integer if plain else offset  # each form is checked against numpy in tests/calibration/test_matrix.py
        for name in [*node.input[1:], *(node.input[1].replace("_Q4", "_offsets"),)]:
            if name in want or name in got:
                assert name in got and name in want and np.array_equal(got[name], want[name]), name
        assert (len(node.input) == 4) == plain  # uint8 zero points, or none (the offset form's side product)
    sides = [n.name for n in nodes if n.name.endswith("_offset_add")]
    assert len(sides) == 2 * layers and not any("/o_proj/" in s or "/down_proj/" in s for s in sides)
    assert mixed.manifest.files["decoder.onnx"].quantization["int_zero"] == ["o_proj", "down_proj"]


def test_int_zero_is_refused_where_it_does_not_apply_in_one_line(tiny_pack, tiny_ckpt, tmp_path):
    config = Int4WeightOnlyConfig(int_zero=("o_prj",), max_drop=None, **GATE)
    with pytest.raises(InputError, match="--int-zero: got 'o_prj', which names no quantized MatMul of the decoder"):
        quantize_pack(tiny_pack, tmp_path / "q", config)
    assert not (tmp_path / "q").exists()
    for kwargs, message in ((dict(zero_point="int"), "--int-zero: applies to the offset form .*; got --zero-point "
                                                     "int"),
                            (dict(algo="hqq"), "got --algo hqq"), (dict(symmetric=True), "got symmetric blocks"),
                            (dict(int_zero="o_proj"), "--int-zero: got 'o_proj'; expected projection names")):
        with pytest.raises(InputError, match=message):
            Int4WeightOnlyConfig(**{"int_zero": ("o_proj",), **kwargs})
    with pytest.raises(InputError, match="--int-zero o_proj: not available in a streaming export"):
        export_pack(tiny_ckpt, tmp_path / "p", stream=True, quantize=Int4WeightOnlyConfig(int_zero=("o_proj",)))
