"""Retrieval metrics (M-BEIR's Recall@k) and latency summaries (percentiles per stage). numpy + stdlib only.

Recall@k follows M-BEIR (PAPERS.md): a query scores 1 if ANY of its positives is among the first k ranked ids,
else 0, and Recall@k is the mean over queries. It is a hit rate, not the fraction of a query's positives found:
a query with three positives and one of them at rank 2 scores 1 at k = 5. Values are fractions in [0, 1]
(M-BEIR's tables print percentages: multiply by 100). A query with no positives cannot be scored; it is left out
of every mean and counted under "skipped", so that a results table shows it instead of hiding a 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np

from retrv.runtime.errors import InputError

DEFAULT_KS = (1, 5, 10)  # M-BEIR reports R@5 (R@10 for Fashion200K t->i / i->t and FashionIQ); R@1 is Retrv-R1's pick
DEFAULT_PS = (50, 95)
# M-BEIR's own metric is Recall@5, except Recall@10 for these datasets (names lower case, as in M-BEIR's file names):
# their captions describe many near-identical products, so the benchmark looks deeper.
MBEIR_RECALL_AT_10 = ("fashion200k", "fashioniq")


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise InputError(f"ks: got {ks!r}; expected one or more integers >= 1")
    return ks


def recall_at_k(ranked: Sequence[Sequence[str]], positives: Sequence[Iterable[str]],
                ks: Iterable[int] = DEFAULT_KS) -> dict[str, float | int]:
    """M-BEIR Recall@k over queries: `ranked[q]` is query q's ranking (best first), `positives[q]` its positive ids.

    Returns {"recall@1": ..., "recall@5": ..., "queries": scored queries, "skipped": queries with no positive}.
    Raises `InputError` if the two lists differ in length or if no query has a positive (recall is undefined).
    """
    ks = _check_ks(ks)
    if len(ranked) != len(positives):
        raise InputError(f"ranked: got {len(ranked)} rankings for {len(positives)} positive sets; expected one each")
    hits = dict.fromkeys(ks, 0)
    scored = skipped = 0
    for q, (ranking, pos) in enumerate(zip(ranked, positives)):
        if isinstance(ranking, str) or isinstance(pos, str):  # a bare id would be iterated character by character
            raise InputError(f"query {q}: got a string; expected a list of ranked ids and a set of positive ids")
        pos = set(pos)
        if not pos:
            skipped += 1
            continue
        scored += 1
        # Rank (1-based) of the first positive; inf when none was retrieved.
        first = next((r for r, cid in enumerate(ranking, start=1) if cid in pos), math.inf)
        for k in ks:
            hits[k] += first <= k
    if scored == 0:
        raise InputError(f"positives: none of the {len(positives)} queries has a positive; expected at least one")
    out: dict[str, float | int] = {f"recall@{k}": hits[k] / scored for k in ks}
    out["queries"] = scored
    out["skipped"] = skipped
    return out


def mbeir_k(dataset: str) -> int:
    """The k of M-BEIR's metric for a dataset (`"cirr"` -> 5, `"fashioniq"` -> 10)."""
    return 10 if dataset.lower() in MBEIR_RECALL_AT_10 else 5


def grouped_recall(ranked: Sequence[Sequence[str]], positives: Sequence[Iterable[str]], groups: Sequence[str],
                   ks: Iterable[int] = DEFAULT_KS) -> dict[str, dict[str, float | int]]:
    """`recall_at_k` per group (`groups[q]` names query q's: a task, a dataset), in first-seen order. A group none
    of whose queries has a positive reports {"queries": 0, "skipped": n} and no recall."""
    if len(groups) != len(ranked):
        raise InputError(f"groups: got {len(groups)} names for {len(ranked)} rankings; expected one each")
    members: dict[str, list[int]] = {}
    for q, g in enumerate(groups):
        members.setdefault(g, []).append(q)
    out = {}
    for g, qs in members.items():
        pos = [positives[q] for q in qs]
        if any(set(p) for p in pos):
            out[g] = recall_at_k([ranked[q] for q in qs], pos, ks)
        else:
            out[g] = {"queries": 0, "skipped": len(qs)}
    return out


