"""Bounds: the model's context bounds everything.

A decoder sequence (a generation, one reranking window, one embedding) never holds more tokens than the model's
context, `max_position_embeddings` in the pack's model config. From that one number:

- a budget larger than what can fit (`max_new_tokens`, the think/inspect/tool/token budgets) is capped, and the
  cap is reported as `{"asked", "capped_to", "reason"}` (`Cap`) in the result: a budget is a ceiling, so capping
  it changes nothing a user relies on;
- a prompt that alone fills the context is refused (`check_tokens`): nothing useful can follow it;
- a text longer than `max_text_chars(context)` is refused before it is tokenized (`check_text`), so a huge string
  costs neither the tokenizer's time nor its memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from retrv.runtime.errors import InputError

# A generous ceiling on the average characters per token of a whole text. English BPE averages about 4, prose in
# other scripts fewer; only long runs of one repeated character compress further. A text averaging more than 32
# characters per token is not one a user writes, so a text over context x 32 characters cannot fit the context in
# any realistic tokenization, and tokenizing it (time and memory linear in its length) would be wasted.
MAX_CHARS_PER_TOKEN = 32


def context_of(cfg) -> int:
    """The most tokens one decoder sequence may hold: the model config's `max_position_embeddings`."""
    return int(cfg.text.max_position_embeddings)


def max_text_chars(context: int) -> int:
    return context * MAX_CHARS_PER_TOKEN


def check_text(name: str, text, context: int) -> None:
    """Refuse a text too long to ever fit the context, without tokenizing it."""
    if isinstance(text, str) and len(text) > max_text_chars(context):
        raise InputError(f"{name}: got {len(text):,} characters; expected at most {max_text_chars(context):,} "
                         f"(the model's context of {context:,} tokens x {MAX_CHARS_PER_TOKEN} characters per token)")


def check_tokens(name: str, n: int, context: int, room: int = 0, why: str = "") -> None:
    """Refuse a sequence of `n` tokens that leaves less than `room` tokens of the context free."""
    if n + room > context:
        after = f", leaving {room} for {why}" if room else ""
        raise InputError(f"{name}: got {n:,} tokens; expected at most {context - room:,} "
                         f"(the model's context is {context:,} tokens, max_position_embeddings{after})")


@dataclass(frozen=True)
class Cap:
    """A request larger than what fits, and what was used instead."""

    asked: int
    capped_to: int
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def cap(asked: int, ceiling: int, reason: str) -> tuple[int, Cap | None]:
    """-> (the value to use, the Cap to report or None when `asked` fits)."""
    if asked <= ceiling:
        return asked, None
    return ceiling, Cap(asked, ceiling, reason)
