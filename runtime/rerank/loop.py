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

from retrv.runtime.rerank.answer import AnswerTrie, parse_index
from retrv.runtime.backends.base import Backend
from retrv.runtime.rerank.budget import Budget, Ledger, Usage, WindowAllowance, fit_budget
from retrv.runtime.errors import InputError
from retrv.runtime.limits import Cap, check_text, context_of
from retrv.runtime.rerank.prompt import CandidateInput, Piece, PromptBuilder, QueryInput, RerankTemplate, pad_batch
from retrv.runtime.rerank.tool_session import ToolSession

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


class _Window:
    """Decoding state of one window: feeds chunks, keeps positions, counts tokens against the allowance."""

    def __init__(self, rr: "Reranker", allowance: WindowAllowance, trace: WindowTrace) -> None:
        self.rr, self.allow, self.trace = rr, allowance, trace
        self.state = rr.backend.start(1)
        self.next_pos = 0
        self.logits: np.ndarray | None = None
        self.text_ids: list[int] = []  # generated and appended ids, for the trace and for text matching

    def feed(self, pieces: list[Piece]) -> None:
        ids, embeds, pos = self.rr.builder.assemble(pieces, self.next_pos)
        self.allow.feed(len(ids))
        if self.rr.record:
            self.trace.chunks.append((ids, embeds, pos))
        t0 = time.perf_counter()
        self.logits = self.rr.backend.step(self.state, embeds[None], pos, np.ones((1, len(ids)), np.int64))[0]
        self.trace.timings_ms["decode"] = self.trace.timings_ms.get("decode", 0.0) + (time.perf_counter() - t0) * 1e3
        self.next_pos = int(pos.max()) + 1
        self.text_ids += ids

    def cost(self, pieces: list[Piece]) -> int:
        return sum(len(p.ids) for p in pieces)

    def choose(self) -> int:
        """The model's next free token: argmax, or a sample at the reranker's temperature (training rollouts)."""
        return self.rr.pick(self.logits)

    def taken(self, tok: int) -> None:
        """Record a chosen token the loop acted on (a token discarded because a budget ran out is not recorded)."""
        if self.rr.record:
            self.trace.actions.append((self.allow.spent.token, tok))


