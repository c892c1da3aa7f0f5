"""What of `retrv build-engine` and the TensorRT backend can be checked without a GPU: the no-GPU refusal, the
fingerprint comparison and the refusal to load foreign engines, precision checks, optimization profiles, and the
manifest an engine build writes (TensorRT itself replaced by a recording fake)."""

import argparse
import shutil

import numpy as np
import pytest

from retrv.export import trt as build
from retrv.export.pack_export import export_pack
from retrv.model.tiny import write_tiny_checkpoint
from retrv.runtime.backends import trt as backend
from retrv.runtime.errors import InputError, RetrvError
from retrv.runtime.pack import Pack

HERE = {"tensorrt": "10.9.0.34", "gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
JETSON = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}


class FakeBuilder:
    """Stands in for TrtBuilder: records what it was asked to build, returns fake engine bytes."""

    made: list = []

    def __init__(self, cache: bytes, workspace_mb: int) -> None:
        self.cache_in, self.calls = cache, []
        FakeBuilder.made.append(self)

    def build(self, onnx_path, profiles, plugins=False) -> bytes:
        self.calls.append((onnx_path.name, profiles, plugins))
        return b"fake engine for " + onnx_path.name.encode()

    def timing_cache(self) -> bytes:
        return b"timing cache v%d" % len(FakeBuilder.made)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    ckpt = write_tiny_checkpoint(root / "ckpt", icm=True, seed=11)
    return ckpt, export_pack(ckpt, root / "pack", decoder="traced")  # TensorRT takes the traced layout only


@pytest.fixture(scope="module")
def built(tiny):
    ckpt, pack_dir = tiny
    target = pack_dir.parent / "pack-with-engines"  # a copy: `tiny` stays an engine-free pack
    shutil.copytree(pack_dir, target)
    FakeBuilder.made.clear()
    first = build.build_engines(target, fingerprint=HERE, builder_factory=FakeBuilder)
    return first, FakeBuilder.made[0]


# ------------------------------------------------------------------------------------------------- no GPU at all
def test_build_engine_without_gpu_fails_with_one_line(tiny, monkeypatch):
    _, pack_dir = tiny
    monkeypatch.setattr(backend.ctypes, "CDLL", _no_driver)
    ap = argparse.ArgumentParser(prog="retrv")
    build.register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["build-engine", str(pack_dir), "--fp16"])
    with pytest.raises(backend.NoGpuError) as err:
        args.func(args)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("no CUDA GPU found")
    assert isinstance(err.value, RetrvError)  # the CLI prints it as one line and exits 2
    assert not (pack_dir / "decoder.plan").exists()


def _no_driver(name, *a, **k):
    raise OSError(f"{name}: cannot open shared object file")


def test_engines_match_is_false_without_gpu(built, monkeypatch):
    monkeypatch.setattr(backend.ctypes, "CDLL", _no_driver)
    assert backend.engines_match(built[0]) is False


# ------------------------------------------------------------------------------------------------- fingerprints
def test_fingerprint_comparison():
    assert backend.fingerprint_mismatch(dict(HERE), dict(HERE)) is None
    for key, other in (("tensorrt", "10.9.0.35"), ("gpu", "NVIDIA RTX A4000"), ("compute_capability", "8.6")):
        reason = backend.fingerprint_mismatch(HERE, {**HERE, key: other})
        assert reason and key in reason and other in reason and HERE[key] in reason
    assert "no valid TensorRT fingerprint" in backend.fingerprint_mismatch(None, HERE)
    assert "no valid" in backend.fingerprint_mismatch({"tensorrt": "10.3"}, HERE)


