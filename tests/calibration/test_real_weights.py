"""Quality gates on real weights (the SmolLM2-135M-Instruct graft): INT8 (weight-only and dynamic) and INT4 packs
pass the default gates, perplexity on the project's own English text stays within the goals (int8-dynamic, which
misses the +0.5% goal, within a looser bound), and the previous INT4 default is refused."""

from __future__ import annotations

import pytest

from retrv.calibration.gates import GateError
from retrv.calibration.quality import repo_text, score_pack, token_rows, top1_agreement
from retrv.calibration.quantize import Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig, quantize_pack
from retrv.runtime.inputs.prompt import PromptTokenizer

pytestmark = pytest.mark.slow  # the graft is 540 MB: export and each quantization take a minute or more


@pytest.fixture(scope="module")
def graft_pack(graft_ckpt, tmp_path_factory):
    from retrv.export.pack_export import export_pack

    pack = export_pack(graft_ckpt, tmp_path_factory.mktemp("graft-pack") / "fp32")
    rows = token_rows(PromptTokenizer(pack / "tokenizer.json").encode_text(repo_text()), 4, 96)
    return pack, rows, score_pack(pack, rows)


# Bounds on this text (the repo's own Markdown, perplexity ~232, 380 positions), not the goals: the +0.5% INT8 goal is
# measured on the shared captions by bench/decode.py (int8-weight with its default INT8 head -0.91% there).
# int8-weight measured +0.66% here with an fp32 head and +1.24% with the INT8 head (the default since issue 20):
# the head's error shows on this out-of-domain text, hence 1.5.
@pytest.mark.parametrize("config,max_ppl_pct", [(Int8WeightOnlyConfig(), 1.5), (Int8DynamicConfig(), 2.5),
                                                 (Int4WeightOnlyConfig(), 3.0)],
                         ids=["int8-weight", "int8-dynamic", "int4"])
def test_quantized_graft_passes_the_default_gate_and_keeps_perplexity(graft_pack, config, max_ppl_pct, tmp_path):
    pack, rows, ref = graft_pack
    report = quantize_pack(pack, tmp_path / "q", config)  # the default limit gates: GateError if exceeded
    assert report.gate["limit"].startswith("default") and report.gate["max_drop"] == type(config).default_max_drop
    got = score_pack(tmp_path / "q", rows)
    assert 100 * (got.perplexity / ref.perplexity - 1) <= max_ppl_pct
    assert top1_agreement(ref, got) >= 0.8


def test_previous_int4_default_is_refused_by_the_default_gate(graft_pack, tmp_path):
    pack, _, _ = graft_pack
    with pytest.raises(GateError, match="exceeds it by"):
        quantize_pack(pack, tmp_path / "q", Int4WeightOnlyConfig(zero_point="int"))
    assert not (tmp_path / "q").exists()
