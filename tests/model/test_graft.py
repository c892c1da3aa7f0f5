"""The graft (SmolLM2-135M-Instruct's decoder in a Qwen2.5-VL checkpoint) computes what the GGUF's Llama does."""

from __future__ import annotations

import json

import pytest
import torch

from retrv.model import load_checkpoint
from retrv.model.graft import default_gguf, load_llama, main
from tokenizers import Tokenizer

TEXT = ("retrv-edge exports Qwen2.5-VL reranker checkpoints to ONNX packs and runs them with a light numpy and "
        "onnxruntime runtime, with a crash-safe HNSW index, a command line and an HTTP service.")


@pytest.mark.slow  # builds the 540 MB graft and loads the GGUF: about 80 s on 2 cores
def test_graft_logits_equal_llama_on_the_gguf_in_fp32(graft_ckpt):
    llama, _ = load_llama(default_gguf())
    model = load_checkpoint(graft_ckpt)
    ids = torch.tensor([Tokenizer.from_file(str(graft_ckpt / "tokenizer.json")).encode(TEXT).ids])
    with torch.no_grad():
        ref = llama(ids).logits[0]  # (S, 49152)
        got = model(ids).logits[0]  # (S, 49152 + Qwen's added tokens)
    assert got.shape[1] > ref.shape[1]
    assert torch.allclose(got[:, : ref.shape[1]], ref, atol=2e-4, rtol=1e-4)
    assert (got[:, ref.shape[1]:] == 0).all()  # the added tokens' zero rows never outscore a real token by accident
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_graft_config_carries_the_llama_values(graft_ckpt):
    cfg = json.loads((graft_ckpt / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5) and cfg["rope_scaling"]["mrope_section"] == [8, 12, 12]
    tok = Tokenizer.from_file(str(graft_ckpt / "tokenizer.json"))
    assert tok.token_to_id("<|im_end|>") == cfg["eos_token_id"] == 2  # SmolLM2's trained ChatML token
    assert tok.token_to_id("<|image_pad|>") == cfg["image_token_id"] >= 49152
    assert "lm_head.weight" not in json.loads((graft_ckpt / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (graft_ckpt / "model.safetensors").read_bytes()[:8], "little")])


def test_graft_cli_refuses_a_missing_gguf_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--gguf", str(tmp_path / "none.gguf")]) == 2
    err = capsys.readouterr().err
    assert "none.gguf" in err and err.count("\n") == 1
