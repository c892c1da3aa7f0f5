"""Evaluate a checkpoint the way a user would run it: export a pack, build an index, `retrv eval`.

Everything goes through the shipped runtime (ONNX Runtime when installed, the int8 token cache, HNSW, the
Reranker with its budgets), so the figures in CARD.md are what `retrv eval` prints for the same data, not numbers
from the training code's own forward passes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from retrv.runtime.rerank.budget import Budget
from retrv.runtime.inputs.corpus import read_queries

log = logging.getLogger(__name__)

K = 10  # coarse candidates reranked: one window of 10 (the synthetic pool per target is 8 images)
THINK = 128  # the runtime's default think budget
INSPECT = 3  # the runtime's default inspection budget
EF_SEARCH = 200  # HNSW breadth: exact on a few thousand items, so coarse recall is the embedder's, not the index's
THREADS = 1  # as in training: on a shared CPU one thread per session ran faster than two waiting on each other


def _open(pack_dir: Path, backend: str):
    from retrv.runtime.pack import Pack
    from retrv.runtime.backends import open_backend

    pack = Pack.open(pack_dir)
    return pack, open_backend(pack, backend, threads=THREADS, cache_dir=None)


def build_index(pack_dir: Path, backend: str, corpus: Path, out: Path):
    from retrv.runtime.index.store import Index
    from retrv.runtime.retriever import CandidateEncoder, Components

    pack, be = _open(pack_dir, backend)
    index = Index.build(CandidateEncoder(Components(pack, be)), corpus, out, ef_search=EF_SEARCH)
    return pack, be, index


def _summary(out: dict) -> dict:
    keep = {"queries": out["queries"], "coarse": out["coarse"]}
    for key in ("reranked", "tokens_per_query", "fallback_rate", "forced_rate", "hard_negatives"):
        if key in out:
            keep[key] = out[key]
    keep["latency_ms_p50"] = {stage: s["p50"] for stage, s in out["latency_ms"].items()}
    return keep


def _merge_wins(parts: list[dict]) -> dict:
    """Pair-weighted union of `hard_negative_wins` results."""
    wins, pairs = {}, {}
    for part in parts:
        for kind, w in part.items():
            pairs[kind] = pairs.get(kind, 0) + w["pairs"]
            wins[kind] = wins.get(kind, 0.0) + w["wins"] * w["pairs"]
    return {kind: {"wins": wins[kind] / n, "pairs": n} for kind, n in pairs.items()}


def combine(parts: list[dict]) -> dict:
    """Query-weighted means of per-task results (every figure `evaluate` reports is a mean over queries)."""
    n = sum(p["queries"] for p in parts)

    def mean(get):
        return sum(get(p) * p["queries"] for p in parts) / n

    out = {"queries": n}
    for key in ("coarse", "reranked", "tokens_per_query"):
        if key in parts[0]:
            out[key] = {k: mean(lambda p: p[key][k]) for k in parts[0][key]}
    for key in ("fallback_rate", "forced_rate"):
        if key in parts[0]:
            out[key] = mean(lambda p: p[key])
    if all("hard_negatives" in p for p in parts):
        out["hard_negatives"] = {stage: _merge_wins([p["hard_negatives"].get(stage, {}) for p in parts])
                                 for stage in parts[0]["hard_negatives"]}
    out["latency_ms_p50"] = {k: mean(lambda p: p["latency_ms_p50"][k]) for k in parts[0]["latency_ms_p50"]}
    return out


def run_eval(pack, backend, index, queries, budget: Budget) -> dict:
    from retrv.runtime.evaluate import evaluate
    from retrv.runtime.retriever import Retriever

    retriever = Retriever(pack, index, backend=backend)
    return _summary(evaluate(retriever, queries, k=K, budget=budget, window=K, stride=K))


def evaluate_synthetic(pack_dir: Path, data: Path, work: Path, backend: str = "auto", split: str = "test",
                       report=print) -> dict:
    """Coarse vs rerank without inspection (inspect budget 0) vs rerank with inspection, per task and overall."""
    t0 = time.perf_counter()
    pack, be, index = build_index(pack_dir, backend, data / f"corpus_{split}.jsonl", work / f"index-{split}")
    report(f"  indexed {index.meta.count} {split} candidates ({time.perf_counter() - t0:.0f} s)")
    queries = read_queries(data / f"queries_{split}.jsonl")
    out = {}
    for name, budget in (("with_inspection", Budget(think=THINK, inspect=INSPECT)),
                         ("without_inspection", Budget(think=THINK, inspect=0))):
        t0 = time.perf_counter()
        out[name] = {f"task{task}": run_eval(pack, be, index, [q for q in queries if q.task_id == task], budget)
                     for task in sorted({q.task_id for q in queries})}
        out[name]["all"] = combine(list(out[name].values()))
        r = out[name]["all"]
        report(f"  {split} {name}: coarse R@1 {r['coarse']['recall@1']:.3f}, reranked R@1 "
               f"{r['reranked']['recall@1']:.3f}, {r['tokens_per_query']['total_tokens']:.0f} tokens/query "
               f"({time.perf_counter() - t0:.0f} s)")
    return out


def evaluate_flickr(pack_dir: Path, src: Path, work: Path, n_queries: int, seed: int, backend: str = "auto",
                    report=print) -> dict:
    """Text -> image on real photographs: the converter's corpus, `n_queries` seeded captions."""
    from retrv.train.flickr8k import convert_flickr8k

    t0 = time.perf_counter()
    manifest = convert_flickr8k(src, work / "flickr8k", n_queries=n_queries, seed=seed, overwrite=True)
    pack, be, index = build_index(pack_dir, backend, work / "flickr8k" / "corpus.jsonl", work / "index-flickr8k")
    report(f"  indexed {index.meta.count} Flickr8k photos ({time.perf_counter() - t0:.0f} s)")
    queries = read_queries(work / "flickr8k" / "queries.jsonl")
    t0 = time.perf_counter()
    out = run_eval(pack, be, index, queries, Budget(think=THINK, inspect=INSPECT))
    out["n_images"] = manifest["n_images"]
    report(f"  flickr8k: coarse R@1/5/10 {out['coarse']['recall@1']:.3f}/{out['coarse']['recall@5']:.3f}/"
           f"{out['coarse']['recall@10']:.3f}, reranked {out['reranked']['recall@1']:.3f}/"
           f"{out['reranked']['recall@5']:.3f}/{out['reranked']['recall@10']:.3f} ({time.perf_counter() - t0:.0f} s)")
    return out
