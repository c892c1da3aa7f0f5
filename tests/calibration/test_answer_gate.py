"""The gate measures the reranker's answer agreement by default, with the runtime's own loop."""

from __future__ import annotations

import pytest

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
    from retrv.calibration.answers import reranker_answers
    from retrv.calibration.quantize import _synthetic_gate_items

    # The oracle: the same answer function run here on both packs; the recorded figure is their share of equal answers.
    fn = reranker_answers(_synthetic_gate_items(tmp_path))
    ref, quant = fn(src), fn(tmp_path / "int8")
    assert len(ref) == len(quant) >= 1
    assert agreement == pytest.approx(sum(a == b for a, b in zip(ref, quant)) / len(ref), abs=1e-6)
    assert fn(src) == ref  # deterministic: identical packs agree on every answer
