"""Chat prompts rendered by the runtime equal the input_ids of transformers' Qwen2.5-VL processor."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from retrv.model.tiny_tokenizer import build_tiny_tokenizer, write_preprocessor_config, write_tokenizer_files
from retrv.runtime.errors import CheckpointError, InputError
from retrv.runtime.inputs.prompt import ChatTemplate, PromptTokenizer, image_token_count

MAX_PIXELS = 64 * 28 * 28  # at most 64 merged tokens per image: keeps the processor fast


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_qwen_tok")
    tok, ids = build_tiny_tokenizer()
    write_tokenizer_files(out, tok, ids)
    write_preprocessor_config(out, min_pixels=56 * 56, max_pixels=MAX_PIXELS)
    return out


@pytest.fixture(scope="module")
def prompt_tok(tok_dir):
    return PromptTokenizer(tok_dir / "tokenizer.json")


def _reference_processor(path):
    """transformers' Qwen2_5_VLProcessor for `path`.

    transformers 5.23 cannot load this processor without torchvision: AutoProcessor always loads the
    torchvision-only Qwen2VLVideoProcessor, and the constructor rejects video_processor=None because its class
    check looks up VideoProcessorMixin, which is not exported without torchvision. So, without torchvision,
    build it from the PIL image processor and the tokenizer with that one check skipped for the video slot;
    everything the oracle exercises (chat template from chat_template.json, image-token expansion,
    tokenization) is transformers' own code.
    """
    transformers = pytest.importorskip("transformers")
    try:
        return transformers.AutoProcessor.from_pretrained(path)
    except ImportError as e:
        if "torchvision" not in str(e).lower():
            raise
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    processor_dict, _ = Qwen2_5_VLProcessor.get_processor_dict(str(path))  # reads chat_template.json
    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        return None if (name == "video_processor" and arg is None) else original(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        return Qwen2_5_VLProcessor(
            image_processor=transformers.AutoImageProcessor.from_pretrained(path),
            tokenizer=transformers.AutoTokenizer.from_pretrained(path),
            video_processor=None,
            chat_template=processor_dict["chat_template"],
        )
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


@pytest.fixture(scope="module")
def processor(tok_dir):
    p = _reference_processor(tok_dir)
    assert type(p).__name__ == "Qwen2_5_VLProcessor"
    return p


def _images(sizes, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _check_against_processor(processor, prompt_tok, messages, images=(), add_generation_prompt=True, **template_kw):
    text = processor.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, **template_kw
    )
    template = ChatTemplate(**template_kw)
    assert template.render(messages, add_generation_prompt) == text
    out = processor(text=text, images=list(images) or None)
    counts = []
    if images:
        merge = processor.image_processor.merge_size
        counts = [image_token_count(thw, merge) for thw in np.asarray(out["image_grid_thw"]).tolist()]
    expected = list(out["input_ids"][0])
    got = PromptTokenizer.from_tokenizer(prompt_tok._tok, template).render(messages, counts, add_generation_prompt)
    assert got == expected
    return got, counts


def test_text_only_prompt(processor, prompt_tok):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which candidate shows a red car?"}]}]
    got, _ = _check_against_processor(processor, prompt_tok, messages)
    assert got[0] == prompt_tok.token_id("<|im_start|>")


def test_plain_string_content(processor, prompt_tok):
    _check_against_processor(processor, prompt_tok, [{"role": "user", "content": "Hello there, assistant."}])


def test_two_images_of_different_sizes(processor, prompt_tok):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Query image above. Candidate 1:"},
                {"type": "image"},
                {"type": "text", "text": "Is the candidate the same car in blue?"},
            ],
        }
    ]
    got, counts = _check_against_processor(processor, prompt_tok, messages, _images([(60, 90), (140, 50)]))
    assert len(set(counts)) == 2 and got.count(prompt_tok.image_pad_id) == sum(counts)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_system_message_and_multi_turn(processor, prompt_tok, add_generation_prompt):
    messages = [
        {"role": "system", "content": "You rerank retrieval candidates."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find this dog on a beach."}]},
        {"role": "assistant", "content": "<think>Candidate 2 has a beach.</think><answer>2</answer>"},
        {"role": "user", "content": [{"type": "text", "text": "Look again at"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>[2, 1]</answer>"}]},
        {"role": "user", "content": "Thanks. One more?"},
    ]
    _check_against_processor(
        processor, prompt_tok, messages, _images([(84, 84), (30, 200)], seed=1), add_generation_prompt
    )


def test_inspection_and_tool_tokens_written_literally(processor, prompt_tok):
    text = (
        'I will check <inspection-index-start>7<inspection-index-end> then call '
        '<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2, 0.5, 0.9], "target_image": 1}}'
        "</tool_call> and <|box_start|>(1,2)<|box_end|>"
    )
    messages = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]
    got, _ = _check_against_processor(processor, prompt_tok, messages, _images([(56, 112)], seed=2))
    for name in ("<inspection-index-start>", "<inspection-index-end>", "<tool_call>", "</tool_call>"):
        assert got.count(prompt_tok.token_id(name)) == 1, name


def test_unicode_and_whitespace(processor, prompt_tok):
    # A decomposed "é" (NFC-normalized by both), CJK, an emoji and runs of whitespace around an image.
    text = "cafe\u0301 東京 🙂  \n\n  end\r\n"
    parts = [{"type": "text", "text": text}, {"type": "image"}, {"type": "text", "text": " "}]
    messages = [{"role": "user", "content": parts}]
    _check_against_processor(processor, prompt_tok, messages, _images([(56, 56)], seed=4))


def test_add_vision_id(processor, prompt_tok):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    images = _images([(56, 56), (112, 56)], seed=3)
    _check_against_processor(processor, prompt_tok, messages, images, add_vision_id=True)


# --- the runtime on its own: no transformers needed ---------------------------------------------------------


def test_encode_decode_and_token_id(prompt_tok):
    text = "A dog runs on the beach.\n<think>ok</think>"
    ids = prompt_tok.encode_text(text)
    assert prompt_tok.decode(ids) == text
    assert prompt_tok.decode(np.asarray(ids)) == text
    assert prompt_tok.decode([prompt_tok.token_id("<|im_end|>")], skip_special_tokens=True) == ""
    with pytest.raises(InputError, match="<not-a-token>"):
        prompt_tok.token_id("<not-a-token>")


def test_default_system_prompt_and_generation_prompt(prompt_tok):
    messages = [{"role": "user", "content": "hi"}]
    text = ChatTemplate().render(messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ChatTemplate(default_system=None).render(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_image_count_must_match(prompt_tok):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    assert prompt_tok.render(messages, [4]).count(prompt_tok.image_pad_id) == 4
    with pytest.raises(InputError, match="image_token_counts"):
        prompt_tok.render(messages, [])
    with pytest.raises(InputError, match="image_token_counts"):
        prompt_tok.render(messages, [4, 4])
    with pytest.raises(InputError, match="positive"):
        prompt_tok.render(messages, [0])


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "list of message dicts"),
        ([{"content": "x"}], "'role'"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": [{"type": "video"}]}], "video"),
        ([{"role": "user", "content": [{"type": "text"}]}], "'text'"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "expected a string"),
    ],
)
def test_malformed_messages_are_refused(prompt_tok, messages, match):
    with pytest.raises(InputError, match=match):
        prompt_tok.render(messages, [])


def test_image_token_count():
    assert image_token_count((1, 4, 6)) == 6
    assert image_token_count([1, 8, 4], merge_size=2) == 8
    with pytest.raises(InputError, match="image_grid_thw"):
        image_token_count((1, 3, 4))


def test_missing_or_foreign_tokenizer_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        PromptTokenizer(tmp_path / "tokenizer.json")
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    with pytest.raises(CheckpointError, match=re.escape("<|im_start|>")):
        PromptTokenizer.from_tokenizer(Tokenizer(BPE()))


def test_prompt_module_is_light():
    code = (
        "import sys, retrv.runtime.inputs.prompt\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
