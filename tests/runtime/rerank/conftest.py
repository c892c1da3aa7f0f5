"""Shared by the listwise (V-Retrver) rerank tests: a tiny tokenizer, a plain Qwen2.5-VL config without an ICM and
a random embedding table of width 64, built once per module that asks for `env`."""

from __future__ import annotations

import numpy as np
import pytest

from retrv.model.config import parse_hf_config
from retrv.model.tiny import VOCAB_SIZE, tiny_config
from retrv.model.tiny_tokenizer import build_tiny_tokenizer
from retrv.runtime.inputs.prompt import PromptTokenizer

H = 64  # the tiny config's hidden size


@pytest.fixture(scope="module")
def env():
    """(PromptTokenizer, special-token ids, ModelConfig, embedding table (V, H))."""
    tok_raw, ids = build_tiny_tokenizer(VOCAB_SIZE)
    tok = PromptTokenizer.from_tokenizer(tok_raw)
    cfg = parse_hf_config(tiny_config("tiny", icm=False)[0])
    table = np.random.default_rng(0).standard_normal((VOCAB_SIZE, H)).astype(np.float32)
    return tok, ids, cfg, table
