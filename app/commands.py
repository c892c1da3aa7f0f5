"""The search-side subcommands: `retrv index build|add|delete|info`, `retrv search`, `retrv eval`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def _budget(args):
    from retrv.runtime.rerank.budget import Budget

    return Budget(think=args.think_budget, inspect=args.inspect_budget, tool=args.tool_budget, token=args.token_budget)


def _retriever(args):
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack
    from retrv.runtime.retriever import Retriever

    pack = Pack.open(args.pack)
    index = Index.open(args.index, pack=pack)
    return Retriever(pack, index, backend=args.backend, **_backend_kwargs(args))


def _backend_kwargs(args) -> dict:
    _load_backend(args.backend)
    return {"checkpoint": args.checkpoint, "provider": args.provider}


def _load_backend(name: str) -> None:
    """The PyTorch fallback lives above the runtime; load it (it registers itself) when it may be used."""
    if name == "torch":
        from retrv.runtime.errors import require

        require("torch", "export")
        import retrv.export.torch_backend  # noqa: F401


def cmd_index_build(args) -> int:
    from retrv.runtime.outputs import check_output

    check_output(args.index, "index", {"the pack": args.pack, "the corpus": args.corpus})
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack

    pack = Pack.open(args.pack)
    index = Index.build(pack, args.corpus, args.index, m=args.m, ef_construction=args.ef_construction,
                        ef_search=args.ef_search, image_root=args.image_root, backend=args.backend,
                        **_backend_kwargs(args))
    sizes = index.bytes_per_item()
    print(f"indexed {index.meta.count} candidates into {index.path} "
          f"({sizes['token_cache']:.0f} B/candidate of cached tokens, {sizes['ann']:.0f} B/candidate of HNSW)")
    return 0


def cmd_index_add(args) -> int:
    from retrv.runtime.inputs.corpus import read_candidates
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack

    pack = Pack.open(args.pack)
    index = Index.open(args.index, pack=pack, backend=args.backend, **_backend_kwargs(args))
    cands = read_candidates(args.corpus, image_root=args.image_root)
    gen = index.add(cands)
    print(f"added {len(cands)} candidates to {index.path}: generation {gen}, {index.meta.count} live")
    return 0


def cmd_index_delete(args) -> int:
    from retrv.runtime.index.store import Index

    index = Index.open(args.index)
    gen = index.delete(args.ids)
    print(f"deleted {len(set(args.ids))} candidates from {index.path}: generation {gen}, {index.meta.count} live")
    return 0


def cmd_index_info(args) -> int:
    from retrv.runtime.index.store import Index

    info = Index.open(args.index, verify="size" if args.quick else "full").info()
    if args.json:
        print(json.dumps(info))
        return 0
    b = info.pop("bytes_per_item")
    for k, v in info.items():
        print(f"{k:<18} {v}")
    print(f"{'bytes/candidate':<18} tokens {b['token_cache']:.0f}, HNSW {b['ann']:.0f}, rows {b['rows']:.0f}")
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
    from retrv.runtime.inputs.corpus import read_queries
    from retrv.runtime.evaluate import evaluate

    queries = read_queries(args.queries, image_root=args.image_root)
    out = evaluate(_retriever(args), queries, k=args.k, budget=_budget(args), window=args.window,
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


# The most candidates a query may ask for (--k): hnswlib searches with a beam ef >= k, the same bound as
# retrv.runtime.index.ann.MAX_EF; a million candidates is already past anything a reranker could read.
MAX_K = 1_000_000
SEED_MAX = 2**32 - 1  # numpy's legacy seeding and torch.manual_seed both take any 32-bit value


def int_in(lo: int, hi: int | None = None):
    """An argparse `type` for an integer in [lo, hi]; anything else is argparse's one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also a 5,000-digit number (Python's int-from-str limit)
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            bound = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise argparse.ArgumentTypeError(f"got {shown!r}; expected {bound}")
        return value

    parse.__name__ = f"int_in_{lo}_{hi}"
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)


def _backend_flags(p) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "trt", "torch"])
    p.add_argument("--checkpoint", default=None, help="source checkpoint, for --backend torch")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"], help="ONNX Runtime provider")


