"""The context bound's pieces: caps on budgets, which limit a window runs out of, the text and token checks."""

from __future__ import annotations

import pytest

from retrv.runtime.rerank.budget import Budget, Ledger, fit_budget
from retrv.runtime.errors import InputError
from retrv.runtime.limits import MAX_CHARS_PER_TOKEN, Cap, check_text, check_tokens


def test_budgets_past_the_windows_contexts_are_capped_and_named():
    budget, caps = fit_budget(Budget(think=10**12, inspect=10**9, tool=2, token=None), 100, [4, 4, 3])
    assert budget == Budget(think=300, inspect=11, tool=2, token=None)
    assert caps == {"think": Cap(10**12, 300, "context 100 tokens x 3 windows"),
                    "inspect": Cap(10**9, 11, "one inspection per candidate per window: 11 in all")}
    same, none = fit_budget(Budget(), 32768, [20])
    assert same == Budget() and none == {}


def test_a_window_says_which_limit_it_ran_out_of():
    allow = Ledger(Budget(token=50), 1, context=40).next_window()
    assert allow.blocked(30, reserve=10) is None
    assert allow.blocked(31, reserve=10) == "context"  # the context (40) binds before the token budget (50)
    allow = Ledger(Budget(token=30), 1, context=40).next_window()
    assert allow.blocked(31) == "token"
    assert Ledger(Budget(), 1).next_window().blocked(10**12) is None  # no context given: unbounded as before


def test_text_and_token_checks_name_the_length_and_the_limit():
    check_text("prompt", "x" * (10 * MAX_CHARS_PER_TOKEN), 10)
    check_text("prompt", None, 10)
    with pytest.raises(InputError, match=r"query text: got 321 characters; expected at most 320 \(the model's "
                                         r"context of 10 tokens x 32 characters per token\)"):
        check_text("query text", "x" * 321, 10)
    check_tokens("prompt", 9, 10, room=1)
    with pytest.raises(InputError, match=r"prompt: got 10 tokens; expected at most 9 \(the model's context is 10 "
                                         r"tokens, max_position_embeddings, leaving 1 for one generated token\)"):
        check_tokens("prompt", 10, 10, room=1, why="one generated token")
