"""`retrv eval`: M-BEIR recall of the coarse stage and of the reranked list, tokens and latency per stage.

Both rankings come from the same run: the coarse order is what the HNSW stage returned, the reranked order what
the reasoning stage made of it, so the comparison costs one pass and shares every timing.
"""

from __future__ import annotations

import numpy as np

from retrv.runtime.budget import Budget
from retrv.runtime.corpus import Query
from retrv.runtime.metrics import LatencyLog, recall_at_k

KS = (1, 5, 10)


def evaluate(retriever, queries: list[Query], k: int = 50, budget: Budget | None = None, window: int = 20,
             stride: int = 10, rerank: bool = True, progress=None) -> dict:
    coarse, final, positives = [], [], []
    log = LatencyLog()
    tokens = {"prefill_tokens": [], "think_tokens": [], "inspected": [], "total_tokens": []}
    fallbacks = forced = 0
    for i, q in enumerate(queries):
        res = retriever.search(text=q.query_txt, image=q.query_img_path, k=k, budget=budget, window=window,
                               stride=stride, rerank=rerank)
        coarse.append([r["did"] for r in sorted(res.ranked, key=lambda r: r["coarse_rank"])])
        final.append([r["did"] for r in res.ranked])
        positives.append(set(q.pos_cand_list))
        log.add(res.timings_ms)
        d = res.to_dict(trace=False)
        for key in tokens:
            tokens[key].append(d["tokens"][key])
        fallbacks += d["flags"]["fallback"]
        forced += d["flags"]["forced_answer"]
        if progress:
            progress(i + 1, len(queries))
    out = {
        "queries": len(queries),
        "coarse": recall_at_k(coarse, positives, KS),
        "latency_ms": log.summary(),
        "settings": {"k": k, "window": window, "stride": stride, "rerank": rerank,
                     "budget": (budget or Budget()).to_dict()},
    }
    if rerank:
        out["reranked"] = recall_at_k(final, positives, KS)
        out["tokens_per_query"] = {key: float(np.mean(v)) if v else 0.0 for key, v in tokens.items()}
        out["fallback_rate"] = fallbacks / max(1, len(queries))
        out["forced_rate"] = forced / max(1, len(queries))
    return out
