"""The one decode session: feeding, choosing, accounting, recording."""

from __future__ import annotations

import numpy as np
import pytest

from retrv.model.config import parse_hf_config
from retrv.model.tiny import VOCAB_SIZE, tiny_config
from retrv.model.tiny_tokenizer import build_tiny_tokenizer
from retrv.runtime.decode import DecodeSession, Picker
from retrv.runtime.errors import InputError
from retrv.runtime.inputs.prompt import PromptTokenizer
from retrv.runtime.rerank.budget import WindowAllowance
from retrv.runtime.rerank.prompt import Piece, PromptBuilder

H = 16


class Recorder:
    """A backend that keeps every step's inputs and returns logits favouring `favourite`."""

    def __init__(self, favourite: int) -> None:
        self.steps, self.favourite = [], favourite

    def start(self, batch):
        return {"len": 0}

    def step(self, state, embeds, pos, mask):
        self.steps.append((embeds, pos, mask))
        logits = np.zeros((1, VOCAB_SIZE), np.float32)
        logits[0, self.favourite] = 1.0
        return logits


@pytest.fixture(scope="module")
def builder():
    tok_raw, _ = build_tiny_tokenizer(VOCAB_SIZE)
    config, retrv, _ = tiny_config("tiny", icm=True)
    table = np.random.default_rng(0).standard_normal((VOCAB_SIZE, H)).astype(np.float32)
    return PromptBuilder(PromptTokenizer.from_tokenizer(tok_raw), parse_hf_config(config, retrv), table)


def test_a_single_token_is_fed_as_its_piece_would_be(builder):
    a, b = Recorder(5), Recorder(5)
    sa, sb = DecodeSession(a, builder, record=True), DecodeSession(b, builder, record=True)
    prompt = [builder.text("hello there")]
    sa.feed(prompt)
    sb.feed(prompt)
    sa.feed([Piece([42])])
    sb.feed_token(42)
    (ia, ea, pa), (ib, eb, pb) = sa.chunks[-1], sb.chunks[-1]
    assert ia == ib == [42] and pa.dtype == pb.dtype and pa.shape == pb.shape
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(ea, eb)
    assert sa.next_pos == sb.next_pos == len(prompt[0].ids) + 1
    assert sb.transcript == prompt[0].ids + [42] and sb.fed == len(prompt[0].ids) + 1


def test_choice_accounting_and_the_answer_reader(builder):
    backend = Recorder(7)
    allow = WindowAllowance(think=10, inspect=0, tool=0, token=4)
    s = DecodeSession(backend, builder, allowance=allow, record=True)
    s.feed([Piece([1, 2])])
    assert s.choose() == 7 and s.choose_among([3, 9]) == 3
    s.taken(7)
    assert s.actions == [(2, 7)]
    s.clear_transcript()
    written = s.read_until("</answer>", set(), 10, builder.tok.decode)
    # 2 tokens left: two are fed, the third is chosen with no room left and only noted
    assert written == [7, 7, 7] and allow.spent.token == 4 and s.transcript == [7, 7, 7]
    with pytest.raises(AssertionError):
        s.feed_token(7)  # past the allowance: a bug, never a silent overrun


def test_sampling_is_seeded_and_negative_temperature_is_refused():
    logits = np.linspace(0, 1, 50)
    draws = lambda: [Picker(1.0, seed=3)(logits) for _ in range(3)]  # noqa: E731
    assert draws() == draws()
    assert Picker()(logits) == 49
    with pytest.raises(InputError, match="temperature"):
        Picker(-1.0)