def test_foreign_engines_are_refused_never_loaded(built, monkeypatch):
    pack, _ = built
    loaded = []
    monkeypatch.setattr(backend, "device_fingerprint", lambda driver=None: dict(JETSON))
    monkeypatch.setattr(backend, "EngineRunner", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(backend, "require", lambda *a: pytest.fail("tensorrt touched before the check"))
    with pytest.raises(backend.EngineMismatchError) as err:
        backend.TrtBackend(pack, driver=object())
    msg = str(err.value)
    assert "\n" not in msg
    assert backend.describe(HERE) in msg and backend.describe(JETSON) in msg
    assert "retrv build-engine" in msg
    assert loaded == []
    assert backend.engines_match(pack) is False


def test_matching_engines_pass_the_check(built, monkeypatch):
    pack, _ = built
    monkeypatch.setattr(backend, "device_fingerprint", lambda driver=None: dict(HERE))
    assert backend.engines_match(pack) is True
    assert backend.check_engines(pack, dict(HERE))["fingerprint"] == HERE


def test_pack_without_engines_is_refused(tiny):
    _, pack_dir = tiny
    plain = Pack.open(pack_dir)
    with pytest.raises(InputError, match="no TensorRT engines"):
        backend.check_engines(plain, HERE)


# ---------------------------------------------------------------------------------------------- the build itself
def test_build_writes_engines_and_manifest(built):
    pack, fake = built
    roles = {e.role: n for n, e in pack.manifest.files.items()}
    for role in ("vision", "decoder", "icm_content", "icm_relation"):
        name = roles[f"trt_{role}"]
        assert name == f"{role}.plan" and (pack.path / name).read_bytes() == b"fake engine for " + \
            f"{role}.onnx".encode()
        entry = pack.manifest.files[name]
        assert entry.inputs == pack.manifest.files[f"{role}.onnx"].inputs  # runtime checks feeds against it
    assert roles["trt_timing_cache"] == "timing.cache"
    rec = pack.manifest.extra["tensorrt"]
    assert rec["fingerprint"] == HERE
    assert set(rec["engines"]) == {"vision", "decoder", "icm_content", "icm_relation"}
    assert rec["engines"]["decoder"]["source_sha256"] == pack.manifest.files["decoder.onnx"].sha256
    assert [c[0] for c in fake.calls] == ["vision.onnx", "decoder.onnx", "icm_content.onnx", "icm_relation.onnx"]
    assert fake.cache_in == b""  # first build: no timing cache yet
    Pack.open(pack.path)  # sizes and sha256 of every listed file, engines included


def test_rebuild_reuses_timing_cache_only_on_the_same_device(built):
    pack, _ = built
    cache = (pack.path / "timing.cache").read_bytes()
    again = build.build_engines(pack.path, fingerprint=HERE, builder_factory=FakeBuilder)
    assert FakeBuilder.made[-1].cache_in == cache
    assert sum(e.role == "trt_decoder" for e in again.manifest.files.values()) == 1  # replaced, not duplicated
    build.build_engines(pack.path, fingerprint=JETSON, builder_factory=FakeBuilder)
    assert FakeBuilder.made[-1].cache_in == b""  # another device's tactic timings are not reused
    build.build_engines(pack.path, fingerprint=HERE, builder_factory=FakeBuilder)  # leave it as the fixture had it


def test_decoder_gets_prefill_and_decode_profiles(built):
    pack, fake = built
    profiles = dict((c[0], c[1]) for c in fake.calls)["decoder.onnx"]
    shapes = build.EngineShapes()
    prefill, decode = profiles
    h = pack.model_config.text.hidden_size
    assert prefill["inputs_embeds"] == [[1, 1, h], [1, shapes.opt_prefill, h], [shapes.max_batch, shapes.max_seq, h]]
    assert [d[1] for d in decode["inputs_embeds"]] == [1, 1, 1]  # one token
    assert prefill["past_key_0"][0][2] == 0 and decode["past_key_0"][2][2] == shapes.max_total - 1
    assert decode["attention_mask"][2][1] == shapes.max_total
    for prof in profiles:
        for name, (lo, opt, hi) in prof.items():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
    vision = dict((c[0], c[1]) for c in fake.calls)["vision.onnx"][0]
    assert [p // 4 for p in np.array(vision["patches"])[:, 0]] == list(np.array(vision["window_index"])[:, 0])


def test_precision_flags_are_checked_against_the_pack(tiny):
    _, pack_dir = tiny
    pack = Pack.open(pack_dir)
    with pytest.raises(InputError, match=r"decoder.onnx|vision.onnx") as err:
        build.plan_graphs(pack, fp16=True, int8=False)
    assert "--precision fp16" in str(err.value)
    with pytest.raises(InputError, match="int8-static"):
        build.plan_graphs(pack, fp16=False, int8=True)
    assert [r for r, _ in build.plan_graphs(pack, False, False)] == ["vision", "decoder", "icm_content",
                                                                      "icm_relation"]


def test_engine_shapes_validate():
    with pytest.raises(InputError, match="opt_cands"):
        build.EngineShapes(opt_cands=100, max_cands=64)
    with pytest.raises(InputError, match="max_seq"):
        build.EngineShapes(max_seq=9000, max_total=8192)
    with pytest.raises(InputError, match="expected an integer >= 1"):
        build.EngineShapes(max_batch=0)
