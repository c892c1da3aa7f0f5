"""The search-side subcommands: `retrv index build`, `retrv search`, `retrv eval`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def _budget(args):
    from retrv.runtime.budget import Budget

    return Budget(think=args.think_budget, inspect=args.inspect_budget, tool=args.tool_budget, token=args.token_budget)


def _retriever(args):
    from retrv.runtime.index import Index
    from retrv.runtime.pack import Pack
    from retrv.runtime.retriever import Retriever

    pack = Pack.open(args.pack)
    index = Index.open(args.index, pack=pack)
    return Retriever(pack, index, backend=args.backend, checkpoint=args.checkpoint, provider=args.provider)


def cmd_index_build(args) -> int:
    from retrv.runtime.index import Index
    from retrv.runtime.pack import Pack
    from retrv.runtime.retriever import CandidateEncoder, Components, open_backend

    pack = Pack.open(args.pack)
    backend = open_backend(pack, args.backend, checkpoint=args.checkpoint, provider=args.provider)
    index = Index.build(CandidateEncoder(Components(pack, backend)), args.corpus, args.index, m=args.m,
                        ef_construction=args.ef_construction, ef_search=args.ef_search)
    sizes = index.bytes_per_item()
    print(f"indexed {index.meta.count} candidates into {index.path} "
          f"({sizes['token_cache']:.0f} B/candidate of cached tokens, {sizes['ann']:.0f} B/candidate of HNSW)")
    return 0


def cmd_search(args) -> int:
    result = _retriever(args).search(text=args.text, image=args.image, k=args.k, budget=_budget(args),
                                     window=args.window, stride=args.stride, rerank=not args.no_rerank)
    d = result.to_dict()
    if args.json:
        print(json.dumps(d))
        return 0
    for i, r in enumerate(d["ranked"][:10], 1):
        print(f"{i:>3}. {r['did']}  (coarse #{r['coarse_rank'] + 1}, similarity {r['score']:.3f})")
    t = d["tokens"]
    print(f"answer {d['answer']}; {t['prefill_tokens']} prefill + {t['think_tokens']} think tokens, "
          f"{t['inspected']} inspected, exhausted {t['budget_exhausted'] or 'none'}", file=sys.stderr)
    for name, c in d["limits"].items():
        print(f"{name} {c['asked']} capped to {c['capped_to']}: {c['reason']}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from retrv.runtime.corpus import read_queries
    from retrv.runtime.evaluate import evaluate

    out = evaluate(_retriever(args), read_queries(args.queries), k=args.k, budget=_budget(args), window=args.window,
                   stride=args.stride, rerank=not args.no_rerank)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['queries']} queries")
    for name in ("coarse", "reranked"):
        if name in out:
            r = out[name]
            print(f"{name:<9} R@1 {r['recall@1']:.3f}  R@5 {r['recall@5']:.3f}  R@10 {r['recall@10']:.3f}")
    for name, wins in out.get("hard_negatives", {}).items():
        print(f"{name:<9} hard negatives ranked above the target: " + ", ".join(
            f"{kind} {w['wins']:.2f} ({w['pairs']})" for kind, w in wins.items()))
    if "tokens_per_query" in out:
        print("tokens/query " + ", ".join(f"{k} {v:.1f}" for k, v in out["tokens_per_query"].items()))
    for stage, s in out["latency_ms"].items():
        print(f"  {stage:<8} p50 {s['p50']:8.1f} ms  p95 {s['p95']:8.1f} ms")
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}; expected an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"got {value}; expected an integer >= 0")
    return value


def _backend_flags(p) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "trt", "torch"])
    p.add_argument("--checkpoint", default=None, help="source checkpoint, for --backend torch")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"], help="ONNX Runtime provider")


def _query_flags(p) -> None:
    p.add_argument("--pack", required=True)
    p.add_argument("--k", type=positive_int, default=50, help="coarse candidates to rerank")
    p.add_argument("--window", type=positive_int, default=20)
    p.add_argument("--stride", type=positive_int, default=10)
    # Budgets are ceilings: one larger than the windows' contexts can hold is capped, and --json reports it.
    p.add_argument("--think-budget", type=non_negative_int, default=128)
    p.add_argument("--inspect-budget", type=non_negative_int, default=3)
    p.add_argument("--tool-budget", type=non_negative_int, default=3)
    p.add_argument("--token-budget", type=positive_int, default=None,
                   help="tokens the decoder may process per query (default: as many as the windows' contexts hold)")
    p.add_argument("--no-rerank", action="store_true", help="coarse stage only")
    p.add_argument("--json", action="store_true")
    _backend_flags(p)


def register(sub) -> None:
    idx = sub.add_parser("index", help="build an index over a corpus")
    idx_sub = idx.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = idx_sub.add_parser("build", help="PACK CORPUS.jsonl INDEX")
    build.add_argument("pack")
    build.add_argument("corpus", help="M-BEIR candidate JSONL")
    build.add_argument("index", help="output index directory (replaced atomically)")
    build.add_argument("--m", type=positive_int, default=16)
    build.add_argument("--ef-construction", type=positive_int, default=200)
    build.add_argument("--ef-search", type=positive_int, default=200,
                       help="HNSW search breadth; 200 gives recall@10 >= 0.95 on 10k random vectors (bench/index.py)")
    _backend_flags(build)
    build.set_defaults(func=cmd_index_build)

    search = sub.add_parser("search", help="one query: coarse search, then the reasoning rerank")
    search.add_argument("index")
    search.add_argument("--text", default=None)
    search.add_argument("--image", default=None)
    _query_flags(search)
    search.set_defaults(func=cmd_search)

    ev = sub.add_parser("eval", help="Recall@1/5/10, tokens and latency over an M-BEIR query file")
    ev.add_argument("index")
    ev.add_argument("--queries", required=True)
    _query_flags(ev)
    ev.set_defaults(func=cmd_eval)
