"""Deadlines in milliseconds -> token budgets: the latency-SLO planner shared by `retrv serve` (`deadline_ms`) and
`retrv search --deadline-ms`.

The reranker's cost is close to linear in the tokens the decoder processes (prompt prefill, thinking, inspected
candidates' tokens), so a deadline becomes a `Budget.token`:

    tokens = (deadline - elapsed - overhead) * SAFETY / cost_per_token

`elapsed`: what the request has already spent (queue wait, image decoding) when the plan is made; `overhead`: the
work still to come that no token budget bounds (the query's vision and embedding, the coarse search, answer
parsing), an average of measured values; `cost_per_token`: the per-token cost on this device, measured at start-up
(`calibrate`) and kept current from finished requests (`observe`), planned at its mean plus two deviations so a
slower-than-usual request (another process on the cores, a longer window) still fits. A budget too small for a
window's prompt makes that window keep its coarse order (reported as exhausted), so a tight deadline answers the
coarse ranking rather than late.

Light on purpose (numpy-free, no model imports): the server and the CLI import it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

from retrv.runtime.errors import InputError
from retrv.runtime.rerank.budget import Budget

SAFETY = 0.85  # the share of what is left that the plan spends: timer and scheduling jitter the averages miss
SMOOTHING = 0.2  # weight of a new observation in the running averages: about the last 5 requests dominate
DEVIATIONS = 2.0  # plan at mean + 2 sigma of the per-token cost: ~95% of requests are no slower than planned
MAX_DEADLINE_MS = 3_600_000.0  # an hour: beyond it a deadline means nothing a request could use


def check_deadline(value, name: str = "deadline_ms") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_DEADLINE_MS:
        raise InputError(f"{name}: got {value!r}; expected milliseconds in (0, {MAX_DEADLINE_MS:,.0f}]")
    return float(value)


class DeadlinePlanner:
    """Thread-safe: `observe` may be called from every worker thread."""

    def __init__(self, ms_per_token: float) -> None:
        if not ms_per_token > 0:
            raise InputError(f"ms_per_token: got {ms_per_token!r}; expected a positive number")
        self.ms_per_token = float(ms_per_token)
        self.var_per_token = 0.0  # running variance of the per-token cost
        self.overhead_ms: dict[str, float] = {}  # per kind of request ("rerank", "search"): they differ in it
        self.lock = threading.Lock()

    @classmethod
    def calibrate(cls, reranker) -> "DeadlinePlanner":
        """One small rerank (two text candidates, a few thinking tokens) timed on this device."""
        import time

        from retrv.runtime.rerank.prompt import CandidateInput, QueryInput

        cands = [CandidateInput("a", "a red dress"), CandidateInput("b", "a blue car")]
        t0 = time.perf_counter()
        r = reranker.rerank(QueryInput("a dress"), cands, Budget(think=8, inspect=0, tool=0))
        ms = (time.perf_counter() - t0) * 1e3
        return cls(max(ms / max(r.usage.token, 1), 1e-3))

    def observe(self, ms: float, tokens: int, overhead_ms: float | None = None, kind: str = "rerank") -> None:
        """A finished request: `ms` spent in the rerank on `tokens` decoder tokens, and `overhead_ms` spent after
        the plan on work the budget does not bound."""
        with self.lock:
            if tokens > 0:
                x = ms / tokens
                d = x - self.ms_per_token
                self.ms_per_token += SMOOTHING * d
                self.var_per_token = (1 - SMOOTHING) * (self.var_per_token + SMOOTHING * d * d)
            if overhead_ms is not None:
                old = self.overhead_ms.get(kind)
                self.overhead_ms[kind] = overhead_ms if old is None else old + SMOOTHING * (overhead_ms - old)

    def planned_ms_per_token(self) -> float:
        return self.ms_per_token + DEVIATIONS * math.sqrt(self.var_per_token)

    def plan(self, deadline_ms: float | None, elapsed_ms: float, base: Budget | None = None,
             kind: str = "rerank") -> tuple[Budget, dict]:
        """-> (the budget to rerank with, what `meta`/--json reports as "deadline")."""
        base = base or Budget()
        if deadline_ms is None:
            return base, {"deadline_ms": None}
        with self.lock:
            cost, overhead = self.planned_ms_per_token(), self.overhead_ms.get(kind, 0.0)
        left = max(deadline_ms - elapsed_ms - overhead, 0.0)
        tokens = max(1, int(SAFETY * left / cost))
        if base.token is not None:
            tokens = min(tokens, base.token)
        budget = replace(base, token=tokens)
        return budget, {"deadline_ms": deadline_ms, "elapsed_ms": round(elapsed_ms, 3),
                        "overhead_ms": round(overhead, 3), "left_ms": round(left, 3),
                        "ms_per_token": round(cost, 4), "budget": budget.to_dict()}
