"""The reasoning reranker: one loop for every backend, and budgets it never breaks.

Per window of candidates: prefill the prompt (two ICM tokens per candidate, or full tokens for a model without an
ICM), then decode. `<inspection-index-start> i <inspection-index-end>` appends candidate i's full tokens (with
their own M-RoPE positions) and decoding continues. When a budget runs out the runtime closes the reasoning and
forces the answer, decoded under a constraint so it is always a valid index. An answer the model writes itself is
taken as written: if it is missing or out of range, the window keeps its coarse order and the result is flagged.

Windows (V-Retrver's sliding windows) run back to front; each window's winner moves to the front of that window,
so a strong candidate bubbles up through the overlaps. The result is always a permutation of the coarse list.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from retrv.runtime.backends.base import Backend
from retrv.runtime.decode import DecodeSession, Picker
from retrv.runtime.rerank.answer import AnswerTrie, answer_span
from retrv.runtime.rerank.budget import (DEFAULT_STRIDE, DEFAULT_WINDOW, Budget, Ledger, Usage, WindowAllowance,
                                        fit_budget)
from retrv.runtime.errors import InputError
from retrv.runtime.limits import Cap, check_text, context_of
from retrv.runtime.rerank.methods import Episode, Method, method_for
from retrv.runtime.rerank.prompt import CandidateInput, PromptBuilder, QueryInput, RerankTemplate, pad_batch

MAX_INDEX_TOKENS = 8  # an inspection index longer than this is not an index: the markup is treated as text


def window_starts(k: int, window: int, stride: int) -> list[int]:
    """Back-to-front window starts covering k items: k=50, window=20, stride=10 -> [30, 20, 10, 0]."""
    if window < 1 or stride < 1:
        raise InputError(f"window/stride: got {window}/{stride}; expected integers >= 1")
    if stride > window:
        raise InputError(f"stride: got {stride}; expected <= window ({window}) so that windows overlap or touch")
    if k <= window:
        return [0]
    starts = list(range(k - window, 0, -stride))
    return starts + [0]


@dataclass
class WindowTrace:
    start: int
    candidates: list[int]  # indices into the coarse list, in the order the window showed them
    choice: int | None = None  # 0-based within the window
    forced: bool = False
    fallback: str | None = None  # why the window kept its order: "no_answer", "invalid_answer", "token_budget",
    # "context_budget" (its prompt and the answer would not fit the token budget / the model's context)
    inspected: list[int] = field(default_factory=list)  # 0-based within the window
    ranking: list[int] | None = None  # listwise (V-Retrver): a 0-based permutation of the window
    repairs: list[str] = field(default_factory=list)  # what was fixed in a listwise answer
    tool_calls: list[dict] = field(default_factory=list)  # {"name", "ok", "observation"} per call answered
    prefill_tokens: int = 0
    needed_tokens: int = 0  # the least budget this window runs with: its prompt plus the answer's reserve
    text: str = ""
    usage: Usage = field(default_factory=Usage)
    timings_ms: dict = field(default_factory=dict)
    # With record=True (training): every fed chunk as (ids, embeds, position_ids) and the policy's own choices as
    # (tokens fed before it, token) — its log-probability is read from the logits of the position before it.
    chunks: list = field(default_factory=list)
    actions: list = field(default_factory=list)


@dataclass
class RerankResult:
    order: list[int]  # a permutation of range(K): the final ranking as indices into the coarse list
    windows: list[WindowTrace]
    usage: Usage
    exhausted: list[str]
    timings_ms: dict
    limits: dict[str, Cap] = field(default_factory=dict)  # budgets capped to what the windows' contexts can hold

    @property
    def fallback(self) -> bool:
        return any(w.fallback for w in self.windows)

    @property
    def answered(self) -> bool:
        return any(w.choice is not None or w.ranking is not None for w in self.windows)

    @property
    def forced(self) -> bool:
        return any(w.forced for w in self.windows)


class Reranker:
    def __init__(self, backend: Backend, tokenizer, cfg, embed_table: np.ndarray,
                 template: RerankTemplate | None = None, use_icm: bool | None = None,
                 temperature: float = 0.0, seed: int | None = None, record: bool = False,
                 method: str | None = None, image_encoder=None, fmt=None) -> None:
        """`method`: "retrv-r1" (one answer, details inspection; the default with an ICM) or "listwise"
        (V-Retrver: full tokens, tools, a ranked list; the default without); the pack manifest's. `image_encoder`
        (a `VisionEncoder`: images -> [(tokens, grid)]) encodes tool results (crops, selected images). `fmt`: the
        listwise prompt and answer format (a `ListwiseFormat` or the manifest's `extra["rerank"]`; None: defaults)."""
        self.picker = Picker(temperature, seed)
        self.backend, self.tok, self.cfg, self.record = backend, tokenizer, cfg, record
        self.builder = PromptBuilder(tokenizer, cfg, embed_table, template)
        self.scheme: Method = method_for(method, cfg.icm is not None, fmt)
        self.method = self.scheme.name
        default_icm = cfg.icm is not None and self.scheme.icm
        self.use_icm = default_icm if use_icm is None else use_icm
        if self.use_icm and cfg.icm is None:
            raise InputError("use_icm: got True for a model without an ICM; expected False")
        self.image_encoder = image_encoder
        tk = cfg.tokens
        self.eos = set(tk.eos_token_ids)
        self.insp_start, self.insp_end = tk.inspection_start_token_id, tk.inspection_end_token_id

    # -- public ------------------------------------------------------------------------------------------------
    def rerank(self, query: QueryInput, cands: list[CandidateInput], budget: Budget | None = None,
               window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE) -> RerankResult:
        if not cands:
            raise InputError("candidates: got none; expected at least one to rerank")
        context = context_of(self.cfg)
        check_text("query text", query.text, context)
        for c in cands:
            check_text(f"candidate {c.did!r} text", c.text, context)
        timings: dict[str, float] = {}
        icm = self._icm(query, cands, timings) if self.use_icm else None
        order = list(range(len(cands)))
        starts = window_starts(len(cands), window, stride)
        budget, caps = fit_budget(budget or Budget(), context, [len(order[s:s + window]) for s in starts])
        ledger = Ledger(budget, len(starts), context)
        traces = []
        for start in starts:
            idx = order[start:start + window]
            allowance = ledger.next_window()
            trace = self._run_window(query, [cands[i] for i in idx], None if icm is None else icm[idx], allowance,
                                     WindowTrace(start=start, candidates=list(idx)))
            trace.usage = allowance.spent
            ledger.close_window(allowance)
            if trace.ranking is not None:
                order[start:start + window] = [idx[j] for j in trace.ranking]
            elif trace.choice is not None:
                winner = idx[trace.choice]
                order[start:start + window] = [winner] + [i for i in idx if i != winner]
            traces.append(trace)
        for w in traces:
            for k, v in w.timings_ms.items():
                timings[k] = timings.get(k, 0.0) + v
        return RerankResult(order=order, windows=traces, usage=ledger.used, exhausted=sorted(ledger.exhausted),
                            timings_ms=timings, limits=caps)

    # -- ICM -----------------------------------------------------------------------------------------------------
    def _icm(self, query: QueryInput, cands: list[CandidateInput], timings: dict) -> np.ndarray:
        """(K, 2, H): t_con from the cache when present (computed now otherwise), t_rel against this query."""
        t0 = time.perf_counter()
        cand_tokens, cand_mask = pad_batch([self.builder.candidate_tokens(c) for c in cands])
        q = self.builder.query_tokens(query)
        t_rel = self.backend.icm_relation(cand_tokens, cand_mask, q, np.ones(len(q), np.int64))
        if all(c.t_con is not None for c in cands):
            t_con = np.stack([np.asarray(c.t_con, dtype=np.float32) for c in cands])
        else:
            t_con = self.backend.icm_content(cand_tokens, cand_mask)
        timings["icm"] = (time.perf_counter() - t0) * 1e3
        return np.stack([t_con, t_rel], axis=1)

    # -- one window ------------------------------------------------------------------------------------------------
    def _run_window(self, query, cands, icm, allow: WindowAllowance, trace: WindowTrace) -> WindowTrace:
        t = self.builder.t
        trie = AnswerTrie(self.tok, len(cands), t.answer_close)
        reserve = len(self.tok.encode_text(f"\n{t.think_close}\n{t.answer_open}[")) + trie.max_feed
        prompt = self.scheme.prompt(self.builder, query, cands, icm)
        session = DecodeSession(self.backend, self.builder, self.picker, allow, self.record)
        trace.chunks, trace.actions = session.chunks, session.actions
        trace.needed_tokens = session.cost(prompt) + reserve
        short = allow.blocked(session.cost(prompt), reserve)
        if short:
            allow.exhausted.add(short)
            trace.fallback = f"{short}_budget"
            return trace
        t0 = time.perf_counter()
        session.feed(prompt)
        trace.prefill_tokens = len(session.transcript)
        trace.timings_ms["decode"] = 0.0
        trace.timings_ms["prefill"] = (time.perf_counter() - t0) * 1e3
        prefill_ms = session.step_ms
        session.clear_transcript()
        ep = Episode(session, allow, trace, query, cands, trie, reserve, self.builder, self.image_encoder)
        self.scheme.begin(ep)
        self._think(ep)
        trace.timings_ms["decode"] = session.step_ms - prefill_ms
        trace.text = self.tok.decode(session.transcript)
        return trace

    def _think(self, ep: Episode) -> None:
        s, allow, trace, generated = ep.session, ep.allow, ep.trace, ep.generated
        index_ids: list[int] | None = None  # collecting an inspection index
        while True:
            tok = s.choose()
            if tok in self.eos:
                s.taken(tok)
                trace.fallback = "no_answer"
                return
            if allow.spent.think >= allow.think:
                allow.exhausted.add("think")
                return self.scheme.force_answer(ep)
            short = allow.blocked(1, ep.reserve)  # the model's context runs out like the token budget
            if short:
                allow.exhausted.add(short)
                return self.scheme.force_answer(ep)
            allow.spent.think += 1
            s.taken(tok)
            generated.append(tok)
            if index_ids is not None and tok == self.insp_end:
                self.scheme.inspect(ep, index_ids)
                index_ids = None
                if trace.forced or trace.fallback or trace.choice is not None:
                    return
                continue
            if tok == self.insp_start and self.insp_start is not None:
                index_ids = []
            elif index_ids is not None:
                index_ids.append(tok)
                if len(index_ids) > MAX_INDEX_TOKENS:
                    index_ids = None  # not an index after all; keep reasoning
            s.feed_token(tok)
            text = self.tok.decode(generated)
            if text.rstrip().endswith(self.builder.t.answer_open) and not self._thinking(text):
                return self._free_answer(ep)
            if not self.scheme.react(ep, text):
                return

    def _thinking(self, text: str) -> bool:
        """Is the model's <think> still open at the end of `text` (only for methods whose answer must follow it)?"""
        if not self.scheme.answer_after_think:
            return False
        t = self.builder.t
        return text.rfind(t.think_open.strip()) > text.rfind(t.think_close)

    def _free_answer(self, ep: Episode) -> None:
        """The model opened its answer: read what it writes, as written, until the closing tag (or the cap sized
        for the widest well-formed answer)."""
        t = self.builder.t
        written = ep.session.read_until(t.answer_close, self.eos, self.scheme.answer_limit(ep), self.tok.decode)
        answer = None
        if self.scheme.answer_after_think:  # the last complete answer after </think>
            answer = answer_span(self.tok.decode(ep.generated + written), t.answer_open, t.answer_close,
                                 t.think_close, t.think_open.strip())
        if answer is None:  # no closing tag (the cap, a stop token): what was written
            answer = self.tok.decode(written).split(t.answer_close)[0]
        self.scheme.read_answer(ep, answer)
