"""Answers: parsing what the model wrote, and decoding a forced answer under a constraint.

A forced answer must be a valid candidate index whatever the model prefers, so it is decoded over a trie of the
tokenizations of "1".."n": at each step only tokens that continue some valid index are allowed (plus the closing
tag once the digits so far already form one, so "1" can still become "12"). The model's logits choose among them.
"""

from __future__ import annotations

import math
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


def whole_number(value) -> int | None:
    """A JSON value that names an index: 3, 3.0, "3", " 3 " -> 3; 3.5, True, "three", inf, None -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())  # as the released tool server reads a string index
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _entry(s: str) -> int | None:
    """One list entry as the released merger reads it (`int(s.strip())`), never raising: '²' or '4.0' -> None."""
    try:
        return int(s.strip())
    except (ValueError, OverflowError):
        return None


def answer_span(text: str, open_tag: str, close_tag: str, think_close: str | None,
                think_open: str = "<think>") -> str | None:
    """The answer in a model's text: the last complete `<answer>...</answer>` after the last `</think>` (the whole
    text when there is none); None when there is no such answer or a `<think>` is still open. One inside the
    reasoning is not the answer (the released merger takes the first anywhere, which can be one the model was only
    thinking about)."""
    if think_close is not None and think_close in text:
        text = text[text.rindex(think_close) + len(think_close):]
    if think_open and think_open in text:
        return None
    end = text.rfind(close_tag)
    if end < 0:
        return None
    start = text.rfind(open_tag, 0, end)
    return None if start < 0 else text[start + len(open_tag):end]


def parse_ranking(text: str, n: int) -> tuple[list[int] | None, list[str]]:
    """'[4, 1, 3]' for n candidates -> (a 0-based permutation of range(n), repairs made), or (None, [why]).

    Read as the released V-Retrver merger reads it, entry by entry, and never raising: one pair of brackets around
    the list is optional (a single number, as the released training guideline asks for, is a one-entry list);
    each comma-separated entry that `int()` cannot read ('²', '4.0', 'two') is dropped, as are out-of-range
    and repeated ones (first occurrence wins); missing candidates are appended in window (coarse) order. Every
    repair is one string in the list returned. With no valid entry at all the caller keeps the coarse order and
    flags the window.
    """
    body = text.strip()
    body = body[1:] if body.startswith("[") else body
    body = body[:-1] if body.endswith("]") else body  # each on its own: a list cut off by the cap lacks the "]"
    items = [s for s in body.split(",") if s.strip()]
    if not items:
        return None, ["empty answer"]
    repairs, seen, order = [], set(), []
    for s in items:
        i = _entry(s)
        if i is None:
            repairs.append(f"dropped unreadable {s.strip()[:20]!r}")
        elif not 1 <= i <= n:
            repairs.append(f"dropped out-of-range {i}" if abs(i) < 10**6 else "dropped out-of-range entry")
        elif i in seen:
            repairs.append(f"dropped duplicate {i}")
        else:
            seen.add(i)
            order.append(i - 1)
    if not order:
        return None, repairs + ["no valid index"]
    missing = [i for i in range(n) if i + 1 not in seen]
    if missing:
        repairs.append(f"appended missing {[i + 1 for i in missing]}")
    return order + missing, repairs

