"""The gate measures the reranker's answer agreement by default, with the runtime's own loop."""

from __future__ import annotations

from retrv.calibration.config import Int8DynamicConfig
from retrv.calibration.quantize import quantize_pack
from retrv.export.pack_export import export_pack
from retrv.model.tiny import write_tiny_checkpoint
from retrv.runtime.pack import Pack


def test_answer_agreement_is_measured_not_stubbed(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", icm=True, seed=21)
    src = export_pack(ckpt, tmp_path / "pack")
    quantize_pack(src, tmp_path / "int8", Int8DynamicConfig())
    gate = Pack.open(tmp_path / "int8").manifest.validation["gate"]
    agreement = gate["answer_agreement"]
    assert isinstance(agreement, float) and 0.0 <= agreement <= 1.0
    # identical packs must agree on every answer: the measurement itself is sound
    from retrv.calibration.answers import reranker_answers
    from retrv.calibration.quantize import _synthetic_gate_items

    fn = reranker_answers(_synthetic_gate_items(tmp_path))
    assert fn(src) == fn(src) and len(fn(src)) >= 1
