"""EAPO reward values worked by hand from the paper's formula."""

import math

import pytest

from retrv.train.eapo import eapo_reward, format_reward, gold_rank, rank_reward, tool_reward

GOOD = "<think>candidate 3 has the red strap</think><answer>[3, 1, 2, 5, 4]</answer>"


def test_gold_first_with_one_tool_call():
    r = eapo_reward(GOOD, gold=3, n_tool=1)
    assert (r.format, r.rank, r.tool, r.gold_rank) == (1.0, 1.0, 0.2, 1)
    assert r.total == pytest.approx(0.2 * 1 + 0.8 * 1 + 0.2)  # 1.2


def test_gold_second_without_tools():
    r = eapo_reward(GOOD, gold=1, n_tool=0)
    assert r.rank == pytest.approx(math.exp(-0.5)) and r.tool == 0
    assert r.total == pytest.approx(0.2 + 0.8 * 0.6065306597)  # 0.68522


def test_extra_tool_calls_cost():
    assert eapo_reward(GOOD, gold=3, n_tool=3).tool == pytest.approx(0.2 - 0.2)  # bonus once, two extra calls
    assert eapo_reward(GOOD, gold=2, n_tool=2).tool == pytest.approx(-0.1)  # no bonus: gold not first
    assert tool_reward(1, 0) == 0


def test_rank_cutoff_and_missing_gold():
    assert rank_reward(5) == pytest.approx(math.exp(-8))
    assert rank_reward(6) == 0 and rank_reward(None) == 0
    six = "<think>x</think><answer>[1, 2, 3, 4, 5, 6]</answer>"
    assert gold_rank(six, 6) == 6 and eapo_reward(six, 6, 0).total == pytest.approx(0.2)
    assert gold_rank(GOOD, 9) is None


def test_format_terms():
    assert format_reward(GOOD) == 1.0
    assert format_reward("<answer>[2, 1]</answer>") == 0.5  # a list, but no think block
    assert format_reward("<think>hm</think><answer>2</answer>") == 0.5  # tags, but not a list
    assert format_reward("the answer is 2") == 0.0
    assert format_reward("<think>a<think>b</think><answer>[1]</answer>") == 0.5  # nested think: tags not well formed
    r = eapo_reward("two, one", gold=2, n_tool=0)
    assert r.total == 0 and r.gold_rank is None


def test_negative_tool_count_is_refused():
    with pytest.raises(ValueError, match="n_tool"):
        eapo_reward(GOOD, 3, -1)