class Reranker:
    def __init__(self, backend: Backend, tokenizer, cfg, embed_table: np.ndarray,
                 template: RerankTemplate | None = None, use_icm: bool | None = None,
                 temperature: float = 0.0, seed: int | None = None, record: bool = False,
                 method: str | None = None, image_encoder=None) -> None:
        """`method`: "retrv-r1" (one answer, details inspection; the default with an ICM) or "listwise"
        (V-Retrver: full tokens, tools, a ranked list; the default without). `image_encoder(images) ->
        [(tokens, grid)]` encodes tool results (crops, selected images) with the backend's vision graph."""
        if temperature < 0:
            raise InputError(f"temperature: got {temperature}; expected >= 0 (0 = greedy)")
        self.backend, self.tok, self.cfg = backend, tokenizer, cfg
        self.temperature, self.rng, self.record = temperature, np.random.default_rng(seed), record
        self.builder = PromptBuilder(tokenizer, cfg, embed_table, template)
        self.t = self.builder.t
        self.method = method or ("retrv-r1" if cfg.icm is not None else "listwise")
        if self.method not in ("retrv-r1", "listwise"):
            raise InputError(f"method: got {self.method!r}; expected 'retrv-r1' or 'listwise'")
        default_icm = cfg.icm is not None and self.method == "retrv-r1"
        self.use_icm = default_icm if use_icm is None else use_icm
        if self.use_icm and cfg.icm is None:
            raise InputError("use_icm: got True for a model without an ICM; expected False")
        self.image_encoder = image_encoder
        tk = cfg.tokens
        self.eos = set(tk.eos_token_ids)
        self.insp_start, self.insp_end = tk.inspection_start_token_id, tk.inspection_end_token_id

    def pick(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = (logits - logits.max()) / self.temperature
        p = np.exp(z.astype(np.float64))
        return int(self.rng.choice(len(p), p=p / p.sum()))

    # -- public ------------------------------------------------------------------------------------------------
    def rerank(self, query: QueryInput, cands: list[CandidateInput], budget: Budget | None = None,
               window: int = 20, stride: int = 10) -> RerankResult:
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
        n = len(cands)
        trie = AnswerTrie(self.tok, n, self.t.answer_close)
        reserve = self._force_cost() + trie.max_feed
        prompt = (self.builder.listwise_prompt(query, cands) if self.method == "listwise"
                  else self.builder.window_prompt(query, cands, icm))
        w = _Window(self, allow, trace)
        short = allow.blocked(w.cost(prompt), reserve)
        if short:
            allow.exhausted.add(short)
            trace.fallback = f"{short}_budget"
            return trace
        t0 = time.perf_counter()
        w.feed(prompt)
        trace.prefill_tokens = len(w.text_ids)
        trace.timings_ms["prefill"] = (time.perf_counter() - t0) * 1e3
        trace.timings_ms["decode"] = 0.0
        w.text_ids = []
        tools = ToolSession(self, w, query, cands) if self.method == "listwise" else None
        self._think(w, cands, trie, reserve, tools)
        trace.text = self.tok.decode(w.text_ids)
        return trace

    def _force_cost(self) -> int:
        return len(self.tok.encode_text(f"\n{self.t.think_close}\n{self.t.answer_open}["))

    def _think(self, w: _Window, cands, trie: AnswerTrie, reserve: int, tools=None) -> None:
        allow, trace, n = w.allow, w.trace, len(cands)
        generated: list[int] = []
        index_ids: list[int] | None = None  # collecting an inspection index
        while True:
            tok = w.choose()
            if tok in self.eos:
                w.taken(tok)
                trace.fallback = "no_answer"
                return
            if allow.spent.think >= allow.think:
                allow.exhausted.add("think")
                return self._force(w, trie, generated)
            short = allow.blocked(1, reserve)  # the model's context runs out like the token budget
            if short:
                allow.exhausted.add(short)
                return self._force(w, trie, generated)
            allow.spent.think += 1
            w.taken(tok)
            generated.append(tok)
            if index_ids is not None and tok == self.insp_end:
                self._inspect(w, cands, index_ids, reserve, trie, generated)
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
            w.feed([Piece([tok])])
            text = self.tok.decode(generated)
            if text.rstrip().endswith(self.t.answer_open):
                if tools is not None:
                    return tools.free_answer(trie)
                return self._free_answer(w, trie, n)
            if tools is not None and text.endswith(tools.close_tag):
                if not tools.answer_call(text, reserve, trie, generated):
                    return

    def _inspect(self, w: _Window, cands, index_ids: list[int], reserve: int, trie, generated) -> None:
        """The model closed an inspection: append the candidate's full tokens, or a short refusal marker."""
        allow, trace, t = w.allow, w.trace, self.t
        i = parse_index(self.tok.decode(index_ids))
        end = Piece([self.insp_end])
        if i is None or not 1 <= i <= len(cands):
            chunk = [end, self.builder.text(t.marker_no_candidate.format(i=self.tok.decode(index_ids).strip()))]
        elif (i - 1) in trace.inspected:
            chunk = [end, self.builder.text(t.marker_repeat.format(i=i))]
        elif allow.spent.inspect >= allow.inspect:
            allow.exhausted.add("inspect")
            chunk = [end, self.builder.text(t.marker_inspect_budget)]
        else:
            chunk = [end, self.builder.text(t.inspected_prefix.format(i=i))] + \
                self.builder.full_candidate(cands[i - 1]) + [self.builder.text("\n")]
            short = allow.blocked(w.cost(chunk), reserve)  # the candidate must fit, and the answer after it
            if short is None:
                allow.spent.inspect += 1
                trace.inspected.append(i - 1)
            else:
                allow.exhausted.add(short)
                chunk = [end, self.builder.text(t.marker_token_budget)]
        short = allow.blocked(w.cost(chunk), reserve)
        if short:
            allow.exhausted.add(short)
            return self._force(w, trie, generated)
        w.feed(chunk)

    def _free_answer(self, w: _Window, trie: AnswerTrie, n: int) -> None:
        """The model opened its answer: read what it writes, as written, until the closing tag."""
        allow, trace = w.allow, w.trace
        written: list[int] = []
        for _ in range(trie.max_feed + 4):  # digits plus a closing tag; anything longer is not an index
            tok = w.choose()
            w.taken(tok)
            written.append(tok)
            text = self.tok.decode(written)
            if tok in self.eos or self.t.answer_close in text or not allow.can_feed(1):
                break
            w.feed([Piece([tok])])
        w.text_ids += written[-1:]
        i = parse_index(self.tok.decode(written).split(self.t.answer_close)[0])
        if i is None or not 1 <= i <= n:
            trace.fallback = "invalid_answer"
        else:
            trace.choice = i - 1

    def _force(self, w: _Window, trie: AnswerTrie, generated: list[int]) -> None:
        """Close the reasoning and decode the answer under the trie constraint (always a valid index). A listwise
        answer is forced the same way for its first entry; the rest follows in window order (tokens are what ran
        out, so the model is asked for the one decision that matters most)."""
        trace, t = w.trace, self.t
        closed = t.think_close in self.tok.decode(generated)
        opener = t.answer_open + ("[" if self.method == "listwise" else "")
        w.feed([self.builder.text(("\n" if closed else f"\n{t.think_close}\n") + opener)])
        trace.forced = True
        top = trie.decode(w)
        if self.method == "listwise":
            trace.ranking = [top] + [j for j in range(len(trace.candidates)) if j != top]
            trace.repairs.append("forced: first entry constrained, the rest in window order")
            w.text_ids += self.tok.encode_text("]" + t.answer_close)
        else:
            trace.choice = top
            w.text_ids += self.tok.encode_text(t.answer_close)

