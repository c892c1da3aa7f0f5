"""A pack with a separate embedder (`retrv export --embedder`) on TensorRT: `build-engine` builds its two graphs
(`embedder_vision`, `embedder`) and the TensorRT backend serves them, so the coarse stage gives ONNX Runtime's
vectors. TensorRT is the CPU fake of tests/fake_tensorrt.py running the real backend code."""

from __future__ import annotations

import numpy as np
import pytest

import fake_tensorrt

from retrv.app.demo import synthetic_image
from retrv.export.pack_export import export_pack
from retrv.export.trt import EngineShapes, build_engines
from retrv.model.tiny import write_tiny_checkpoint
from retrv.runtime.backends import open_backend
from retrv.runtime.backends.trt import TrtBackend
from retrv.runtime.inputs.embedding import EmbedItem
from retrv.runtime.retriever import Components

SHAPES = EngineShapes(max_batch=2, opt_prefill=64, max_seq=512, opt_past=64, max_total=1024, opt_patches=256,
                      max_patches=4096, opt_cands=4, max_cands=8, opt_cand_len=16, max_cand_len=256,
                      opt_query_len=16, max_query_len=256, workspace_mb=64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-embedder")
    ckpt = write_tiny_checkpoint(root / "reranker", icm=True, seed=3)
    emb = write_tiny_checkpoint(root / "embedder", seed=4, hidden_size=96, intermediate_size=160,
                                mrope_section=[4, 4, 4])
    pack_dir = export_pack(ckpt, root / "pack", embedder=emb, decoder="traced")  # TensorRT: traced layout only
    with pytest.MonkeyPatch.context() as mp:
        trt = fake_tensorrt.install(mp)
        fake_tensorrt.RecordingBuilder.made.clear()
        pack = build_engines(pack_dir, shapes=SHAPES, fingerprint=fake_tensorrt.fingerprint(trt.driver),
                             builder_factory=fake_tensorrt.RecordingBuilder)
        yield pack, fake_tensorrt.RecordingBuilder.made[0], trt


def test_build_engine_builds_the_embedders_graphs(built):
    pack, builder, _ = built
    assert [c[0] for c in builder.calls] == ["vision.onnx", "decoder.onnx", "embedder_vision.onnx", "embedder.onnx",
                                             "icm_content.onnx", "icm_relation.onnx"]
    for role in ("embedder_vision", "embedder"):
        assert pack.has(f"trt_{role}") and pack.file(f"trt_{role}").name == f"{role}.plan"
        assert pack.manifest.extra["tensorrt"]["engines"][role]["source"] == f"{role}.onnx"
    profiles = dict((c[0], c[1]) for c in builder.calls)["embedder_vision.onnx"]
    patches, windows = np.array(profiles[0]["patches"])[:, 0], np.array(profiles[0]["window_index"])[:, 0]
    merge = pack.manifest.extra["embedder"]["model"]["vision"]["spatial_merge_size"] ** 2
    assert list(patches // merge) == list(windows)  # the embedder's own merge size


def test_trt_serves_the_embedders_vision_tower_and_embedder(built):
    pack, _, trt = built
    img = synthetic_image(3)
    ort_comps = Components(pack, open_backend(pack, "ort", cache_dir=None))
    trt_comps = Components(pack, TrtBackend(pack))  # raised TypeError (vision had no role) before
    want = ort_comps.embedder.embed([EmbedItem("a red ball", image=img)], "query")
    del trt.executions[:]
    got = trt_comps.embedder.embed([EmbedItem("a red ball", image=img)], "query")
    assert got.shape == want.shape == (1, 96)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert [e["graph"] for e in trt.executions] == ["embedder_vision.onnx", "embedder.onnx"]
    trt_comps.backend.close()
