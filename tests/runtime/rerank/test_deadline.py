"""The deadline planner (runtime/rerank/deadline.py): milliseconds -> a token budget, from two measured rates."""

from __future__ import annotations

import pytest

from retrv.runtime.errors import InputError
from retrv.runtime.rerank.budget import Budget
from retrv.runtime.rerank.deadline import ANSWER_TOKENS, SAFETY, DeadlinePlanner, Timing, check_deadline


def _planner(prompt: int = 200) -> DeadlinePlanner:
    p = DeadlinePlanner(ms_per_prefill_token=0.5, ms_per_decode_token=10.0)
    p.observe(Timing(prefill_ms=100.0, prefill_tokens=200, decode_ms=500.0, decode_tokens=50, needed_tokens=prompt,
                     overhead_ms=20.0))
    return p


def test_no_deadline_is_the_base_budget():
    base = Budget(think=64)
    assert _planner().plan(None, 5.0, base) == (base, {"deadline_ms": None})


def test_the_budget_is_the_prompt_plus_what_decoding_fits_in_the_rest():
    p = _planner()
    budget, plan = p.plan(1000.0, elapsed_ms=80.0, base=Budget(think=64))
    left = (1000 - 80 - 20) * SAFETY
    spare = left - 200 * 0.5 - ANSWER_TOKENS * 10
    assert plan["prompt_fits"] and plan["left_ms"] == pytest.approx(left)
    assert budget.token == int(200 + spare / 10) and budget.think == 64  # only the token budget is set
    later, _ = p.plan(1000.0, elapsed_ms=500.0)  # queue wait spent: less left, fewer tokens
    assert later.token < budget.token
    capped, _ = p.plan(1000.0, elapsed_ms=80.0, base=Budget(token=50))
    assert capped.token == 50  # a caller's own token budget is a ceiling


def test_a_deadline_too_short_for_the_prompts_says_so():
    budget, plan = _planner(prompt=2000).plan(600.0, elapsed_ms=10.0)
    assert not plan["prompt_fits"] and budget.token == 1
    _, first = DeadlinePlanner(0.5, 10.0).plan(600.0, 10.0)  # nothing learnt yet: the prompt is not known
    assert first["prompt_fits"] and first["prompt_tokens"] == 0


def test_a_noisy_decode_rate_is_planned_high_and_skipped_reranks_teach_nothing():
    p = _planner()
    steady, _ = p.plan(2000.0, 0.0)
    p.observe(Timing(100.0, 200, 2000.0, 50, 200))  # one slow spell: 40 ms/token
    noisy, plan = p.plan(2000.0, 0.0)
    assert noisy.token < steady.token and plan["ms_per_token"] > p.decode.mean
    before = p.prompt["rerank"].mean
    p.observe(Timing(0.0, 0, 0.0, 0, 0))  # a rerank that did not run
    assert p.prompt["rerank"].mean == before


def test_deadlines_and_rates_are_checked():
    assert check_deadline(None) is None and check_deadline(250) == 250.0
    for bad in (0, -1, float("nan"), float("inf"), True, "10", 3_600_001):
        with pytest.raises(InputError, match="deadline_ms: got .*; expected milliseconds in"):
            check_deadline(bad)
    with pytest.raises(InputError, match="ms_per_decode_token: got 0; expected a positive number"):
        DeadlinePlanner(0.5, 0)
