"""Answers: parsing what the model wrote, and decoding a forced answer under a constraint.

A forced answer must be a valid candidate index whatever the model prefers, so it is decoded over a trie of the
tokenizations of "1".."n": at each step only tokens that continue some valid index are allowed (plus the closing
tag once the digits so far already form one, so "1" can still become "12"). The model's logits choose among them.
"""

from __future__ import annotations

import re

_INDEX = re.compile(r"^\s*\[?\s*(\d{1,6})\s*\]?\s*$")


def parse_index(text: str) -> int | None:
    """'3', ' 3 ', '[3]' -> 3; anything else -> None."""
    m = _INDEX.match(text)
    return int(m.group(1)) if m else None


class _Node:
    __slots__ = ("children", "index")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.index: int | None = None  # 0-based candidate index when the path spells a complete answer


class AnswerTrie:
    def __init__(self, tokenizer, n: int, close_tag: str) -> None:
        self.root = _Node()
        self.max_feed = 0
        for i in range(1, n + 1):
            ids = tokenizer.encode_text(str(i))
            node = self.root
            for t in ids:
                node = node.children.setdefault(t, _Node())
            node.index = i - 1
            self.max_feed = max(self.max_feed, len(ids))
        self.close_id = tokenizer.encode_text(close_tag)[0]

    def decode(self, session) -> int:
        """Choose a valid index with the session's logits, feeding a digit only when another decision follows it
        (the last digit is noted in the session's transcript, not fed)."""
        node = self.root
        while True:
            options = {t: child for t, child in node.children.items()}
            if node.index is not None:
                if not options:
                    return node.index
                options[self.close_id] = None
            best = session.choose_among(options)
            if best == self.close_id and node.index is not None:
                return node.index
            node = options[best]
            if node.children:
                session.feed_token(best)
            else:
                session.note([best])
                return node.index


_LIST = re.compile(r"^\s*\[([^\[\]]*)\]\s*$")


def parse_ranking(text: str, n: int) -> tuple[list[int] | None, list[str]]:
    """'[4, 1, 3]' for n candidates -> (a 0-based permutation of range(n), repairs made), or (None, [why]).

    Repaired where unambiguous: out-of-range and repeated indices are dropped (first occurrence wins), missing
    candidates are appended in window (coarse) order. A list with no valid index, or text that is not a list of
    integers, is not repaired: the caller falls back to the coarse order and flags it.
    """
    m = _LIST.match(text)
    if not m:
        return None, ["not a list"]
    items = [s.strip() for s in m.group(1).split(",") if s.strip()]
    if not items or not all(s.isdigit() for s in items):
        return None, ["not a list of integers"]
    repairs, seen, order = [], set(), []
    for s in items:
        i = int(s)
        if not 1 <= i <= n:
            repairs.append(f"dropped out-of-range {i}")
        elif i in seen:
            repairs.append(f"dropped duplicate {i}")
        else:
            seen.add(i)
            order.append(i - 1)
    if not order:
        return None, repairs + ["no valid index"]
    missing = [i for i in range(n) if i not in set(order)]
    if missing:
        repairs.append(f"appended missing {[i + 1 for i in missing]}")
    return order + missing, repairs
