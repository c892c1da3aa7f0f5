"""The reranking methods, one object each, behind one small interface the loop drives.

- `RetrvR1`: a window of ICM tokens (two per candidate; full tokens for a model without an ICM), one answer
  `<answer>i</answer>`;
- `Listwise` (V-Retrver): full candidate tokens, tool calls answered mid-reasoning, a ranked list
  `<answer>[i, j, ...]</answer>`.

The interface: `prompt` (the window's pieces), `begin` (per-window state), `react` (the model's text after each
token: a tool call to answer), `answer_limit` and `read_answer` (the answer the model writes itself),
`force_answer` (budgets ran out: close the reasoning and decode the answer under a constraint). Inspection markup
(`<inspection-index-start> i <inspection-index-end>`) is honoured whatever the method: it appends candidate i's
full tokens (with their own M-RoPE positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retrv.runtime.decode import DecodeSession
from retrv.runtime.errors import InputError
from retrv.runtime.rerank.answer import AnswerTrie, parse_index, parse_ranking
from retrv.runtime.rerank.budget import WindowAllowance
from retrv.runtime.rerank.formats import ListwiseFormat
from retrv.runtime.rerank.prompt import Piece, PromptBuilder
from retrv.runtime.rerank.tool_session import ToolSession

ANSWER_MARGIN = 8  # tokens beyond the widest well-formed list: a newline or two, a stray space, a doubled comma


@dataclass
class Episode:
    """One window being reranked: its decode session, allowance, trace and candidates."""

    session: DecodeSession
    allow: WindowAllowance
    trace: object  # a WindowTrace
    query: object  # a QueryInput
    cands: list
    trie: AnswerTrie
    reserve: int  # tokens kept back for a forced answer
    builder: PromptBuilder
    image_encoder: object = None
    generated: list[int] = field(default_factory=list)  # the model's own tokens in this window
    tools: ToolSession | None = None


class Method:
    name = ""
    icm = False  # reads ICM tokens by default (when the model has an ICM)
    forced_opener = ""  # written after <answer> when the answer is forced
    # An <answer> the model writes while its <think> is still open is part of its reasoning, not the answer. Only
    # for a prompt that does not open <think> itself: Retrv-R1's does, and reads the first <answer> as it always has.
    answer_after_think = False
    fmt: ListwiseFormat = ListwiseFormat()

    def prompt(self, builder: PromptBuilder, query, cands, icm) -> list[Piece]:
        raise NotImplementedError

    def begin(self, ep: Episode) -> None:
        """Per-window state, before the model reasons."""

    def react(self, ep: Episode, text: str) -> bool:
        """The model's text so far, after each token it wrote. False when the window has ended."""
        return True

    def answer_limit(self, ep: Episode) -> int:
        raise NotImplementedError

    def read_answer(self, ep: Episode, text: str) -> None:
        """Take the answer as written (the text between <answer> and </answer>) into the trace."""
        raise NotImplementedError

    def finish_forced(self, ep: Episode, top: int) -> None:
        raise NotImplementedError

    # -- shared by every method ---------------------------------------------------------------------------------
    def force_answer(self, ep: Episode) -> None:
        """Close the reasoning and decode the answer under the trie constraint (always a valid index)."""
        b, t, trace = ep.builder, ep.builder.t, ep.trace
        closed = t.think_close in b.tok.decode(ep.generated)
        ep.session.feed([b.text(("\n" if closed else f"\n{t.think_close}\n") + t.answer_open + self.forced_opener)])
        trace.forced = True
        self.finish_forced(ep, ep.trie.decode(ep.session))

    def inspect(self, ep: Episode, index_ids: list[int]) -> None:
        """The model closed an inspection: append the candidate's full tokens, or a short refusal marker."""
        allow, trace, b = ep.allow, ep.trace, ep.builder
        t, tok = b.t, b.tok
        i = parse_index(tok.decode(index_ids))
        end = Piece([b.cfg.tokens.inspection_end_token_id])
        if i is None or not 1 <= i <= len(ep.cands):
            chunk = [end, b.text(t.marker_no_candidate.format(i=tok.decode(index_ids).strip()))]
        elif (i - 1) in trace.inspected:
            chunk = [end, b.text(t.marker_repeat.format(i=i))]
        elif allow.spent.inspect >= allow.inspect:
            allow.exhausted.add("inspect")
            chunk = [end, b.text(t.marker_inspect_budget)]
        else:
            chunk = [end, b.text(t.inspected_prefix.format(i=i))] + b.full_candidate(ep.cands[i - 1]) + [b.text("\n")]
            short = allow.blocked(ep.session.cost(chunk), ep.reserve)  # the candidate must fit, and the answer
            if short is None:
                allow.spent.inspect += 1
                trace.inspected.append(i - 1)
            else:
                allow.exhausted.add(short)
                chunk = [end, b.text(t.marker_token_budget)]
        short = allow.blocked(ep.session.cost(chunk), ep.reserve)
        if short:
            allow.exhausted.add(short)
            return self.force_answer(ep)
        ep.session.feed(chunk)


