"""The tiny Qwen2.5-VL-like tokenizer: deterministic, round-trips English, one id per added token, loads in HF."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from retrv.model import tiny_tokenizer
from retrv.model.tiny_tokenizer import (
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    QWEN_TOOL_TOKENS,
    REASONING_TAG_TOKENS,
    build_tiny_tokenizer,
    write_preprocessor_config,
    write_tokenizer_files,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Find the image that shows the same red car, but in blue. Candidate 12 looks closest!",
    "  leading spaces,\ttabs\nand\r\nnewlines\n\n",
    "Numbers 3.14159 and 2025-01-01; quotes \"x\" 'y' it's we'll",
    "Unicode: café, naïve, 東京, emoji 🙂",  # bytes never seen in training still round-trip
]


@pytest.fixture(scope="module")
def built():
    return build_tiny_tokenizer()


def test_two_builds_write_identical_files(tmp_path):
    for name in ("a", "b"):
        tok, ids = build_tiny_tokenizer()
        write_tokenizer_files(tmp_path / name, tok, ids)
        write_preprocessor_config(tmp_path / name, max_pixels=64 * 28 * 28)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "tokenizer.json" in names
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_build_is_deterministic_across_processes(built):
    # Hash seeds and thread pools differ between processes; the trained merges must not.
    code = "from retrv.model.tiny_tokenizer import build_tiny_tokenizer; print(build_tiny_tokenizer()[0].to_str())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == built[0].to_str()


@pytest.mark.parametrize("text", TEXTS)
def test_english_round_trips(built, text):
    tok, _ = built
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_bpe_learned_merges(built):
    tok, _ = built
    text = "the candidate image"
    assert len(tok.encode(text).ids) < len(text.encode()) // 2


def test_added_tokens_are_single_ids_after_the_vocab(built):
    tok, ids = built
    inspection = ["<inspection-index-start>", "<inspection-index-end>"]
    expected = [*QWEN_SPECIAL_TOKENS, *QWEN_TOOL_TOKENS, *REASONING_TAG_TOKENS, *inspection]
    assert list(ids) == expected
    learned = tok.get_vocab_size(with_added_tokens=False)
    assert sorted(ids.values()) == list(range(learned, learned + len(expected)))  # in order, right after the vocab
    assert max(ids.values()) < 512
    for name, i in ids.items():
        assert tok.encode(name, add_special_tokens=False).ids == [i], name
        assert tok.encode(f"a{name}b", add_special_tokens=False).ids.count(i) == 1, name
    decoder = tok.get_added_tokens_decoder()
    special = {decoder[i].content for i in ids.values() if decoder[i].special}
    assert special == {*QWEN_SPECIAL_TOKENS, *inspection}


def test_custom_extra_special_and_vocab_size_check():
    tok, ids = build_tiny_tokenizer(vocab_size=1024, extra_special=("<x-tok>",))
    assert "<x-tok>" in ids and "<inspection-index-start>" not in ids
    assert tok.encode("<x-tok>", add_special_tokens=False).ids == [ids["<x-tok>"]]
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(vocab_size=270)
    with pytest.raises(ValueError, match="extra_special"):
        build_tiny_tokenizer(extra_special=("<think>",))


def test_module_imports_neither_torch_nor_transformers():
    # Load the file on its own in an interpreter that refuses torch and transformers: the retrv.model package
    # __init__ may import torch, this module must not (the runtime's tests use it).
    code = (
        "import importlib.util, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"spec = importlib.util.spec_from_file_location('tiny_tokenizer', {tiny_tokenizer.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "mod.build_tiny_tokenizer()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_transformers_loads_the_files(tmp_path, built):
    transformers = pytest.importorskip("transformers")
    tok, ids = built
    write_tokenizer_files(tmp_path, tok, ids)
    write_preprocessor_config(tmp_path, min_pixels=56 * 56, max_pixels=64 * 28 * 28)
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert tiny_tokenizer.QWEN2_PRETOKENIZE_REGEX == PRETOKENIZE_REGEX
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ == "Qwen2Tokenizer"
    assert hf.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    for name, i in ids.items():
        assert hf.convert_tokens_to_ids(name) == i, name
    text = TEXTS[1] + " <tool_call>{}</tool_call> <inspection-index-start>3<inspection-index-end> <think>x</think>"
    assert hf(text)["input_ids"] == tok.encode(text).ids
    assert hf.decode(hf(TEXTS[0])["input_ids"]) == TEXTS[0]

    image_processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert (image_processor.patch_size, image_processor.temporal_patch_size, image_processor.merge_size) == (14, 2, 2)
    assert image_processor.size["longest_edge"] == 64 * 28 * 28
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["processor_class"] == "Qwen2_5_VLProcessor"
