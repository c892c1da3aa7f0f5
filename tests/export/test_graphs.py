"""The exported ICM relation graph (the query side once, broadcast over K) against the PyTorch ICM as written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrv.export.onnx_export import TOLERANCE, ExportValidationError
from retrv.model.icm import ICM


@pytest.fixture(scope="module")
def reference_icm(tiny_ckpt):
    from retrv.model.loading import load_checkpoint

    return load_checkpoint(tiny_ckpt, dtype=torch.float32).icm


@pytest.mark.parametrize("k", [1, 3, 50])
def test_the_packs_relation_graph_equals_model_icm(tiny_pack, reference_icm, k):
    import onnxruntime as ort

    from retrv.runtime.pack import Pack

    h = reference_icm.cfg.hidden_size
    rng = np.random.default_rng(k)
    cand = rng.standard_normal((k, 7, h)).astype(np.float32)
    mask = np.ones((k, 7), np.int64)
    mask[0, 3:] = 0  # a shorter first candidate
    query = rng.standard_normal((5, h)).astype(np.float32)
    qmask = np.ones(5, np.int64)
    sess = ort.InferenceSession(str(Pack.open(tiny_pack).file("icm_relation")), providers=["CPUExecutionProvider"])
    got = sess.run(["t_rel"], {"cand_tokens": cand, "cand_mask": mask, "query_tokens": query, "query_mask": qmask})[0]
    with torch.no_grad():
        want = reference_icm.relation(*(torch.from_numpy(a) for a in (cand, mask, query, qmask))).numpy()
    assert got.shape == (k, h)
    assert np.abs(got - want).max() <= TOLERANCE["fp32"] * max(1.0, float(np.abs(want).max()))


def test_export_validates_the_relation_graph_against_the_reference(tiny_ckpt, tmp_path, monkeypatch):
    """The oracle is `ICM.relation`, not the restructured code that was exported: a wrong restructuring is refused."""
    from retrv.export.pack_export import export_pack

    def wrong(self, cand, cand_mask, query, query_mask):  # off by a constant
        return ICM.relation(self, cand, cand_mask, query, query_mask) + 0.05

    monkeypatch.setattr(ICM, "relation_shared", wrong)
    with pytest.raises(ExportValidationError, match=r"icm_relation\.onnx output 't_rel': max abs diff"):
        export_pack(tiny_ckpt, tmp_path / "pack")
    assert not (tmp_path / "pack").exists()
