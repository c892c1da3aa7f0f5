"""The pack format: manifest round trip, verified open, refusal of damaged or hostile packs, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrv.model.config import ICMConfig, ModelConfig, TextConfig, TokenIds, VisionConfig
from retrv.runtime.errors import InputError, PackError
from retrv.runtime.fsutil import atomic_dir, atomic_write_bytes, atomic_write_json, sha256_file
from retrv.runtime.pack import (
    MANIFEST_NAME,
    PACK_FORMAT_VERSION,
    FileEntry,
    Manifest,
    Pack,
    describe_file,
    write_manifest,
)
from retrv.runtime.inputs.preprocess import ImageProcessorConfig


def model_config(icm: bool) -> ModelConfig:
    return ModelConfig(
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            fullatt_block_indexes=(1,)),
        tokens=TokenIds(image_token_id=500, video_token_id=501, vision_start_token_id=502,
                        vision_end_token_id=503, eos_token_ids=(504,)),
        icm=ICMConfig(hidden_size=64, num_heads=4) if icm else None,
    )


DECODER_IO = {
    "inputs": {"inputs_embeds": {"dtype": "float32", "shape": ("batch", "seq", 64)},
               "position_ids": {"dtype": "int64", "shape": [3, "batch", "seq"]}},
    "outputs": {"logits": {"dtype": "float32", "shape": ["batch", "seq", 512]}},
}


def build_pack(dest: Path, icm: bool = False, seed: int = 0) -> Path:
    """A fake pack: random bytes where the ONNX graphs would be, a real .npy, a JSON tokenizer."""
    rng = np.random.default_rng(seed)
    onnx_names = ["vision", "decoder", "embedder"] + (["icm_content", "icm_relation"] if icm else [])
    with atomic_dir(dest) as tmp:
        for role in onnx_names:
            (tmp / f"{role}.onnx").write_bytes(rng.bytes(1000 + 100 * len(role)))
        (tmp / "decoder.onnx.data").write_bytes(rng.bytes(4096))
        np.save(tmp / "embed_tokens.npy", rng.standard_normal((512, 64)).astype(np.float16))
        (tmp / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
        files = {f"{role}.onnx": describe_file(tmp, f"{role}.onnx", role, precision="fp32",
                                               **(DECODER_IO if role == "decoder" else {}))
                 for role in onnx_names}
        files["decoder.onnx.data"] = describe_file(tmp, "decoder.onnx.data", "external_data", data_of="decoder.onnx")
        files["embed_tokens.npy"] = describe_file(tmp, "embed_tokens.npy", "embed_tokens", precision="fp16")
        files["tokenizer.json"] = describe_file(tmp, "tokenizer.json", "tokenizer")
        write_manifest(tmp, make_manifest(files, icm))
    return dest


def make_manifest(files: dict, icm: bool = False) -> Manifest:
    return Manifest(
        format_version=PACK_FORMAT_VERSION,
        model=model_config(icm).to_dict(),
        method="retrv-r1" if icm else "listwise",
        preprocessor=ImageProcessorConfig().to_dict(),
        prompt_template={"default_system": "You are a helpful assistant."},
        opset=18,
        created_by={"retrv-edge": "0.1.0", "torch": "2.5.0", "onnx": "1.17.0"},
        files=files,
        validation={"decoder": {"max_abs_diff": 1.5e-5, "passed": True}},
    )


@pytest.fixture
def pack_dir(tmp_path) -> Path:
    return build_pack(tmp_path / "pack")


def read_manifest(pack: Path) -> dict:
    return json.loads((pack / MANIFEST_NAME).read_text())


def write_raw_manifest(pack: Path, d) -> None:
    (pack / MANIFEST_NAME).write_text(json.dumps(d))


def refused(pack: Path, *fragments: str, verify: str = "full") -> str:
    with pytest.raises(PackError) as info:
        Pack.open(pack, verify=verify)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# --- manifest ---------------------------------------------------------------------------------------------------

def test_manifest_round_trips_through_dict_and_json(pack_dir):
    m = Pack.open(pack_dir).manifest
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    # Built in code (tuples in shapes and ModelConfig) equals what is read back from disk (lists).
    built = make_manifest({n: FileEntry.from_dict(e.to_dict()) for n, e in m.files.items()})
    assert built == m and built.canonical_json() == m.canonical_json()
    d = m.to_dict()
    assert d["files"]["decoder.onnx"]["inputs"]["inputs_embeds"] == {"dtype": "float32", "shape": ["batch", "seq", 64]}
    assert d["files"]["decoder.onnx.data"]["data_of"] == "decoder.onnx"
    assert d["format_version"] == PACK_FORMAT_VERSION


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.pop("files"), "missing fields ['files']"),
    (lambda d: d.update(surprise=1), "unknown fields ['surprise']"),
    (lambda d: d.update(opset="18"), "opset"),
    (lambda d: d.update(method="retrv-r1"), "expected 'listwise'"),
    (lambda d: d.update(model=[]), "model: got list"),
    (lambda d: d["files"]["vision.onnx"].update(sha256="abc"), "sha256: got 'abc'"),
    (lambda d: d["files"]["vision.onnx"].update(bytes=True), "bytes: got True"),
    (lambda d: d["files"]["vision.onnx"].update(precision="fp8"), "precision: got 'fp8'"),
    (lambda d: d["files"]["vision.onnx"].update(role="decoder"), "role 'decoder' on both"),
    (lambda d: d["files"]["vision.onnx"].update(data_of="decoder.onnx"), "data_of"),
    (lambda d: d["files"]["decoder.onnx.data"].update(data_of="tokenizer.json"), "expected a listed .onnx file"),
    (lambda d: d["files"]["vision.onnx"].update(inputs={"x": {"dtype": "float32", "shape": [-1]}}), "shape"),
    (lambda d: d["files"]["vision.onnx"].update(colour="blue"), "unknown fields ['colour']"),
    (lambda d: d["files"].update({MANIFEST_NAME: d["files"]["tokenizer.json"]}), "cannot list itself"),
])
def test_malformed_manifest_is_refused_naming_the_field(pack_dir, change, fragment):
    d = read_manifest(pack_dir)
    change(d)
    write_raw_manifest(pack_dir, d)
    refused(pack_dir, str(pack_dir / MANIFEST_NAME), fragment)


def test_file_entry_validates_on_construction():
    with pytest.raises(PackError, match="external_data"):
        FileEntry(role="external_data", sha256="0" * 64, bytes=1)
    with pytest.raises(PackError, match="not JSON-serializable"):
        FileEntry(role="decoder", sha256="0" * 64, bytes=1, quantization={"scales": {1, 2}})


# --- open ---------------------------------------------------------------------------------------------------------

def test_open_exposes_entries_and_configs(tmp_path):
    pack = Pack.open(build_pack(tmp_path / "p", icm=True))
    assert pack.path == (tmp_path / "p").resolve()
    assert pack.file("decoder") == pack.path / "decoder.onnx"
    assert pack.has("icm_content") and pack.has("icm_relation") and not pack.has("engine")
    assert pack.manifest.method == "retrv-r1"
    assert pack.manifest.files["embed_tokens.npy"].precision == "fp16"
    assert np.load(pack.file("embed_tokens")).shape == (512, 64)
    assert pack.model_config == model_config(icm=True)
    assert pack.preprocessor == ImageProcessorConfig()
    with pytest.raises(PackError, match="no file with role 'engine'"):
        pack.file("engine")
    listwise = Pack.open(build_pack(tmp_path / "q", icm=False))
    assert listwise.manifest.method == "listwise" and not listwise.has("icm_content")


def test_fingerprint_is_stable_and_follows_content(pack_dir):
    first = Pack.open(pack_dir).sha256
    assert len(first) == 64 and Pack.open(pack_dir, verify="size").sha256 == first
    d = read_manifest(pack_dir)
    (pack_dir / MANIFEST_NAME).write_text(json.dumps(d, indent=7))  # reformatting is not a change
    assert Pack.open(pack_dir).sha256 == first
    d["validation"]["note"] = "re-validated"
    write_raw_manifest(pack_dir, d)
    assert Pack.open(pack_dir).sha256 != first


def test_modified_byte_of_same_size_is_refused(pack_dir):
    path = pack_dir / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused(pack_dir, str(path), "sha256", "expected " + read_manifest(pack_dir)["files"]["decoder.onnx"]["sha256"])


def test_truncated_file_is_refused(pack_dir):
    path = pack_dir / "decoder.onnx.data"
    path.write_bytes(path.read_bytes()[:-1])
    refused(pack_dir, str(path), "4095 bytes; expected 4096")


def test_missing_file_is_refused(pack_dir):
    (pack_dir / "vision.onnx").unlink()
    refused(pack_dir, str(pack_dir / "vision.onnx"), "file not found")


def test_missing_manifest_and_missing_directory_are_refused(pack_dir, tmp_path):
    (pack_dir / MANIFEST_NAME).unlink()
    refused(pack_dir, str(pack_dir / MANIFEST_NAME), "file not found")
    refused(tmp_path / "nowhere", str(tmp_path / "nowhere"), "pack directory not found")


@pytest.mark.parametrize("text, fragment", [
    ("{ not json", "not valid JSON"),
    ("[1, 2]", "got a JSON list; expected an object"),
    ('{"format_version": NaN}', "not valid JSON"),
    ("", "not valid JSON"),
])
def test_unparseable_manifest_is_refused(pack_dir, text, fragment):
    (pack_dir / MANIFEST_NAME).write_text(text)
    refused(pack_dir, str(pack_dir / MANIFEST_NAME), fragment)


def test_newer_format_version_is_refused_before_anything_else(pack_dir):
    # A newer manifest may have other fields entirely; the useful message is still "upgrade".
    write_raw_manifest(pack_dir, {"format_version": 2, "something_new": {}})
    refused(pack_dir, "format_version 2 is newer than this retrv-edge supports (1); upgrade retrv-edge")
    for bad in ("1", 1.0, True, 0, None):
        write_raw_manifest(pack_dir, {"format_version": bad})
        refused(pack_dir, "format_version: got")


def _list_outside_file(pack_dir: Path, name: str, target: Path) -> None:
    """List `name` in the manifest with the size and sha256 of `target`, so only the path check can refuse it."""
    d = read_manifest(pack_dir)
    d["files"][name] = FileEntry(role="extra_blob", sha256=sha256_file(target), bytes=target.stat().st_size).to_dict()
    write_raw_manifest(pack_dir, d)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked_dir", "symlinked_manifest"])
def test_paths_escaping_the_pack_are_refused(pack_dir, tmp_path, how):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    if how == "dotdot":
        _list_outside_file(pack_dir, "../outside.bin", outside)
        refused(pack_dir, "'../outside.bin'", "escapes the pack directory")
    elif how == "absolute":
        _list_outside_file(pack_dir, str(outside), outside)
        refused(pack_dir, str(outside), "absolute path")
    elif how == "symlink":
        os.symlink(outside, pack_dir / "link.bin")
        _list_outside_file(pack_dir, "link.bin", outside)
        refused(pack_dir, str(pack_dir / "link.bin"), "outside the pack directory")
    elif how == "symlinked_dir":
        os.symlink(tmp_path, pack_dir / "sub")
        _list_outside_file(pack_dir, "sub/outside.bin", outside)
        refused(pack_dir, "sub/outside.bin", "outside the pack directory")
    else:
        real = tmp_path / "elsewhere.json"
        (pack_dir / MANIFEST_NAME).rename(real)
        os.symlink(real, pack_dir / MANIFEST_NAME)
        refused(pack_dir, str(pack_dir / MANIFEST_NAME), "outside the pack directory")


def test_symlink_inside_the_pack_is_allowed(pack_dir):
    (pack_dir / "tokenizer.json").rename(pack_dir / "tok.real.json")
    os.symlink("tok.real.json", pack_dir / "tokenizer.json")
    assert Pack.open(pack_dir).file("tokenizer").read_text().startswith("{")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_is_refused_without_blocking(pack_dir):
    # Hashing a FIFO would block forever; a manifest is untrusted input.
    os.mkfifo(pack_dir / "pipe")
    d = read_manifest(pack_dir)
    d["files"]["pipe"] = FileEntry(role="extra_blob", sha256=hashlib.sha256(b"").hexdigest(), bytes=0).to_dict()
    write_raw_manifest(pack_dir, d)
    refused(pack_dir, str(pack_dir / "pipe"), "not a regular file")


def test_invalid_model_config_is_refused_on_open(pack_dir):
    d = read_manifest(pack_dir)
    d["model"]["text"]["hidden_size"] = 63
    write_raw_manifest(pack_dir, d)
    refused(pack_dir, str(pack_dir / MANIFEST_NAME), "'model'", "hidden_size")
    d["model"] = {"text": {}}
    write_raw_manifest(pack_dir, d)
    refused(pack_dir, "'model'", "missing fields", "vision")


def test_verify_size_catches_truncation_but_not_same_size_modification(pack_dir):
    path = pack_dir / "vision.onnx"
    original = path.read_bytes()
    path.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])
    Pack.open(pack_dir, verify="size")  # documented trade-off: same size passes
    refused(pack_dir, "sha256", verify="full")
    path.write_bytes(original[:-10])
    refused(pack_dir, str(path), "bytes; expected", verify="size")
    with pytest.raises(InputError, match="verify"):
        Pack.open(pack_dir, verify="none")


def test_describe_file_refuses_missing_file(tmp_path):
    with pytest.raises(PackError, match="file not found"):
        describe_file(tmp_path, "decoder.onnx", "decoder")
    with pytest.raises(PackError, match="escapes"):
        describe_file(tmp_path, "../decoder.onnx", "decoder")


# --- fsutil -------------------------------------------------------------------------------------------------------

def test_atomic_dir_leaves_no_trace_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "pack") as tmp:
            (tmp / "half.onnx").write_bytes(b"x")
            raise RuntimeError("export failed")
    assert os.listdir(tmp_path) == []


def test_atomic_dir_replaces_existing_directory(tmp_path):
    final = tmp_path / "pack"
    final.mkdir()
    (final / "old.onnx").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "new.onnx").write_bytes(b"new")
            raise RuntimeError("boom")
    assert os.listdir(final) == ["old.onnx"] and os.listdir(tmp_path) == ["pack"]
    with atomic_dir(final) as tmp:
        (tmp / "new.onnx").write_bytes(b"new")
    assert os.listdir(final) == ["new.onnx"] and os.listdir(tmp_path) == ["pack"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "file"):
            pass


def test_atomic_write_json_keeps_old_file_when_serialization_fails(tmp_path):
    path = tmp_path / "index.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    old = path.read_text()
    assert old == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": {1, 2}})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"a": float("nan")})
    assert path.read_text() == old and os.listdir(tmp_path) == ["index.json"]


def test_atomic_write_bytes_removes_temp_when_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "hnsw.bin"
    atomic_write_bytes(path, b"old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["hnsw.bin"]


def test_sha256_file_streams(tmp_path):
    data = np.random.default_rng(1).bytes(10_000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=7) == hashlib.sha256(data).hexdigest()


# --- import weight --------------------------------------------------------------------------------------------------

def test_pack_import_and_open_pull_no_heavy_package(pack_dir):
    code = (
        "import sys, retrv.runtime.pack as p\n"
        "heavy = ('torch', 'onnx', 'onnxruntime', 'transformers')\n"
        "after_import = [m for m in heavy if m in sys.modules]\n"
        f"p.Pack.open({str(pack_dir)!r})\n"
        "after_open = [m for m in heavy if m in sys.modules]\n"
        "print(after_import, after_open)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr


@pytest.mark.parametrize("rerank, fragment", [
    ({"answer_format": "essay"}, "answer_format: got 'essay'"),
    ({"target_image_base": True}, "target_image_base: got True"),
    ({"surprise": 1}, "unknown keys ['surprise']"),
    ("list", "got str"),
])
def test_a_bad_rerank_format_is_refused_on_open(pack_dir, rerank, fragment):
    d = read_manifest(pack_dir)
    d["extra"]["rerank"] = rerank
    write_raw_manifest(pack_dir, d)
    refused(pack_dir, "extra.rerank", fragment)
    d["extra"]["rerank"] = {"answer_format": "index", "target_image_base": 0}
    write_raw_manifest(pack_dir, d)
    assert Pack.open(pack_dir).manifest.extra["rerank"]["answer_format"] == "index"


def test_decoder_layout_defaults_to_traced_and_must_match_the_decoder_inputs(pack_dir):
    assert Pack.open(pack_dir).decoder_layout == "traced"  # packs written before the field
    d = read_manifest(pack_dir)
    d["extra"]["decoder_layout"] = "flat"
    write_raw_manifest(pack_dir, d)
    refused(pack_dir, "'extra.decoder_layout': got 'flat'", "expected one of ['traced', 'fused']")
    d["extra"]["decoder_layout"] = "fused"  # but the decoder's recorded inputs are the traced graph's
    write_raw_manifest(pack_dir, d)
    refused(pack_dir, "decoder.onnx: inputs", "do not match decoder_layout 'fused'")
