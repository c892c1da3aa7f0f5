"""TensorRT end to end on a tiny pack: `build-engine`, then the TensorRT backend generates the same greedy tokens as
ONNX Runtime, and its ICM outputs match; the ICM plugin path likewise when tensorrt.plugin is available."""

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                                reason="tensorrt is not installed (pip install 'retrv-edge[gpu]')")

MAX_NEW_TOKENS = 16
# Small limits keep the build to seconds; the tiny model needs no more.
SHAPES = dict(max_batch=2, opt_prefill=64, max_seq=512, opt_past=128, max_total=1024, opt_patches=256,
              max_patches=4096, opt_cands=8, max_cands=16, opt_cand_len=16, max_cand_len=64, opt_query_len=8,
              max_query_len=64, workspace_mb=1024)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    from retrv.export.pack_export import export_pack
    from retrv.export.trt import EngineShapes, build_engines
    from retrv.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("trt")
    ckpt = write_tiny_checkpoint(root / "ckpt", icm=True, seed=7)
    pack_dir = export_pack(ckpt, root / "pack")
    return ckpt, pack_dir, build_engines(pack_dir, shapes=EngineShapes(**SHAPES))


def _generators(pack):
    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.backends.trt import TrtBackend
    from retrv.runtime.generate import Generator

    return (Generator.from_pack(pack, OrtBackend(pack, provider="cpu", cache_dir=None)),
            Generator.from_pack(pack, TrtBackend(pack)))


def test_engines_are_recorded_with_this_device(packs):
    from retrv.runtime.backends.trt import device_fingerprint, engines_match

    _, _, pack = packs
    assert pack.manifest.extra["tensorrt"]["fingerprint"] == device_fingerprint()
    assert engines_match(pack)
    for role in ("vision", "decoder", "icm_content", "icm_relation"):
        assert pack.has(f"trt_{role}")


@pytest.mark.parametrize("case", ["text", "two_images"])
def test_trt_greedy_tokens_equal_ort(packs, case):
    from retrv.export.verify import verification_images

    _, _, pack = packs
    prompt, images = {"text": ("Describe a red bicycle leaning on a wall.", []),
                      "two_images": ("Which picture shows more circles?", verification_images())}[case]
    ort_gen, trt_gen = _generators(pack)
    want = ort_gen.generate(prompt, images, MAX_NEW_TOKENS, stop_at_eos=False)
    got = trt_gen.generate(prompt, images, MAX_NEW_TOKENS, stop_at_eos=False)
    assert got.token_ids == want.token_ids
    assert len(got.token_ids) == MAX_NEW_TOKENS  # decode profile exercised for every step after the first


def _icm_feeds(seed=0, k=5, length=9, lq=6, h=64):
    rng = np.random.default_rng(seed)
    mask = np.ones((k, length), np.int64)
    mask[0, 4:] = 0
    return (rng.standard_normal((k, length, h)).astype(np.float32), mask,
            rng.standard_normal((lq, h)).astype(np.float32), np.array([1, 1, 1, 1, 0, 0], np.int64))


def _check_icm(pack):
    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.backends.trt import TrtBackend

    cand, mask, query, qmask = _icm_feeds(h=pack.model_config.text.hidden_size)
    ort_b, trt_b = OrtBackend(pack, provider="cpu", cache_dir=None), TrtBackend(pack)
    for got, want in ((trt_b.icm_content(cand, mask), ort_b.icm_content(cand, mask)),
                      (trt_b.icm_relation(cand, mask, query, qmask), ort_b.icm_relation(cand, mask, query, qmask))):
        assert np.abs(got - want).max() <= 1e-3 * max(1.0, float(np.abs(want).max()))
    trt_b.close()


def test_trt_icm_matches_ort(packs):
    _check_icm(packs[2])


def test_icm_plugin_engines_match_ort(packs, tmp_path):
    import shutil

    from retrv.export.trt import EngineShapes, build_engines

    if importlib.util.find_spec("tensorrt.plugin") is None:
        pytest.skip("this TensorRT has no tensorrt.plugin (TensorRT >= 10.6 needed)")
    ckpt, pack_dir, _ = packs
    copy = tmp_path / "pack"
    shutil.copytree(pack_dir, copy)
    pack = build_engines(copy, icm_plugin=ckpt, shapes=EngineShapes(**SHAPES))
    assert pack.manifest.extra["tensorrt"]["engines"]["icm_relation"]["icm_plugin"] is True
    _check_icm(pack)
