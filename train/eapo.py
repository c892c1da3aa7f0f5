"""V-Retrver's EAPO reward (PAPERS.md): R = 0.2 r_format + 0.8 r_rank + r_tool.

- r_format = 1/2 [think and answer tags well formed] + 1/2 [the answer is a list of integers];
- r_rank = exp(-(k - 1)^2 / 2) when the gold candidate is at rank k <= 5 of the answer list, else 0;
- r_tool = 0.2 * 1[k = 1] * 1[N_tool > 0] - 0.1 * max(0, N_tool - 1): a tool call that led to the right first
  place is rewarded once, every call beyond the first costs.

The paper's constants; the released code's reward differs (PAPERS.md), and this follows the paper. Pure Python.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

W_FORMAT, W_RANK = 0.2, 0.8
TOOL_BONUS, TOOL_COST = 0.2, 0.1
RANK_CUTOFF = 5

_TAGS = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*(?:.*?)<answer>(.*?)</answer>\s*$", re.DOTALL)
_LIST = re.compile(r"^\s*\[\s*\d+(?:\s*,\s*\d+)*\s*\]\s*$")


@dataclass(frozen=True)
class EapoReward:
    format: float
    rank: float
    tool: float
    gold_rank: int | None

    @property
    def total(self) -> float:
        return W_FORMAT * self.format + W_RANK * self.rank + self.tool


def format_reward(response: str) -> float:
    m = _TAGS.match(response)
    tags = 0.5 if m else 0.0
    answer = m.group(1) if m else _last_answer(response)
    return tags + (0.5 if answer is not None and _LIST.match(answer) else 0.0)


def _last_answer(response: str) -> str | None:
    found = re.findall(r"<answer>(.*?)</answer>", response, re.DOTALL)
    return found[-1] if found else None


def gold_rank(response: str, gold: int) -> int | None:
    """1-based rank of `gold` (a 1-based candidate index) in the answer list, or None."""
    answer = _last_answer(response)
    if answer is None or not _LIST.match(answer):
        return None
    items = [int(x) for x in answer.strip()[1:-1].split(",")]
    return items.index(gold) + 1 if gold in items else None


def rank_reward(k: int | None) -> float:
    return math.exp(-((k - 1) ** 2) / 2) if k is not None and k <= RANK_CUTOFF else 0.0


def tool_reward(k: int | None, n_tool: int) -> float:
    return TOOL_BONUS * (k == 1) * (n_tool > 0) - TOOL_COST * max(0, n_tool - 1)


def eapo_reward(response: str, gold: int, n_tool: int) -> EapoReward:
    if n_tool < 0:
        raise ValueError(f"n_tool: got {n_tool}; expected >= 0")
    k = gold_rank(response, gold)
    return EapoReward(format=format_reward(response), rank=rank_reward(k), tool=tool_reward(k, n_tool), gold_rank=k)