def hard_negative_wins(ranked: Sequence[Sequence[str]], positives: Sequence[Iterable[str]],
                       negatives: Sequence[Sequence[str]], types: Sequence[Sequence[str] | None] | None = None
                       ) -> dict[str, dict[str, float | int]]:
    """How often a query's labelled hard negative outranks its best-ranked positive, overall and per negative type.

    `negatives[q]` are query q's hard negatives (M-BEIR's `neg_cand_list`); `types[q]`, when given, names each one
    (the synthetic data's `neg_types`: "colour", "position", ...). A negative that was not retrieved ranks below
    everything retrieved; a pair where neither the positive nor the negative was retrieved says nothing and is left
    out. Returns {"all": {"wins": fraction, "pairs": n}, type: {...}, ...}; {} when no pair could be scored. Where
    recall says how often a method is right, this says which look-alike it is fooled by.
    """
    if len(negatives) != len(ranked) or len(positives) != len(ranked):
        raise InputError(f"negatives: got {len(negatives)} lists for {len(ranked)} rankings and {len(positives)} "
                         "positive sets; expected one each")
    if types is not None and len(types) != len(ranked):
        raise InputError(f"types: got {len(types)} lists for {len(ranked)} rankings; expected one each")
    wins: dict[str, int] = {}
    pairs: dict[str, int] = {}
    for q, (ranking, pos, negs) in enumerate(zip(ranked, positives, negatives)):
        named = types[q] if types is not None else None
        if named is not None and len(named) != len(negs):
            raise InputError(f"query {q}: got {len(named)} negative types for {len(negs)} negatives; expected one "
                             "each")
        if named is not None and "all" in named:
            raise InputError(f"query {q}: a negative type is named 'all'; expected another name ('all' is the total)")
        pos = set(pos)
        if not pos:
            continue
        rank = {cid: r for r, cid in reversed(list(enumerate(ranking)))}  # first occurrence wins
        best = min((rank[c] for c in pos if c in rank), default=math.inf)
        for j, neg in enumerate(negs):
            r = rank.get(neg, math.inf)
            if best == math.inf and r == math.inf:
                continue
            for key in ("all", named[j]) if named is not None else ("all",):
                pairs[key] = pairs.get(key, 0) + 1
                wins[key] = wins.get(key, 0) + (r < best)
    return {key: {"wins": wins[key] / n, "pairs": n} for key, n in pairs.items()}


def _pkey(p: float) -> str:
    return f"p{p:g}"  # 50 -> "p50", 99.9 -> "p99.9"


def percentiles(samples_ms: Sequence[float], ps: Iterable[float] = DEFAULT_PS) -> dict[str, float]:
    """{"p50": ..., "p95": ...} of the samples with numpy's "linear" interpolation (its default: the p-th
    percentile of n sorted samples sits at position p/100 * (n - 1))."""
    ps = tuple(ps)
    if not ps or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 100 for p in ps):
        raise InputError(f"ps: got {ps!r}; expected one or more percentiles in [0, 100]")
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise InputError(f"samples_ms: got {x.size} values (shape {x.shape}, finite: {bool(np.isfinite(x).all())}); "
                         f"expected a non-empty list of finite timings")
    values = np.percentile(x, ps, method="linear")
    return {_pkey(p): float(v) for p, v in zip(ps, values)}


class StageTimer:
    """Times the stages of one query: `with t("prefill"): ...`. A stage entered twice (prefill of each sliding
    window) accumulates. `timings` is {stage: milliseconds}, in first-entry order."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            ms = (time.perf_counter() - start) * 1e3
            self.timings[stage] = self.timings.get(stage, 0.0) + ms


class LatencyLog:
    """Per-stage timings across queries. Stage names are free-form (embed, search, vision, icm, prefill, decode,
    total, ...); a query that skips a stage (no ICM in V-Retrver) simply adds no sample to it.

        log = LatencyLog()
        for query in queries:
            t = StageTimer()
            with t("total"):
                with t("embed"): ...
            log.add(t.timings)
        log.summary()   # {"embed": {"n": 100, "mean": ..., "p50": ..., "p95": ...}, ...}
    """

    def __init__(self) -> None:
        self._samples: dict[str, list[float]] = {}
        self._queries = 0

    def add(self, timings_ms: Mapping[str, float]) -> None:
        """Record one query's timings, {stage: milliseconds}."""
        if not isinstance(timings_ms, Mapping):
            raise InputError(f"timings_ms: got {type(timings_ms).__name__}; expected a mapping stage -> ms")
        for stage, ms in timings_ms.items():
            if not isinstance(stage, str) or not stage:
                raise InputError(f"stage name: got {stage!r}; expected a non-empty string")
            if isinstance(ms, bool) or not isinstance(ms, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(ms) or ms < 0:
                raise InputError(f"stage {stage!r}: got {ms!r}; expected a finite time in ms >= 0")
        for stage, ms in timings_ms.items():
            self._samples.setdefault(stage, []).append(float(ms))
        self._queries += 1

    def __len__(self) -> int:
        """Queries recorded."""
        return self._queries

    @property
    def stages(self) -> list[str]:
        return list(self._samples)

    def samples(self, stage: str) -> list[float]:
        if stage not in self._samples:
            raise InputError(f"stage {stage!r}: no timings recorded; expected one of {self.stages}")
        return list(self._samples[stage])

    def summary(self, ps: Iterable[float] = DEFAULT_PS) -> dict[str, dict[str, float]]:
        """{stage: {"n": samples, "mean": ms, "p50": ms, "p95": ms}} for every stage seen, in first-seen order."""
        ps = tuple(ps)
        return {stage: {"n": len(x), "mean": float(np.mean(x)), **percentiles(x, ps)}
                for stage, x in self._samples.items()}