class RetrvR1(Method):
    """One answer per window; details inspection re-reads a candidate's full tokens."""

    name, icm = "retrv-r1", True

    def prompt(self, builder, query, cands, icm):
        return builder.window_prompt(query, cands, icm)

    def answer_limit(self, ep):
        return ep.trie.max_feed + 4  # digits plus a closing tag; anything longer is not an index

    def read_answer(self, ep, text):
        i = parse_index(text)
        if i is None or not 1 <= i <= len(ep.cands):
            ep.trace.fallback = "invalid_answer"
        else:
            ep.trace.choice = i - 1

    def finish_forced(self, ep, top):
        ep.trace.choice = top
        ep.session.note(ep.builder.tok.encode_text(ep.builder.t.answer_close))


class Listwise(Method):
    """V-Retrver: full tokens, tool calls, a ranked list (repaired entry by entry, as the released merger does)."""

    name, icm = "listwise", False
    forced_opener = "["
    answer_after_think = True

    def __init__(self, fmt: ListwiseFormat | None = None) -> None:
        self.fmt = fmt or ListwiseFormat()

    def prompt(self, builder, query, cands, icm):
        return builder.listwise_prompt(query, cands, self.fmt)

    def begin(self, ep):
        ep.tools = ToolSession(ep.builder, ep.image_encoder, ep.query, ep.cands, self.fmt.target_image_base)

    def react(self, ep, text):
        if text.endswith(ep.tools.close_tag) and not ep.tools.answer_call(ep, text):
            self.force_answer(ep)
            return False
        return True

    def answer_limit(self, ep):
        """What the widest well-formed answer really takes in this tokenizer: ` [ n , n-1 , ... , 1 ] </answer>`
        (spaces around every entry: a tokenizer may give each its own token), plus a margin."""
        n, tok = len(ep.cands), ep.builder.tok
        widest = " [ " + " , ".join(str(i) for i in range(n, 0, -1)) + " ] " + ep.builder.t.answer_close
        return len(tok.encode_text(widest)) + ANSWER_MARGIN

    def read_answer(self, ep, text):
        ranking, repairs = parse_ranking(text, len(ep.cands))
        ep.trace.repairs += repairs
        if ranking is None:
            ep.trace.fallback = "invalid_answer"
        else:
            ep.trace.ranking = ranking

    def finish_forced(self, ep, top):
        """The first entry is constrained, the rest follows in window order (tokens are what ran out, so the model
        is asked for the one decision that matters most)."""
        ep.trace.ranking = [top] + [j for j in range(len(ep.trace.candidates)) if j != top]
        ep.trace.repairs.append("forced: first entry constrained, the rest in window order")
        ep.session.note(ep.builder.tok.encode_text("]" + ep.builder.t.answer_close))


METHODS = {m.name: m for m in (RetrvR1, Listwise)}


def method_for(name: str | None, has_icm: bool, fmt: ListwiseFormat | dict | None = None) -> Method:
    """The method object for a pack manifest's `method` (None: retrv-r1 for a model with an ICM, else listwise)
    and, for listwise, its `extra["rerank"]` format (None: the defaults)."""
    name = name or ("retrv-r1" if has_icm else "listwise")
    if name not in METHODS:
        raise InputError(f"method: got {name!r}; expected 'retrv-r1' or 'listwise'")
    return Listwise(ListwiseFormat.from_dict(fmt)) if name == "listwise" else METHODS[name]()
