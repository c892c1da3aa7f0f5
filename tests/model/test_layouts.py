"""Checkpoints laid out as released: flat (transformers 4) and nested (transformers 5) configs, bf16 shards with
an index, tied (3B) and untied (7B) heads, real vocabulary sizes and special-token ids, the Instruct generation
config, the released config values."""

from __future__ import annotations

import json

import pytest

from retrv.model.config import parse_hf_config, read_config
from retrv.model.tiny import nested_config, tiny_config, write_tiny_checkpoint
from retrv.model.tiny_tokenizer import build_real_ids_tokenizer


@pytest.mark.parametrize("preset,want", [
    ("3b", dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True)),
    ("7b", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)),
])
@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_released_config_values_parse_in_both_layouts(preset, want, layout):
    config, _, ids = tiny_config(preset)
    cfg = parse_hf_config(nested_config(config) if layout == "nested" else config)
    assert {k: getattr(cfg.text, k) for k in want} == want
    assert cfg.text.rope_theta == 1e6 and list(cfg.text.mrope_section) == [16, 24, 24] and cfg.text.head_dim == 128
    v = cfg.vision
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.window_size) == (32, 1280, 3420, 16, 112)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31] and v.out_hidden_size == want["hidden_size"]
    assert cfg.tokens.image_token_id == ids["<|image_pad|>"] == 151655
    assert cfg.tokens.vision_start_token_id == 151652


def test_real_ids_tokenizer_has_the_released_ids_and_splits_the_tags():
    tok, ids = build_real_ids_tokenizer()
    assert ids["<|endoftext|>"] == 151643 and ids["<|im_end|>"] == 151645 and ids["<|file_sep|>"] == 151664
    assert ids["<tool_call>"] == 151657 and ids["<inspection-index-start>"] == 151665
    added = tok.get_added_tokens_decoder()
    assert added[151657].special is False  # <tool_call>: decoded with the text, as in Qwen2.5
    assert tok.decode(tok.encode("<tool_call>x</tool_call>").ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"
    for tag in ("<think>", "</answer>"):
        assert len(tok.encode(tag).ids) > 1 and tok.token_to_id(tag) is None
    assert max(tok.encode("<think>a dog</think><answer>1</answer>").ids) < 151643


def test_bf16_shards_with_an_index_load_and_name_their_shards(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", dtype="bfloat16", shards=3)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (ckpt / "model.safetensors").exists()
    assert read_config(ckpt).text.hidden_size == 64


@pytest.mark.parametrize("layout", [
    # 7B's: flat config, bf16 shards with an index, untied head, vocab 152064, Instruct generation config
    dict(layout="flat", dtype="bfloat16", shards=2, vocab_size=152064, tie_word_embeddings=False),
    # 3B's: tied head, vocab 151936; written in transformers 5's nested layout
    dict(layout="nested", dtype="bfloat16", shards=1, vocab_size=151936, tie_word_embeddings=True),
], ids=["7b-flat-sharded-untied", "3b-nested-tied"])
@pytest.mark.slow  # two exports with --verify at vocab 152k: ~100 s each on 2 shared cores
def test_released_layout_with_instruct_config_exports_and_verifies_against_transformers(layout, tmp_path):
    pytest.importorskip("transformers")
    from retrv.export.pack_export import export_pack
    from retrv.runtime.pack import Pack

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=7, generation="instruct", **layout)
    pack = Pack.open(export_pack(ckpt, tmp_path / "pack", verify=True))  # text and two images, vs transformers
    report = pack.manifest.validation["generation"]
    assert set(report) == {"text", "two_images"} and all(r["matches_transformers"] for r in report.values())
    assert pack.model_config.text.vocab_size == layout["vocab_size"]
    assert pack.model_config.tokens.eos_token_ids == (151645, 151643)
    assert pack.manifest.extra["checkpoint_generation_config"]["repetition_penalty"] == 1.05
