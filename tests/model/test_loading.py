"""Checkpoint refusal: every bad input gets one line naming the tensor or field and what was expected."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from retrv.model import load_checkpoint, read_config
from retrv.model.tiny import write_tiny_checkpoint
from retrv.runtime.errors import CheckpointError


@pytest.fixture()
def ckpt(tmp_path):
    return write_tiny_checkpoint(tmp_path / "ckpt", icm=True, seed=3)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_loads_with_icm_and_runs(ckpt):
    model = load_checkpoint(ckpt)
    assert model.icm is not None
    assert model.cfg.tokens.inspection_start_token_id is not None
    assert not any(p.is_meta for p in model.parameters())
    cand, query = torch.randn(3, 5, model.cfg.text.hidden_size), torch.randn(4, model.cfg.text.hidden_size)
    out = model.icm(cand, torch.ones(3, 5), query, torch.ones(4))
    assert out.shape == (3, 2, model.cfg.text.hidden_size) and torch.isfinite(out).all()


def test_missing_tensor_is_named(ckpt):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert "language_model.layers.1.mlp.up_proj.weight" in _one_line(e) and "missing" in str(e.value)


def test_wrong_shape_is_named(ckpt):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    tensors["visual.blocks.0.attn.qkv.weight"] = torch.zeros(7, 7)
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    msg = _one_line(e)
    assert "visual.blocks.0.attn.qkv.weight" in msg and "(7, 7)" in msg and "expected (96, 32)" in msg


def test_wrong_icm_shape_is_named(ckpt):
    tensors = load_file(ckpt / "icm.safetensors")
    tensors["con_query"] = torch.zeros(3)
    save_file(tensors, ckpt / "icm.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert "con_query" in _one_line(e)


def test_unknown_model_type_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llava"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        read_config(ckpt)
    msg = _one_line(e)
    assert "'llava'" in msg and "qwen2_5_vl" in msg


def test_missing_config_field_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["vision_config"]["num_heads"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        read_config(ckpt)
    assert "num_heads" in _one_line(e)


def test_pickle_instead_of_safetensors_is_refused_without_unpickling(ckpt):
    (ckpt / "model.safetensors").unlink()
    # A pickle that would run code if loaded: the loader must refuse it by name and never open it.
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    msg = _one_line(e)
    assert "pytorch_model.bin" in msg and "safetensors" in msg


def test_corrupt_safetensors_is_refused(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert "model.safetensors" in _one_line(e)


def test_sharded_index_loads_like_one_file(ckpt, tmp_path):
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, ckpt / file)
    (ckpt / "model.safetensors").unlink()
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_checkpoint(ckpt)
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


def test_transformers5_names_load_too(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        elif k.startswith("visual."):
            k = "model." + k
        renamed[k] = v
    save_file(renamed, ckpt / "model.safetensors")
    model = load_checkpoint(ckpt)
    assert torch.equal(model.visual.blocks[0].attn.qkv.weight, tensors["visual.blocks.0.attn.qkv.weight"])


def test_tied_embeddings_share_the_table(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    model = load_checkpoint(ckpt)
    assert model.lm_head.weight.data_ptr() == model.language_model.embed_tokens.weight.data_ptr()


def test_loaded_in_bfloat16_keeps_the_dtype(ckpt):
    model = load_checkpoint(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
