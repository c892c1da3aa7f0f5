"""`retrv eval`: M-BEIR recall of the coarse stage and of the reranked list, tokens and latency per stage, and,
where queries list hard negatives, how often each kind of hard negative outranks the target in either list.

Both rankings come from the same run: the coarse order is what the HNSW stage returned, the reranked order what
the reasoning stage made of it, so the comparison costs one pass and shares every timing.

Beside the overall figures, `"mbeir"` breaks recall down as M-BEIR reports it: per task (`"cirr_task7"`: dataset
from the qid, task from `task_id`) and per dataset, with M-BEIR's own metric (Recall@5; Recall@10 for Fashion200K
and FashionIQ), and the paper-style average: the mean over tasks of each task's own metric. Local pools are one
index per query file (`retriever` a sequence, one per query); the global pool is one index for all of them.
"""

from __future__ import annotations

import numpy as np

from retrv.runtime.rerank.budget import DEFAULT_K, DEFAULT_STRIDE, DEFAULT_WINDOW, Budget
from retrv.runtime.inputs.corpus import Query, dataset_label, task_label
from retrv.runtime.errors import InputError
from retrv.runtime.metrics import LatencyLog, grouped_recall, hard_negative_wins, mbeir_k, recall_at_k

KS = (1, 5, 10)


def evaluate(retriever, queries: list[Query], k: int = DEFAULT_K, budget: Budget | None = None,
             window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, rerank: bool = True, progress=None) -> dict:
    """`retriever`: one `Retriever` for every query, or a sequence holding one per query (local pools: each query
    searched in its own task's index). `progress(done, total)` is called after each query."""
    if not hasattr(retriever, "search") and len(retriever) != len(queries):
        raise InputError(f"retriever: got {len(retriever)} retrievers for {len(queries)} queries; expected one each")
    coarse, final, positives = [], [], []
    log = LatencyLog()
    tokens = {"prefill_tokens": [], "think_tokens": [], "inspected": [], "total_tokens": []}
    fallbacks = forced = 0
    limits: dict[str, dict] = {}  # requests capped to fit (the first query's cap of each name)
    for i, q in enumerate(queries):
        r = retriever if hasattr(retriever, "search") else retriever[i]
        res = r.search(text=q.query_txt, image=q.query_img_path, k=k, budget=budget, window=window,
                               stride=stride, rerank=rerank)
        coarse.append([r["did"] for r in sorted(res.ranked, key=lambda r: r["coarse_rank"])])
        final.append([r["did"] for r in res.ranked])
        positives.append(set(q.pos_cand_list))
        log.add(res.timings_ms)
        d = res.to_dict(trace=False)
        for key in tokens:
            tokens[key].append(d["tokens"][key])
        fallbacks += d["flags"]["fallback"]
        for name, c in d["limits"].items():
            limits.setdefault(name, c)
        forced += d["flags"]["forced_answer"]
        if progress:
            progress(i + 1, len(queries))
    out = {
        "queries": len(queries),
        "coarse": recall_at_k(coarse, positives, KS),
        "latency_ms": log.summary(),
        "settings": {"k": k, "window": window, "stride": stride, "rerank": rerank,
                     "budget": (budget or Budget()).to_dict()},
        "limits": limits,
    }
    negatives = [list(q.neg_cand_list) for q in queries]
    if any(negatives):
        types = [q.extra.get("neg_types") for q in queries]
        for q, t in zip(queries, types):
            if t is not None and not (isinstance(t, list) and all(isinstance(x, str) for x in t)):
                raise InputError(f"query {q.qid}: neg_types is {t!r}; expected a list of strings, one per negative")
        types = types if any(t is not None for t in types) else None
        out["hard_negatives"] = {"coarse": hard_negative_wins(coarse, positives, negatives, types)}
        if rerank:
            out["hard_negatives"]["reranked"] = hard_negative_wins(final, positives, negatives, types)
    out["mbeir"] = mbeir_breakdown(queries, {"coarse": coarse, **({"reranked": final} if rerank else {})}, positives)
    if rerank:
        out["reranked"] = recall_at_k(final, positives, KS)
        out["tokens_per_query"] = {key: float(np.mean(v)) if v else 0.0 for key, v in tokens.items()}
        out["fallback_rate"] = fallbacks / max(1, len(queries))
        out["forced_rate"] = forced / max(1, len(queries))
    return out


def mbeir_breakdown(queries: list[Query], rankings: dict[str, list[list[str]]], positives: list[set[str]]) -> dict:
    """{"tasks": {task: row}, "datasets": {dataset: row}, "average": {...}} where a row is {"dataset", "metric",
    "queries", "skipped", and per ranking name ("coarse", "reranked") {"recall@1", "recall@5", "recall@10",
    "mbeir"}}; a group with no positive at all has null rankings and stays out of the average."""
    tasks, datasets = [task_label(q) for q in queries], [dataset_label(q) for q in queries]
    dataset_of = dict(zip(tasks, datasets))
    task_ids = {t: q.task_id for t, q in zip(tasks, queries)}
    out: dict = {"tasks": {}, "datasets": {}}
    for kind, names in (("tasks", tasks), ("datasets", datasets)):
        for name, ranked in rankings.items():
            for group, r in grouped_recall(ranked, positives, names, KS).items():
                ds = dataset_of[group] if kind == "tasks" else group
                metric = f"recall@{mbeir_k(ds)}"
                row = out[kind].setdefault(group, {"dataset": ds, "metric": metric, "queries": r["queries"],
                                                   "skipped": r["skipped"]})
                if kind == "tasks":
                    row["task_id"] = task_ids[group]
                row[name] = {**{f"recall@{k}": r[f"recall@{k}"] for k in KS}, "mbeir": r[metric]} \
                    if r["queries"] else None
    scored = [row for row in out["tasks"].values() if row["queries"]]
    out["average"] = {"tasks": len(scored), **{
        name: float(np.mean([row[name]["mbeir"] for row in scored])) if scored else None for name in rankings}}
    return out
