"""Deadlines in milliseconds -> token budgets: the latency-SLO planner shared by `retrv serve` (`deadline_ms`) and
`retrv search --deadline-ms`.

A rerank's cost is two rates: prompt tokens are prefilled in parallel (cheap per token), generated tokens are
decoded one at a time (tens of times dearer). So the planner keeps both, measured on this device at start-up
(`calibrate`) and kept current from finished requests (`observe`), with the prompt size such requests have:

    left   = (deadline - elapsed - overhead) * SAFETY
    tokens = prompt + (left - prompt * ms_per_prefill_token) / ms_per_decode_token      (when the prompt fits)

`elapsed`: what the request has already spent (queue wait, decoding its images, embedding) when the plan is made;
`overhead`: the work still to come that no token budget bounds (for a search: the query's vision and embedding,
the coarse search; for both: answer parsing), a running average per kind of request. The decode rate is planned
at its mean plus two deviations, so a slower-than-usual spell (another process on the cores) still fits. `prompt` is the
least budget the windows run with (their prompts and answer reserves, learnt from earlier requests, also those
whose windows did not run). When not even that fits, the plan says so (`prompt_fits`: false) and the caller skips
the rerank: the coarse ranking answers in time rather than the reasoning late.

Light on purpose (no model or HTTP imports): the server and the CLI import it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace

from retrv.runtime.errors import InputError
from retrv.runtime.rerank.budget import Budget

SAFETY = 0.85  # the share of what is left that the plan spends: timer and scheduling jitter the averages miss
SMOOTHING = 0.2  # weight of a new observation in the running averages: about the last 5 requests dominate
DEVIATIONS = 2.0  # plan decode at mean + 2 sigma: ~95% of requests decode no slower than planned
ANSWER_TOKENS = 16  # decoded per window even with no thinking: the answer's markup and index ("</think><answer>[3]")
MAX_DEADLINE_MS = 3_600_000.0  # an hour: beyond it a deadline means nothing a request could use


def check_deadline(value, name: str = "deadline_ms") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_DEADLINE_MS:
        raise InputError(f"{name}: got {value!r}; expected milliseconds in (0, {MAX_DEADLINE_MS:,.0f}]")
    return float(value)


class _Mean:
    """A running mean and variance (exponentially weighted)."""

    def __init__(self, value: float) -> None:
        self.mean, self.var = float(value), 0.0

    def add(self, x: float) -> None:
        d = x - self.mean
        self.mean += SMOOTHING * d
        self.var = (1 - SMOOTHING) * (self.var + SMOOTHING * d * d)

    def high(self) -> float:
        return self.mean + DEVIATIONS * math.sqrt(self.var)


@dataclass(frozen=True)
class Timing:
    """What one finished rerank spent: prefill (prompt and appended tokens) and decode (generated ones), the
    budget its windows needed at least to run (prompts and answer reserves, known even for windows that did not
    run), and the time after the plan that no budget bounds."""

    prefill_ms: float
    prefill_tokens: int
    decode_ms: float
    decode_tokens: int
    needed_tokens: int = 0
    overhead_ms: float = 0.0

    @classmethod
    def of(cls, result, overhead_ms: float = 0.0) -> "Timing":
        """From a `RerankResult` (its windows' prefill sizes, its prefill/decode timings)."""
        prefill = sum(w.prefill_tokens for w in result.windows)
        return cls(result.timings_ms.get("prefill", 0.0), prefill, result.timings_ms.get("decode", 0.0),
                   max(result.usage.token - prefill, 0), sum(w.needed_tokens for w in result.windows), overhead_ms)


class DeadlinePlanner:
    """Thread-safe: `observe` may be called from every worker thread."""

    def __init__(self, ms_per_prefill_token: float, ms_per_decode_token: float) -> None:
        for name, v in (("ms_per_prefill_token", ms_per_prefill_token), ("ms_per_decode_token", ms_per_decode_token)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise InputError(f"{name}: got {v!r}; expected a positive number")
        self.prefill = _Mean(ms_per_prefill_token)
        self.decode = _Mean(ms_per_decode_token)
        self.prompt: dict[str, _Mean] = {}  # least budget a request's windows run with, by kind ("rerank", "search")
        self.overhead: dict[str, _Mean] = {}  # by kind: a search has the query's encoding and the coarse search
        self.lock = threading.Lock()

    @property
    def ms_per_token(self) -> float:
        """The decode rate (the dearer one), as reported."""
        return self.decode.mean

    @classmethod
    def calibrate(cls, reranker) -> "DeadlinePlanner":
        """One small rerank (two text candidates, a few thinking tokens) timed on this device."""
        from retrv.runtime.rerank.prompt import CandidateInput, QueryInput

        cands = [CandidateInput("a", "a red dress"), CandidateInput("b", "a blue car")]
        t = Timing.of(reranker.rerank(QueryInput("a dress"), cands, Budget(think=8, inspect=0, tool=0)))
        return cls(max(t.prefill_ms / max(t.prefill_tokens, 1), 1e-4), max(t.decode_ms / max(t.decode_tokens, 1), 1e-3))

    def observe(self, t: Timing, kind: str = "rerank") -> None:
        with self.lock:
            if t.prefill_tokens > 0:
                self.prefill.add(t.prefill_ms / t.prefill_tokens)
            if t.decode_tokens > 0:
                self.decode.add(t.decode_ms / t.decode_tokens)
            seen = ((self.prompt, t.needed_tokens),) if t.needed_tokens > 0 else ()
            for table, x in (*seen, (self.overhead, t.overhead_ms)):
                if kind in table:
                    table[kind].add(x)
                else:
                    table[kind] = _Mean(x)

    def plan(self, deadline_ms: float | None, elapsed_ms: float, base: Budget | None = None,
             kind: str = "rerank") -> tuple[Budget, dict]:
        """-> (the budget to rerank with, what `meta`/--json reports as "deadline")."""
        base = base or Budget()
        if deadline_ms is None:
            return base, {"deadline_ms": None}
        with self.lock:
            prefill, decode = self.prefill.mean, self.decode.high()
            prompt = self.prompt[kind].mean if kind in self.prompt else 0.0
            overhead = self.overhead[kind].mean if kind in self.overhead else 0.0
        left = max(deadline_ms - elapsed_ms - overhead, 0.0) * SAFETY
        spare = left - prompt * prefill - ANSWER_TOKENS * decode  # after the prompts and the answers
        fits = spare >= 0
        tokens = max(1, int(prompt + spare / decode)) if fits else 1
        if base.token is not None:
            tokens = min(tokens, base.token)
        budget = replace(base, token=tokens)
        return budget, {"deadline_ms": deadline_ms, "elapsed_ms": round(elapsed_ms, 3),
                        "overhead_ms": round(overhead, 3), "left_ms": round(left, 3),
                        "prompt_tokens": round(prompt), "ms_per_prefill_token": round(prefill, 4),
                        "ms_per_token": round(decode, 4), "prompt_fits": fits, "budget": budget.to_dict()}
