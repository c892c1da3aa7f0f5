"""The listwise (V-Retrver) half of the reranking loop: tool calls answered mid-reasoning, ranked-list answers.

The loop in `rerank.py` hands over when the model's text ends with `</tool_call>` (answer the call) or with
`<answer>` (read the ranking). A tool result re-enters the context as a user turn with the returned images encoded
by the backend's vision graph, at fresh M-RoPE positions; the assistant then continues.
"""

from __future__ import annotations

from retrv.runtime.rerank.answer import parse_ranking
from retrv.runtime.rerank.prompt import Piece
from retrv.runtime.rerank.tools import ToolResult, ToolServer

LIST_TOKENS_PER_ITEM = 4  # "12, " is at most 4 tokens in Qwen's digit-by-digit tokenizer


class ToolSession:
    def __init__(self, rr, window, query, cands) -> None:
        self.rr, self.w, self.n = rr, window, len(cands)
        self.server = ToolServer([query.image] + [c.image for c in cands])
        self.close_tag = rr.t.tool_close

    def _observation(self, result: ToolResult) -> list[Piece]:
        b, t = self.rr.builder, self.rr.t
        parts = result.text.split("<image>")
        pieces = [b.text(t.observation_prefix + parts[0])]
        encoded = self.rr.image_encoder(result.images) if result.images else []
        for (tokens, grid), text in zip(encoded, parts[1:]):
            pieces += b.image(tokens, grid)
            if text:
                pieces.append(b.text(text))
        pieces.append(b.text(t.observation_suffix))
        return pieces

    def answer_call(self, text: str, reserve: int, trie, generated: list[int]) -> bool:
        """Answer the call that `text` just closed. False when the window had to end (its answer forced)."""
        rr, w = self.rr, self.w
        allow, trace, t = w.allow, w.trace, rr.t
        body = text[: -len(self.close_tag)]
        start = body.rfind(t.tool_open)
        if start < 0:
            result = ToolResult(False, f"Invalid tool call: {t.tool_close} without {t.tool_open}.")
        elif allow.spent.tool >= allow.tool:
            allow.exhausted.add("tool")
            result = ToolResult(False, t.marker_tool_budget)
        elif rr.image_encoder is None:
            result = ToolResult(False, "Tools are not available in this runtime; answer with what you have.")
        else:
            allow.spent.tool += 1
            result = self.server.run(body[start + len(t.tool_open):])
        pieces = self._observation(result)
        short = allow.blocked(w.cost(pieces), reserve)
        if short:
            allow.exhausted.add(short)
            pieces = [rr.builder.text(t.observation_prefix + t.marker_token_budget.strip() + t.observation_suffix)]
            if not allow.can_feed(w.cost(pieces), reserve):
                rr._force(w, trie, generated)
                return False
        trace.tool_calls.append({"name": result.name, "ok": result.ok, "observation": result.text})
        w.feed(pieces)
        return True

    def free_answer(self, trie) -> None:
        """Read the ranking the model writes, as written, until the closing tag; repair it where unambiguous."""
        rr, w = self.rr, self.w
        trace, close = w.trace, rr.t.answer_close
        written: list[int] = []
        for _ in range(LIST_TOKENS_PER_ITEM * self.n + 8):
            tok = w.choose()
            w.taken(tok)
            written.append(tok)
            if tok in rr.eos or close in rr.tok.decode(written) or not w.allow.can_feed(1):
                break
            w.feed([Piece([tok])])
        w.text_ids += written[-1:]
        ranking, repairs = parse_ranking(rr.tok.decode(written).split(close)[0], self.n)
        trace.repairs += repairs
        if ranking is None:
            trace.fallback = "invalid_answer"
        else:
            trace.ranking = ranking
