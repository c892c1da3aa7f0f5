"""The streaming export: its replicated graphs against directly traced ones (the oracle for the graph surgery),
its external data written in one pass, a tied embedding stored once, INT4 on the fly, and `--verify`'s weight and
layer checks naming a corrupted weight."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from retrv.app.cli import main as cli
from retrv.calibration.config import Int4WeightOnlyConfig
from retrv.export import graphs
from retrv.export.onnx_export import ExportValidationError
from retrv.export.pack_export import export_pack
from retrv.export.safetensors_stream import read_header
from retrv.export.stream_export import ALIGN, checkpoint_tensors
from retrv.export.stream_verify import check_layers, check_weights, verify_streamed_pack
from retrv.model.config import read_config
from retrv.model.tiny import write_tiny_checkpoint
from retrv.runtime.errors import CheckpointError
from retrv.runtime.pack import Pack, describe_file, write_manifest

LAYERS = 3  # more than the template's one, so replication is exercised; vision: one window and two full blocks
VISION = dict(depth=3, fullatt_block_indexes=[0, 2])


def _tied(ckpt):
    """The 3B layout: tie_word_embeddings and no lm_head.weight tensor in the checkpoint."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors.pop("lm_head.weight")
    save_file(tensors, str(ckpt / "model.safetensors"))
    config = json.loads((ckpt / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    untied = write_tiny_checkpoint(root / "untied", icm=True, seed=11, num_hidden_layers=LAYERS, vision=VISION)
    tied = _tied(write_tiny_checkpoint(root / "tied", seed=12, num_hidden_layers=LAYERS, vision=VISION))
    return root, {"untied": untied, "tied": tied}


@pytest.fixture(scope="module")
def packs(ckpts):
    """(traced, streamed) packs per checkpoint and precision, built once."""
    root, found = ckpts
    out = {}
    for kind, ckpt in found.items():
        for precision in ("fp32", "fp16"):
            if kind == "tied" and precision == "fp16":
                continue
            out[kind, precision] = (export_pack(ckpt, root / f"{kind}-{precision}-traced", precision, stream=False,
                                                decoder="traced"),
                                    export_pack(ckpt, root / f"{kind}-{precision}-stream", precision, stream=True))
    return out


def _run_all(pack_dir, cfg, spec_of):
    results = {}
    for name, entry in Pack.open(pack_dir).manifest.files.items():
        if not name.endswith(".onnx"):
            continue
        sess = ort.InferenceSession(str(pack_dir / name), providers=["CPUExecutionProvider"])
        float_input = {"vision": "patches", "decoder": "inputs_embeds"}.get(entry.role, "cand_tokens")
        spec = spec_of(entry.role, entry.inputs[float_input])
        for variant in (0, 1, 2):
            feeds = graphs.cast_feeds(spec, graphs.sample_inputs(spec, cfg, variant))
            results[name, variant] = sess.run(None, feeds)
    return results


@pytest.mark.parametrize("key", [("untied", "fp32"), ("untied", "fp16"), ("tied", "fp32")])
def test_replicated_graphs_equal_traced_graphs(packs, ckpts, key):
    """The correctness oracle of the surgery: every graph of the streamed pack gives the traced pack's outputs
    exactly, on three input shapes (left padding, empty and non-empty past, several images)."""
    traced, streamed = packs[key]
    cfg = read_config(ckpts[1][key[0]])
    specs = {"vision": graphs.vision_spec, "decoder": graphs.decoder_spec, "icm_content": graphs.icm_content_spec,
             "icm_relation": graphs.icm_relation_spec}

    def spec_of(role, first_input):
        return specs[role](cfg, first_input["dtype"])

    want, got = _run_all(traced, cfg, spec_of), _run_all(streamed, cfg, spec_of)
    assert set(want) == set(got) and len(want) >= 6
    for k in want:
        for a, b in zip(want[k], got[k]):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.array_equal(a, b), f"{k}: max diff {np.abs(a.astype(np.float64) - b).max()}"


def test_external_data_written_in_one_pass_in_checkpoint_order(packs, ckpts):
    """Each weight lands in the data file in the order the checkpoint holds it, page-aligned, back to back: the
    file is appended to as the tensors are read, never rewritten."""
    _, streamed = packs["untied", "fp32"]
    pack = Pack.open(streamed)
    order = {t.name: k for k, t in enumerate(read_header(ckpts[1]["untied"] / "model.safetensors"))}
    for graph in ("decoder.onnx", "vision.onnx"):
        inits = onnx.load(str(streamed / graph), load_external_data=False).graph.initializer
        located = {i.name: {e.key: e.value for e in i.external_data} for i in inits if i.external_data}
        refs = [r for r in pack.manifest.extra["streaming"]["weights"] if r["graph"] == graph]
        assert refs and all(located[r["init"]]["location"] == graph + ".data" for r in refs)
        refs.sort(key=lambda r: order[r["source"]])
        offsets = [int(located[r["init"]]["offset"]) for r in refs]
        assert offsets == sorted(offsets) and all(o % ALIGN == 0 for o in offsets)
        last = located[refs[-1]["init"]]
        assert (streamed / (graph + ".data")).stat().st_size == int(last["offset"]) + int(last["length"])


def test_tied_embedding_is_stored_once(packs, ckpts):
    traced, streamed = packs["tied", "fp32"]
    cfg = read_config(ckpts[1]["tied"])
    table = cfg.text.vocab_size * cfg.text.hidden_size * 4
    head = next(i for i in onnx.load(str(streamed / "decoder.onnx"), load_external_data=False).graph.initializer
                if i.name == "lm_head.weight")
    where = {e.key: e.value for e in head.external_data}
    assert where["location"] == "embed_tokens.npy" and int(where["length"]) == table
    assert Pack.open(streamed).manifest.extra["streaming"]["tied_embedding_shared"] is True

    def decoder_weight_bytes(d):
        """Bytes of decoder weights stored in the decoder's own files (inline or decoder.onnx.data)."""
        total = 0
        for i in onnx.load(str(d / "decoder.onnx"), load_external_data=False).graph.initializer:
            where = {e.key: e.value for e in i.external_data}
            total += len(i.raw_data) if not where else int(where["length"]) * (where["location"] != "embed_tokens.npy")
        return total

    # the traced pack carries the table twice (embed_tokens.npy and the decoder's LM head); the streamed one once
    assert decoder_weight_bytes(traced) - decoder_weight_bytes(streamed) == table
    assert (streamed / "embed_tokens.npy").stat().st_size == (traced / "embed_tokens.npy").stat().st_size


@pytest.fixture(scope="module")
def int4_pack(ckpts):
    root, found = ckpts
    return export_pack(found["untied"], root / "int4", quantize=Int4WeightOnlyConfig(), stream=True, verify=True)


def test_int4_streams_matmulnbits_and_passes_verify(int4_pack):
    pack = Pack.open(int4_pack)
    nodes = onnx.load(str(int4_pack / "decoder.onnx"), load_external_data=False).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 7 * LAYERS  # q k v o gate up down; LM head kept
    entry = pack.manifest.files["decoder.onnx"]
    assert entry.precision == "int4" and entry.quantization["block_size"] == 32
    report = pack.manifest.validation["streaming"]
    assert report["layers"]["layers_checked"] == LAYERS
    assert report["truncated_greedy"]["two_images"]["matches_torch"] is True


def test_streamed_int4_weights_are_retrv_quantizes(int4_pack, ckpts):
    """The streaming path quantizes with `retrv quantize`'s own per-matrix code (calibration.matrix, the config's
    default form), so a streamed INT4 pack holds the weights a quantized pack would."""
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    from retrv.calibration.matrix import quantize_matrix

    config = Int4WeightOnlyConfig()
    w = load_file(str(ckpts[1]["untied"] / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]  # (N, K)
    want = quantize_matrix(w.T.astype(np.float32), 4, config.block_size, config.zero_point, config.algo)
    model = onnx.load(str(int4_pack / "decoder.onnx"), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(model, str(int4_pack))
    inits = {i.name: i for i in model.graph.initializer}
    base = "language_model.layers.1.mlp.down_proj.weight.T"
    np.testing.assert_array_equal(numpy_helper.to_array(inits[base + "_Q4"]), want.packed)
    np.testing.assert_array_equal(numpy_helper.to_array(inits[base + "_scales"]), want.scales)
    for part, arr in (("_zero_points", want.zero_points), ("_offsets", want.offsets)):
        assert (base + part in inits) == (arr is not None)
        if arr is not None:
            np.testing.assert_array_equal(numpy_helper.to_array(inits[base + part]), arr)


def _corrupt(pack_src, dst, init_name, graph="decoder.onnx", value=None):
    """A copy of the pack with one stored weight changed and the manifest re-hashed to vouch for it (an exporter
    bug, not a disk error the sha256 would catch)."""
    shutil.copytree(pack_src, dst)
    inits = {i.name: i for i in onnx.load(str(dst / graph), load_external_data=False).graph.initializer}
    where = {e.key: e.value for e in inits[init_name].external_data}
    with open(dst / where["location"], "r+b") as f:
        f.seek(int(where["offset"]) + 40)
        old = f.read(4)
        f.seek(int(where["offset"]) + 40)
        f.write(value if value is not None else np.float32(25.0).tobytes() if old != np.float32(25.0).tobytes()
                else np.float32(-25.0).tobytes())
    pack = Pack.open(dst, verify="size")
    files = dict(pack.manifest.files)
    files[where["location"]] = describe_file(dst, where["location"], files[where["location"]].role,
                                             data_of=files[where["location"]].data_of)
    write_manifest(dst, type(pack.manifest)(**{**pack.manifest.__dict__, "files": files}))
    return dst


def test_verify_names_a_wrong_weight_in_any_layer(packs, ckpts, tmp_path):
    ckpt = ckpts[1]["untied"]
    _, streamed = packs["untied", "fp32"]
    check_weights(streamed, ckpt)  # the pack as written passes
    bad = _corrupt(streamed, tmp_path / "bad", "language_model.layers.1.mlp.down_proj.weight.T")
    with pytest.raises(ExportValidationError, match=r"'language_model\.layers\.1\.mlp\.down_proj\.weight\.T' "
                                                    r"\(checkpoint tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        check_weights(bad, ckpt)
    with pytest.raises(ExportValidationError, match="decoder.onnx layer 1 output 'hidden'"):
        check_layers(bad, ckpt)
    check_layers(bad, ckpt, layers=[0, 2])  # the other layers are still right


def test_verify_names_a_wrong_int4_block(int4_pack, ckpts, tmp_path):
    ckpt = ckpts[1]["untied"]
    bad = _corrupt(int4_pack, tmp_path / "bad4", "language_model.layers.2.self_attn.v_proj.weight.T_Q4",
                   value=bytes([0xF0, 0x0F, 0xF0, 0x0F]))
    with pytest.raises(ExportValidationError, match=r"weight 'language_model\.layers\.2\.self_attn\.v_proj"
                                                    r"\.weight\.T' .*beyond 2 INT4 steps"):
        check_weights(bad, ckpt)


def test_streaming_refuses_what_it_cannot_quantize_on_the_fly(ckpts, tmp_path, capsys):
    ckpt = ckpts[1]["untied"]
    assert cli(["export", str(ckpt), str(tmp_path / "p"), "--stream", "on", "--quantize", "int8-dynamic"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--quantize int8-dynamic: not available in a streaming export" in err and "\n" not in err
    assert cli(["export", str(ckpt), str(tmp_path / "p"), "--stream", "on", "--quantize", "int4", "--algo", "rtn",
                "--zero-point", "float"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--zero-point float: not available in a streaming export" in err and "\n" not in err
    assert cli(["export", str(ckpt), str(tmp_path / "p"), "--stream", "on", "--quantize", "int4",
                "--zero-point", "float"]) == 2
    assert "--zero-point float: applies to --algo rtn; got --algo mse" in capsys.readouterr().err
    assert cli(["export", str(ckpt), str(tmp_path / "p"), "--block-size", "64"]) == 2
    assert "--block-size: applies with --quantize MODE" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_truncated_shard_is_refused_by_name(ckpts, tmp_path):
    ckpt = shutil.copytree(ckpts[1]["untied"], tmp_path / "cut")
    shard = ckpt / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' spans bytes"):
        checkpoint_tensors(ckpt)
