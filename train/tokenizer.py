"""A 512-id tokenizer whose merges are learned on the reranker's own prompts and the synthetic captions.

Same pipeline, added tokens and order as `retrv.model.tiny_tokenizer` (Qwen2's byte-level BPE, Qwen2.5-VL's special
tokens after the learned vocabulary, `<think>`, `<answer>`, the inspection markers as single tokens); only the
training text differs. The tiny tokenizer's merges come from a fixed English paragraph, so "yellow" is 4 tokens and
the rerank instruction 76: every prompt, query and reasoning step would cost two to three times the tokens it
needs, and tokens are what the runtime pays per query (and what training pays per step). Byte-level BPE still
encodes any text, so real captions (Flickr8k) tokenize, only into more pieces.

Deterministic: the same texts give the same tokenizer.json.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from retrv.model.tiny_tokenizer import (
    _CORPUS,
    BYTE_ALPHABET_SIZE,
    DEFAULT_EXTRA_SPECIAL,
    _added_token_specs,
    _qwen2_pipeline,
)
from retrv.runtime.inputs.embedding import EmbedTemplate
from retrv.runtime.inputs.prompt import ChatTemplate
from retrv.runtime.rerank.prompt import RerankTemplate

VOCAB_SIZE = 512  # fits the 22 added tokens, the 256 byte symbols and ~230 merges; a 512-row table is 64 K params
TEMPLATE_WEIGHT = 300  # template text occurs in every prompt: weight it so it merges into whole words


def template_texts() -> list[str]:
    """Every fixed string the runtime's rerank and embedding prompts are made of."""
    t, e, chat = RerankTemplate(), EmbedTemplate(), ChatTemplate()
    return [chat.turn("system", t.system) + chat.open_turn("user"), t.query_prefix, t.candidates_header,
            t.instruction, t.inspected_prefix.format(i=3), t.marker_inspect_budget, t.marker_repeat.format(i=2),
            t.instruction + chat.handover("assistant") + t.think_open, "\n" + e.query_instruction,
            "\n" + e.candidate_instruction, chat.handover("assistant")] + \
        [t.candidate_label.format(i=i) for i in range(1, 21)]


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> tuple[Tokenizer, dict[str, int]]:
    """Train byte-level BPE on `texts` plus the prompt templates; -> (tokenizer, added-token name -> id)."""
    specs = _added_token_specs(DEFAULT_EXTRA_SPECIAL)
    learned = vocab_size - len(specs)
    if learned < BYTE_ALPHABET_SIZE:
        raise ValueError(f"vocab_size: got {vocab_size}; expected at least {BYTE_ALPHABET_SIZE + len(specs)}")
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        byte_fallback=False))
    _qwen2_pipeline(tok)
    trainer = BpeTrainer(vocab_size=learned, min_frequency=2, show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = list(texts) + template_texts() * TEMPLATE_WEIGHT + _CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(corpus, trainer=trainer)
    for content, special in specs:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    ids = {content: tok.token_to_id(content) for content, _ in specs}
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"vocab_size: got {vocab_size}; the added tokens reach id {max(ids.values())}")
    return tok, ids
