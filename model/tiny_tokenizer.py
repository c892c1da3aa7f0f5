"""A tiny tokenizer that behaves like Qwen2.5-VL's, for test checkpoints built without a download.

Same pipeline as Qwen2's `tokenizer.json` (NFC normalizer, the Qwen2 split regex, byte-level BPE, byte-level
decoder), a few hundred merges learned from a built-in English corpus, and Qwen2.5-VL's added tokens after the
learned vocabulary, in Qwen's order. Only the ids differ from the real tokenizer (real: `<|endoftext|>` = 151643),
so nothing may hard-code an id: read it from the returned map or from the tokenizer.

Imports `tokenizers` only (no torch, no transformers), so the runtime's tests can use it as well.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# Copied from transformers/models/qwen2/tokenization_qwen2.py (PRETOKENIZE_REGEX); transformers rebuilds the
# pipeline from this pattern when it loads a Qwen2Tokenizer, so the file and the runtime must use the same one.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# Qwen2.5-VL's special added tokens, in the order of its tokenizer_config.json (151643 ... 151656).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Non-special added tokens Qwen2.5 has for tool calls (151657, 151658). The real tokenizer also has the FIM and
# repo tokens (151659 ... 151664); nothing here uses them, so they are left out.
QWEN_TOOL_TOKENS = ("<tool_call>", "</tool_call>")
# The reranker's output tags as single added (non-special) tokens. This is a convenience of the tiny tokenizer
# only: real Qwen2.5-VL checkpoints tokenize `<think>` etc. as several ordinary BPE tokens, so the runtime must
# match these tags on decoded text, never assume that each is one token id.
REASONING_TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
DEFAULT_EXTRA_SPECIAL = ("<inspection-index-start>", "<inspection-index-end>")
# The rest of the real tokenizer's added tokens (151659 ... 164), needed only when ids are laid out as released.
QWEN_FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# Real Qwen2.5 tokenizers: 151643 learned ids, then the added tokens from <|endoftext|> = 151643 to 151664.
QWEN_LEARNED_VOCAB = 151643

BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from one symbol per byte, so any text round-trips

# Fixed training text: the merges (and so the tokenizer.json bytes) depend only on this string. It covers the
# words the reranker prompts use so that test prompts tokenize into a realistic number of tokens.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
You are a helpful assistant. Given a query image and a text instruction, find the candidate that best matches.
The query shows a red car parked on a street next to a tall building. Retrieve an image of the same car in blue.
Candidate 1: a dog running on the beach. Candidate 2: a cat sleeping on a sofa. Candidate 3: two people walking.
Think step by step. First imagine the ideal result, then quickly eliminate the clear negatives, then inspect the
hard candidates in detail, and finally give the index of the best candidate as the answer.
Select the images that need a closer look, crop the region of interest and zoom in on the details.
The man is wearing a white shirt and black shoes. The woman holds an umbrella in the rain.
Which of the following images contains a bird sitting on a branch? There are three birds in the sky.
Rank the candidates from the most relevant to the least relevant and return the ranked list of indices.
In 2025 the model was trained on 10000 hard samples with a learning rate of 0.000001 and a batch size of 8.
Retrieval, reranking, reasoning, inspection, compression, embedding, attention, vision, language, image, text.
It's a sunny day; they're at the park, we've got time, I'm sure you'll like it, and she'd agree.
"Hello, world!" (said the program) -- numbers: 0 1 2 3 4 5 6 7 8 9, symbols: + - * / = < > [ ] { } # @ & %.
The kitchen has a wooden table, four chairs, a window, and a plant near the door.
A small boat sails across the lake at sunset while children play football on the grass.
"""