def _query_flags(p) -> None:
    from retrv.runtime.rerank.budget import DEFAULT_K, DEFAULT_STRIDE, DEFAULT_WINDOW, Budget

    p.add_argument("--pack", required=True)
    p.add_argument("--k", type=int_in(1, MAX_K), default=DEFAULT_K, help="coarse candidates to rerank")
    p.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW)
    p.add_argument("--stride", type=positive_int, default=DEFAULT_STRIDE)
    # Budgets are ceilings: one larger than the windows' contexts can hold is capped, and --json reports it.
    p.add_argument("--think-budget", type=non_negative_int, default=Budget.think)
    p.add_argument("--inspect-budget", type=non_negative_int, default=Budget.inspect)
    p.add_argument("--tool-budget", type=non_negative_int, default=Budget.tool)
    p.add_argument("--token-budget", type=positive_int, default=None,
                   help="tokens the decoder may process per query (default: as many as the windows' contexts hold)")
    p.add_argument("--no-rerank", action="store_true", help="coarse stage only")
    p.add_argument("--json", action="store_true")
    _backend_flags(p)


def register(sub) -> None:
    from retrv.runtime.index.ann import MAX_EF, MAX_M
    from retrv.runtime.index.store import DEFAULT_EF_CONSTRUCTION, DEFAULT_EF_SEARCH, DEFAULT_M

    idx = sub.add_parser("index", help="build, change and inspect an index")
    idx_sub = idx.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = idx_sub.add_parser("build", help="PACK CORPUS.jsonl INDEX: a new index over a corpus")
    build.add_argument("pack")
    build.add_argument("corpus", help="M-BEIR candidate JSONL")
    build.add_argument("index", help="output index directory: new, empty, or an index (replaced atomically)")
    build.add_argument("--m", type=int_in(2, MAX_M), default=DEFAULT_M)
    build.add_argument("--ef-construction", type=int_in(1, MAX_EF), default=DEFAULT_EF_CONSTRUCTION)
    build.add_argument("--ef-search", type=int_in(1, MAX_EF), default=DEFAULT_EF_SEARCH,
                       help="HNSW search breadth; 200 gives recall@10 0.92 on 10k random 128-d vectors, the worst "
                            "case (bench/index.py)")
    build.add_argument("--image-root", default=None,
                       help="resolve relative image paths against this folder (default: the JSONL's folder)")
    _backend_flags(build)
    build.set_defaults(func=cmd_index_build)

    add = idx_sub.add_parser("add", help="INDEX CORPUS.jsonl --pack PACK: add candidates (crash-safe)")
    add.add_argument("index")
    add.add_argument("corpus", help="M-BEIR candidate JSONL of new candidates")
    add.add_argument("--pack", required=True, help="the pack the index was built with")
    add.add_argument("--image-root", default=None,
                     help="resolve relative image paths against this folder (default: the JSONL's folder)")
    _backend_flags(add)
    add.set_defaults(func=cmd_index_add)

    delete = idx_sub.add_parser("delete", help="INDEX --ids DID [DID ...]: delete candidates (crash-safe)")
    delete.add_argument("index")
    delete.add_argument("--ids", nargs="+", required=True, metavar="DID")
    delete.set_defaults(func=cmd_index_delete)

    info = idx_sub.add_parser("info", help="INDEX: verify an index and print its facts")
    info.add_argument("index")
    info.add_argument("--quick", action="store_true", help="check sizes only, do not hash the files")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_index_info)

    search = sub.add_parser("search", help="one query: coarse search, then the reasoning rerank")
    search.add_argument("index")
    search.add_argument("--text", default=None)
    search.add_argument("--image", default=None)
    _query_flags(search)
    search.set_defaults(func=cmd_search)

    ev = sub.add_parser("eval", help="Recall@1/5/10, tokens and latency over an M-BEIR query file")
    ev.add_argument("index")
    ev.add_argument("--queries", required=True)
    ev.add_argument("--image-root", default=None,
                    help="resolve the queries' relative image paths against this folder (default: the JSONL's folder)")
    _query_flags(ev)
    ev.set_defaults(func=cmd_eval)
