"""Tool calls answered mid-reasoning (V-Retrver), one window at a time.

`Listwise.react` hands over when the model's text ends with `</tool_call>`. The result re-enters the context as a
user turn (the chat template's markup) with the returned images encoded by the vision encoder, at fresh M-RoPE
positions; the assistant then continues.
"""

from __future__ import annotations

from retrv.runtime.rerank.prompt import Piece, PromptBuilder
from retrv.runtime.rerank.tools import ToolResult, ToolServer


class ToolSession:
    def __init__(self, builder: PromptBuilder, image_encoder, query, cands, target_image_base: int = 0) -> None:
        """`image_encoder(images) -> [(tokens, grid)]` (a `VisionEncoder`), or None where tools cannot run.
        `target_image_base`: how crop_image numbers images (`ToolServer`; the pack's `ListwiseFormat`)."""
        self.builder, self.image_encoder = builder, image_encoder
        self.server = ToolServer([query.image] + [c.image for c in cands], target_image_base)
        self.close_tag = builder.t.tool_close

    def observation(self, result: ToolResult) -> list[Piece]:
        b = self.builder
        parts = result.text.split("<image>")
        pieces = [b.text(b.observation(parts[0]))]
        encoded = self.image_encoder(result.images) if result.images else []
        for (tokens, grid), text in zip(encoded, parts[1:]):
            pieces += b.image(tokens, grid)
            if text:
                pieces.append(b.text(text))
        pieces.append(b.text(b.observation_end()))
        return pieces

    def answer_call(self, ep, text: str) -> bool:
        """Answer the call that `text` just closed, in window `ep` (an `Episode`). False when not even a short
        refusal fits: the caller then forces the answer."""
        allow, trace, t, b = ep.allow, ep.trace, self.builder.t, self.builder
        body = text[: -len(self.close_tag)]
        start = body.rfind(t.tool_open)
        refused = False  # the call itself was not valid (as opposed to a budget or a runtime without tools)
        if start < 0:
            result, refused = ToolResult(False, f"Invalid tool call: {t.tool_close} without {t.tool_open}."), True
        elif allow.spent.tool >= allow.tool:
            allow.exhausted.add("tool")
            result = ToolResult(False, t.marker_tool_budget)
        elif self.image_encoder is None:
            result = ToolResult(False, "Tools are not available in this runtime; answer with what you have.")
        else:
            allow.spent.tool += 1
            result = self.server.run(body[start + len(t.tool_open):])
            refused = not result.ok
        if refused:  # prefixed as the released agent loop prefixes every observation of an invalid action
            result.text = t.invalid_action + result.text
        pieces = self.observation(result)
        short = allow.blocked(ep.session.cost(pieces), ep.reserve)
        if short:
            allow.exhausted.add(short)
            pieces = [b.text(b.observation(t.marker_token_budget.strip()) + b.observation_end())]
            if not allow.can_feed(ep.session.cost(pieces), ep.reserve):
                return False
        trace.tool_calls.append({"name": result.name, "ok": result.ok, "observation": result.text})
        ep.session.feed(pieces)
        return True
