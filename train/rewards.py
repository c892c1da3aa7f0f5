"""Retrv-R1's GRPO reward and curriculum, as pure functions.

    r = r_f + 1(answer == gold) * (1 - lambda_i * N_ins / K),    lambda_i = i / N_iter

`r_f` is the format reward (1 for well-formed reasoning, 0 otherwise), `N_ins` the inspections honoured, `K` the
candidates in the window. The inspection penalty grows from 0 to full over training, so the policy first learns
to be right (inspecting freely) and then to be right cheaply; PAPERS.md records that a fixed lambda = 0.5 scored
1.3 R@5 lower.
"""

from __future__ import annotations

import re

from retrv.runtime.rerank.answer import parse_index

_START, _END = "<inspection-index-start>", "<inspection-index-end>"
# Free reasoning text, any number of inspections (each an index between the markers, free text after it), then
# the closed think block and one answer. Free text may not contain tags: a stray tag is a malformed trace.
_FREE = r"[^<]*"
_WELL_FORMED = re.compile(
    rf"^{_FREE}(?:{re.escape(_START)}([^<]*){re.escape(_END)}{_FREE})*</think>\s*<answer>([^<]*)</answer>\s*$", re.S)
_INSPECTIONS = re.compile(rf"{re.escape(_START)}([^<]*){re.escape(_END)}")


def format_reward(text: str) -> float:
    """1.0 when `text` (the model's own tokens of one window, decoded) is `reasoning [inspections] </think>
    <answer>i</answer>` with every inspection index and the answer parsable by the runtime; else 0.0."""
    m = _WELL_FORMED.match(text)
    if not m or parse_index(m.group(2)) is None:
        return 0.0
    if any(parse_index(s) is None for s in _INSPECTIONS.findall(text)):
        return 0.0
    return 1.0


def curriculum(i: int, n_iter: int) -> float:
    """lambda_i = i / N_iter: 0 at the first iteration, 1 at the last."""
    if n_iter < 1 or not 0 <= i <= n_iter:
        raise ValueError(f"curriculum: got i={i}, n_iter={n_iter}; expected 0 <= i <= n_iter and n_iter >= 1")
    return i / n_iter


def retrv_reward(format_score: float, correct: bool, n_inspected: int, k: int, lam: float) -> float:
    """r = r_f + 1(correct) * (1 - lam * N_ins / K)."""
    if k < 1 or n_inspected < 0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"retrv_reward: got k={k}, n_inspected={n_inspected}, lam={lam}; expected k >= 1, "
                         "n_inspected >= 0 and 0 <= lam <= 1")
    return format_score + (1.0 - lam * n_inspected / k if correct else 0.0)