def _qwen2_pipeline(tokenizer: Tokenizer) -> None:
    """Set the normalizer, pre-tokenizer, post-processor and decoder exactly as Qwen2's tokenizer.json has them."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


def _added_token_specs(extra_special: tuple[str, ...]) -> list[tuple[str, bool]]:
    """(content, special) for every added token, in id order."""
    specs = [(t, True) for t in QWEN_SPECIAL_TOKENS]
    specs += [(t, False) for t in QWEN_TOOL_TOKENS]
    specs += [(t, False) for t in REASONING_TAG_TOKENS]
    specs += [(t, True) for t in extra_special]
    names = [name for name, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"extra_special: got {list(extra_special)}; it repeats existing added tokens {duplicates}")
    return specs


def build_tiny_tokenizer(
    vocab_size: int = 512, extra_special: tuple = DEFAULT_EXTRA_SPECIAL
) -> tuple[Tokenizer, dict[str, int]]:
    """Train the tiny byte-level BPE tokenizer and add Qwen2.5-VL's tokens after its vocabulary.

    Every id is < `vocab_size` (the embedding table of the tiny model has `vocab_size` rows). Returns the tokenizer
    and the name -> id map of all added tokens. Deterministic: the same arguments give the same tokenizer.json.
    """
    extra_special = tuple(str(t) for t in extra_special)
    specs = _added_token_specs(extra_special)
    learned_size = vocab_size - len(specs)
    if learned_size < BYTE_ALPHABET_SIZE:
        raise ValueError(
            f"vocab_size: got {vocab_size}; expected at least {BYTE_ALPHABET_SIZE + len(specs)} "
            f"({BYTE_ALPHABET_SIZE} byte symbols + {len(specs)} added tokens)"
        )

    tokenizer = Tokenizer(
        BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    _qwen2_pipeline(tokenizer)
    trainer = BpeTrainer(
        vocab_size=learned_size,
        min_frequency=2,  # a pair seen once would only memorise the corpus
        show_progress=False,
        special_tokens=[],  # added afterwards, so that they follow the learned vocabulary as in Qwen
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)

    # normalized=False for all, as in Qwen's tokenizer.json: added tokens match the raw text.
    for content, special in specs:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    ids = {content: tokenizer.token_to_id(content) for content, _ in specs}
    if max(ids.values()) >= vocab_size:  # cannot happen unless tokenizers changes how it numbers added tokens
        raise ValueError(f"vocab_size: got {vocab_size}; the added tokens reach id {max(ids.values())}")
    return tokenizer, ids


def build_real_ids_tokenizer(extra_special: tuple = DEFAULT_EXTRA_SPECIAL) -> tuple[Tokenizer, dict[str, int]]:
    """The tiny tokenizer laid out with the released ids: the learned BPE vocabulary padded with never-merged
    filler entries to 151,643 ids, then Qwen2.5's added tokens at their real ids (`<|endoftext|>` 151643 ...
    `<|file_sep|>` 151664, `<tool_call>` 151657 non-special), then `extra_special` (151665 ...). `<think>` and
    `<answer>` are NOT added tokens here, as in the real tokenizer: each encodes to several BPE tokens.

    A filler is printable ASCII (a valid byte-level string) no merge produces, so encoding never emits one; a
    random model may generate one, and it decodes to its own text (`~f123~`)."""
    base, _ = build_tiny_tokenizer(vocab_size=BYTE_ALPHABET_SIZE + 256 + len(_added_token_specs(())),
                                   extra_special=())
    data = json.loads(base.to_str())
    learned = {tok: i for tok, i in data["model"]["vocab"].items() if i < QWEN_LEARNED_VOCAB}
    learned = {tok: i for tok, i in learned.items() if tok not in {a["content"] for a in data["added_tokens"]}}
    vocab = dict(learned)
    for i in range(len(learned), QWEN_LEARNED_VOCAB):
        vocab[f"~f{i}~"] = i
    data["model"]["vocab"] = vocab
    data["added_tokens"] = []
    tokenizer = Tokenizer.from_str(json.dumps(data))
    specs = [(t, True) for t in QWEN_SPECIAL_TOKENS] + [(t, False) for t in QWEN_TOOL_TOKENS]
    specs += [(t, False) for t in QWEN_FIM_TOKENS] + [(str(t), True) for t in extra_special]
    for content, special in specs:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    ids = {content: tokenizer.token_to_id(content) for content, _ in specs}
    if ids["<|endoftext|>"] != QWEN_LEARNED_VOCAB or ids["<|file_sep|>"] != 151664:
        raise ValueError(f"real-ids tokenizer: <|endoftext|> got id {ids['<|endoftext|>']}; expected 151643")
    return tokenizer, ids


# Qwen2.5-VL-7B-Instruct's chat template (chat_template.json; tokenizer_config.json has the same string).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(out_dir, tokenizer: Tokenizer, special_ids: dict[str, int]) -> None:
    """Write tokenizer.json, tokenizer_config.json, chat_template.json and special_tokens_map.json to `out_dir`.

    The config mirrors Qwen2.5-VL-7B-Instruct's (class `Qwen2Tokenizer`, eos `<|im_end|>`, pad `<|endoftext|>`,
    no bos). transformers 5's `Qwen2Tokenizer` does not load tokenizer.json as is: it takes the vocab and merges
    from it, rebuilds the Qwen2 pipeline itself and adds the tokens of `added_tokens_decoder`; the file written
    here has that same pipeline, so transformers and `retrv.runtime.inputs.prompt` (which loads tokenizer.json directly)
    produce the same ids. The chat template goes in tokenizer_config.json (read by `AutoTokenizer`) and in
    chat_template.json (the legacy processor file the real checkpoint ships, still read by the processor).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # tokenizers writes tokenizer.json with its own stable key order; pretty=True as the hub files are.
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)

    added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
    added_tokens_decoder = {
        str(i): {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
        for i, tok in sorted(added.items())
        if tok.content in special_ids
    }
    # As in Qwen's file: every special added token except <|endoftext|> (which is pad/unk), in id order.
    by_id = sorted(special_ids.items(), key=lambda kv: kv[1])
    additional = [name for name, i in by_id if added[i].special and name != "<|endoftext|>"]
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": additional,
        "bos_token": None,
        "chat_template": QWEN2_5_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2_5_VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_5_VL_CHAT_TEMPLATE})
    _write_json(
        out / "special_tokens_map.json",
        {"additional_special_tokens": additional, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    )


def write_preprocessor_config(out_dir, min_pixels: int = 3136, max_pixels: int = 12845056) -> None:
    """Write Qwen2.5-VL's preprocessor_config.json to `out_dir`, with the same keys as the 7B-Instruct file.

    Defaults are that file's values (3136 = 56*56, 12845056 = 14*14*4*16384); tests pass a small `max_pixels`
    to keep images cheap.

    Without torchvision (transformers 5.23): `AutoImageProcessor.from_pretrained` needs nothing special, since
    for `image_processor_type` "Qwen2VLImageProcessor" it picks the PIL backend, `Qwen2VLImageProcessorPil`, by
    itself (no `use_fast` flag involved). `AutoProcessor.from_pretrained` however cannot load a
    `Qwen2_5_VLProcessor` at all: the processor always loads its video processor, `Qwen2VLVideoProcessor`, which
    requires torchvision, and passing `video_processor=None` to the constructor fails its class check because
    `VideoProcessorMixin` is not exported without torchvision. No config avoids this: every video processor
    transformers 5.23 ships is torchvision-only. Tests
    that need the processor build it from `AutoImageProcessor` and `AutoTokenizer` with `video_processor=None`
    and that one check skipped (see tests/runtime/test_prompt.py), or use `AutoProcessor` when torchvision is
    installed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "image_mean": [0.48145466, 0.4578275, 0.40821073],  # OpenAI CLIP
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "max_pixels": int(max_pixels),
        "merge_size": 2,
        "min_pixels": int(min_pixels),
        "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor",
        "temporal_patch_size": 2,
    }
    _write_json(out / "preprocessor_config.json", config)
