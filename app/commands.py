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
    return {"checkpoint": args.checkpoint, "provider": args.provider, **thread_kwargs(args)}


def thread_kwargs(args) -> dict:
    """--threads / --inter-op-threads as `open_backend`'s keywords (ONNX Runtime's; other backends ignore them)."""
    return {"threads": args.threads, "inter_op_threads": args.inter_op_threads}


def _load_backend(name: str) -> None:
    """The PyTorch fallback lives above the runtime; load it (it registers itself) when it may be used."""
    if name == "torch":
        from retrv.runtime.errors import require

        require("torch", "export")
        import retrv.export.torch_backend  # noqa: F401


def progress_bar(total: int, unit: str, desc: str):
    """A tqdm progress bar on stderr, off when stderr is not a terminal (logs, pipes, tests)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


class _CountingEncoder:
    """A candidate encoder that advances a progress bar by each batch it encodes; everything else is the
    encoder's own (dim, pack_sha256, ...). Index.build/add encode in batches and take any such encoder."""

    def __init__(self, encoder, bar) -> None:
        self.encoder, self.bar = encoder, bar

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)

    def encode(self, cands):
        out = self.encoder.encode(cands)
        self.bar.update(len(cands))
        return out


def _encoder(pack, args):
    from retrv.runtime.backends import open_backend
    from retrv.runtime.retriever import CandidateEncoder, Components

    return CandidateEncoder(Components(pack, open_backend(pack, args.backend, **_backend_kwargs(args))))


def _log_image_base(paths, image_root) -> None:
    from retrv.runtime.inputs.corpus import image_base

    for path in paths:
        log.info("%s: image paths resolved against %s", path, image_base(path, image_root))


def cmd_index_build(args) -> int:
    from retrv.runtime.outputs import check_output

    check_output(args.index, "index", {"the pack": args.pack,
                                       **{f"the corpus {c}": c for c in args.corpus}})
    from retrv.runtime.inputs.corpus import read_candidate_files
    from retrv.runtime.index.milvus import StoreSpec
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack

    StoreSpec.parse(args.vector_store)  # a bad --vector-store is refused before anything is encoded
    pack = Pack.open(args.pack)
    cands = read_candidate_files(args.corpus, image_root=args.image_root)  # paths absolute from here on
    _log_image_base(args.corpus, args.image_root)
    with progress_bar(len(cands), "candidate", "index build") as bar:
        index = Index.build(_CountingEncoder(_encoder(pack, args), bar), cands, args.index, m=args.m,
                            ef_construction=args.ef_construction, ef_search=args.ef_search, backend=args.backend,
                            vector_store=args.vector_store, **_backend_kwargs(args))
    sizes = index.bytes_per_item()
    where = "HNSW" if index.meta.store == "hnsw" else "Milvus " + index.meta.vectors["uri"]
    print(f"indexed {index.meta.count} candidates into {index.path} "
          f"({sizes['token_cache']:.0f} B/candidate of cached tokens, {sizes['ann']:.0f} B/candidate of {where})")
    return 0


def cmd_index_migrate(args) -> int:
    from retrv.runtime.index.milvus import StoreSpec
    from retrv.runtime.index.store import Index

    StoreSpec.parse(args.to)
    index = Index.open(args.index)
    gen = index.migrate(args.to)
    rec = index.meta.vectors
    where = "hnsw" if rec["store"] == "hnsw" else f"milvus {rec['uri']} collection {rec['collection']}"
    print(f"moved the vectors of {index.path} to {where}: generation {gen}, {index.meta.count} live")
    return 0


def cmd_index_add(args) -> int:
    from retrv.runtime.inputs.corpus import read_candidate_files
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack

    pack = Pack.open(args.pack)
    index = Index.open(args.index, pack=pack, backend=args.backend, **_backend_kwargs(args))
    cands = read_candidate_files(args.corpus, image_root=args.image_root)
    _log_image_base(args.corpus, args.image_root)
    with progress_bar(len(cands), "candidate", "index add") as bar:
        gen = index.add(cands, encoder=_CountingEncoder(_encoder(pack, args), bar))
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
    import time

    retriever, budget, plan = _retriever(args), _budget(args), None
    if args.deadline_ms is not None and not args.no_rerank:
        # The server's planner: the per-token cost measured now, on this device; the deadline counts from here
        # (the pack and the index are open), so it covers the query's encoding, the coarse search and the rerank.
        from retrv.runtime.rerank.deadline import DeadlinePlanner

        planner = DeadlinePlanner.calibrate(retriever.reranker)
        budget, plan = planner.plan(args.deadline_ms, 0.0, budget, kind="search")
        started = time.perf_counter()
    result = retriever.search(text=args.text, image=args.image, k=args.k, budget=budget,
                              window=args.window, stride=args.stride, rerank=not args.no_rerank)
    d = result.to_dict()
    if plan is not None:
        d["deadline"] = {**plan, "total_ms": round((time.perf_counter() - started) * 1e3, 3)}
    if args.json:
        print(json.dumps(d))
        return 0
    for i, r in enumerate(d["ranked"][:10], 1):
        print(f"{i:>3}. {r['did']}  (coarse #{r['coarse_rank'] + 1}, similarity {r['score']:.3f})")
    t = d["tokens"]
    print(f"answer {d['answer']}; {t['prefill_tokens']} prefill + {t['think_tokens']} think tokens, "
          f"{t['inspected']} inspected, exhausted {t['budget_exhausted'] or 'none'}", file=sys.stderr)
    if plan is not None:
        print(f"deadline {args.deadline_ms:g} ms: token budget {plan['budget']['token']} "
              f"({plan['ms_per_token']:.3f} ms/token planned); took {d['deadline']['total_ms']:.1f} ms",
              file=sys.stderr)
    for name, c in d["limits"].items():
        print(f"{name} {c['asked']} capped to {c['capped_to']}: {c['reason']}", file=sys.stderr)
    return 0


def _eval_queries(args) -> tuple[list, list[int], dict]:
    """The queries of every --queries file (instructions prepended, qrels applied), the index each one is searched
    in (a position in args.index), and what was applied, for the report."""
    from pathlib import Path

    from retrv.runtime.errors import InputError
    from retrv.runtime.inputs.corpus import INSTRUCTIONS_TSV, Instructions, find_mbeir_root, read_qrels, \
        read_queries, with_qrels

    if len(args.index) not in (1, len(args.queries)):
        raise InputError(f"got {len(args.index)} indexes for {len(args.queries)} query files; expected one index "
                         "(a global pool) or one per query file, in the same order (local pools)")
    qrels = read_qrels(args.qrels) if args.qrels else None
    queries, owner, applied = [], [], []
    for i, path in enumerate(args.queries):
        qs = read_queries(path, image_root=args.image_root)
        root = Path(args.image_root) if args.image_root else find_mbeir_root(path)
        tsv = root / INSTRUCTIONS_TSV if root is not None else None
        if args.no_instructions:
            inst = None
        elif tsv is not None and tsv.is_file():
            inst = Instructions.read(tsv)
            qs = inst.apply(qs, args.instruction or 1)
        elif args.instruction is not None:
            raise InputError(f"--instruction {args.instruction}: no {INSTRUCTIONS_TSV} under the M-BEIR root of "
                             f"{path} ({root or 'none found'}); expected M-BEIR's instructions file there")
        else:
            inst = None
        applied.append({"queries": str(path), "index": str(args.index[i if len(args.index) > 1 else 0]),
                        "instructions": inst and inst.path})
        if qrels is not None:
            qs = with_qrels(qs, qrels)
        queries += qs
        owner += [i if len(args.index) > 1 else 0] * len(qs)
    settings = {"pool": "local" if len(args.index) > 1 else "one index", "files": applied,
                "instruction_variant": None if args.no_instructions else (args.instruction or 1),
                "qrels": [str(p) for p in args.qrels] if args.qrels else None}
    return queries, owner, settings


class _PoolRetrievers:
    """One Retriever per query, over one backend; an index is opened when its first query comes and the previous
    one let go, so local pools (queries grouped by file) hold one index in memory at a time."""

    def __init__(self, args, owner: list[int]) -> None:
        from retrv.runtime.backends import open_backend
        from retrv.runtime.pack import Pack

        self.args, self.owner = args, owner
        self.pack = Pack.open(args.pack)
        self.backend = open_backend(self.pack, args.backend, **_backend_kwargs(args))
        self.current: tuple[int, object] | None = None

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, q: int):
        from retrv.runtime.index.store import Index
        from retrv.runtime.retriever import Retriever

        i = self.owner[q]
        if self.current is None or self.current[0] != i:
            self.current = None
            index = Index.open(self.args.index[i], pack=self.pack)
            self.current = (i, Retriever(self.pack, index, backend=self.backend))
        return self.current[1]


def cmd_eval(args) -> int:
    from retrv.runtime.evaluate import evaluate

    queries, owner, settings = _eval_queries(args)
    retrievers = _PoolRetrievers(args, owner)
    with progress_bar(len(queries), "query", "eval") as bar:
        out = evaluate(retrievers, queries, k=args.k, budget=_budget(args), window=args.window, stride=args.stride,
                       rerank=not args.no_rerank, progress=lambda done, total: bar.update(1))
    out["settings"].update(settings)
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
    _print_mbeir(out["mbeir"], settings["pool"])
    return 0


def _print_mbeir(m: dict, pool: str) -> None:
    """M-BEIR's table: per task, then per dataset, R@1/5/10 and the benchmark's own metric (M-BEIR column) for each
    ranking; then the paper-style average over tasks."""
    names = [n for n in ("coarse", "reranked") if n in m["average"]]
    head = "".join(f" | {n:<8}  R@1   R@5  R@10 M-BEIR" for n in names)
    for kind in ("tasks", "datasets"):
        print(f"\n{'M-BEIR ' + kind[:-1] + ' (' + pool + ')':<28} queries  metric   {head}")
        for group, row in m[kind].items():
            cells = ""
            for n in names:
                r = row.get(n)
                cells += f" | {'':<8}" + (" ".join(f"{r[k]:5.3f}" for k in ("recall@1", "recall@5", "recall@10"))
                                          + f" {r['mbeir']:6.3f}" if r else f"{'(no positives)':>24}")
            skipped = f" ({row['skipped']} skipped)" if row["skipped"] else ""
            print(f"{group:<28} {row['queries']:>7}  {row['metric']:<9}{cells}{skipped}")
    avg = m["average"]
    print(f"\naverage over {avg['tasks']} tasks (paper-style: each task's own metric) " + ", ".join(
        f"{n} {avg[n]:.3f}" for n in names if avg[n] is not None))


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


def deadline_ms(text: str) -> float:
    """An argparse `type` for --deadline-ms: milliseconds in (0, an hour]."""
    from retrv.runtime.errors import InputError
    from retrv.runtime.rerank.deadline import check_deadline

    try:
        return check_deadline(float(text), "--deadline-ms")
    except (ValueError, InputError):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise argparse.ArgumentTypeError(f"got {shown!r}; expected milliseconds > 0, at most 3600000") from None


MAX_THREADS = 1024  # runtime.backends.ort.MAX_THREADS (not imported: the parser stays free of onnxruntime)


def thread_flags(p, threads_help: str = "ONNX Runtime intra-op threads (default: the physical cores this process "
                                         "may use, affinity and cgroup quota respected)") -> None:
    """--threads and --inter-op-threads, the same on generate, search, eval, index and serve."""
    p.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None, help=threads_help)
    p.add_argument("--inter-op-threads", type=int_in(1, MAX_THREADS), default=1,
                   help="ONNX Runtime inter-op threads (default 1: each graph's nodes run in sequence; more runs "
                        "independent nodes in parallel)")


def _backend_flags(p) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "trt", "torch"])
    p.add_argument("--checkpoint", default=None, help="source checkpoint, for --backend torch")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"], help="ONNX Runtime provider")
    thread_flags(p)


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


_IMAGE_ROOT = ("resolve relative image paths (and find instructions/) against this folder (default: the M-BEIR root "
               "above the JSONL, the first folder holding mbeir_images/ or cand_pool/ + query/; else the JSONL's "
               "folder)")


def register(sub) -> None:
    from retrv.runtime.index.ann import MAX_EF, MAX_M
    from retrv.runtime.index.store import DEFAULT_EF_CONSTRUCTION, DEFAULT_EF_SEARCH, DEFAULT_M

    idx = sub.add_parser("index", help="build, change and inspect an index")
    idx_sub = idx.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = idx_sub.add_parser("build", help="PACK CORPUS.jsonl INDEX: a new index over a corpus")
    build.add_argument("pack")
    build.add_argument("corpus", nargs="+", help="M-BEIR candidate JSONL; several make one pool (a global pool is the "
                                                 "union of the local ones: cand_pool/local/*.jsonl)")
    build.add_argument("index", help="output index directory: new, empty, or an index (replaced atomically)")
    build.add_argument("--m", type=int_in(2, MAX_M), default=DEFAULT_M)
    build.add_argument("--ef-construction", type=int_in(1, MAX_EF), default=DEFAULT_EF_CONSTRUCTION)
    build.add_argument("--ef-search", type=int_in(1, MAX_EF), default=DEFAULT_EF_SEARCH,
                       help="HNSW search breadth; 200 gives recall@10 0.92 on 10k random 128-d vectors, the worst "
                            "case (bench/index.py)")
    build.add_argument("--image-root", default=None, help=_IMAGE_ROOT)
    build.add_argument("--vector-store", default="hnsw", metavar="STORE",
                       help="where the vectors live: hnsw (default: files in the index), milvus (Milvus Lite in "
                            "INDEX/vectors.db, one process at a time) or milvus://HOST:PORT[/collection] (a server)")
    _backend_flags(build)
    build.set_defaults(func=cmd_index_build)

    add = idx_sub.add_parser("add", help="INDEX CORPUS.jsonl --pack PACK: add candidates (crash-safe)")
    add.add_argument("index")
    add.add_argument("corpus", nargs="+", help="M-BEIR candidate JSONL of new candidates (several: their union)")
    add.add_argument("--pack", required=True, help="the pack the index was built with")
    add.add_argument("--image-root", default=None, help=_IMAGE_ROOT)
    _backend_flags(add)
    add.set_defaults(func=cmd_index_add)

    delete = idx_sub.add_parser("delete", help="INDEX --ids DID [DID ...]: delete candidates (crash-safe)")
    delete.add_argument("index")
    delete.add_argument("--ids", nargs="+", required=True, metavar="DID")
    delete.set_defaults(func=cmd_index_delete)

    migrate = idx_sub.add_parser("migrate", help="INDEX --to STORE: move the vectors to another store (crash-safe)")
    migrate.add_argument("index")
    migrate.add_argument("--to", required=True, metavar="STORE", help="hnsw, milvus or milvus://HOST:PORT[/collection]")
    migrate.set_defaults(func=cmd_index_migrate)

    info = idx_sub.add_parser("info", help="INDEX: verify an index and print its facts")
    info.add_argument("index")
    info.add_argument("--quick", action="store_true", help="check sizes only, do not hash the files")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_index_info)

    search = sub.add_parser("search", help="one query: coarse search, then the reasoning rerank")
    search.add_argument("index")
    search.add_argument("--text", default=None)
    search.add_argument("--image", default=None)
    search.add_argument("--deadline-ms", type=deadline_ms, default=None,
                        help="answer within this many ms: a token budget planned from the per-token cost measured "
                             "on this device (as `retrv serve` does); --json reports it under \"deadline\"")
    _query_flags(search)
    search.set_defaults(func=cmd_search)

    ev = sub.add_parser("eval", help="Recall@1/5/10 per M-BEIR task and dataset, tokens and latency over query files")
    ev.add_argument("index", nargs="+", help="one index (a global pool) for every query file, or one per query file "
                                             "in the same order (local pools)")
    ev.add_argument("--queries", nargs="+", required=True, metavar="JSONL", help="M-BEIR query files")
    ev.add_argument("--qrels", nargs="+", default=None, metavar="TXT",
                    help="TREC qrels ('qid 0 did relevance'); their positives replace the files' pos_cand_list")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--instruction", type=positive_int, default=None, metavar="N",
                       help="prompt_N of instructions/query_instructions.tsv under the M-BEIR root (default 1)")
    which.add_argument("--no-instructions", action="store_true",
                       help="do not prepend M-BEIR's task instructions to the query text")
    ev.add_argument("--image-root", default=None, help=_IMAGE_ROOT)
    _query_flags(ev)
    ev.set_defaults(func=cmd_eval)
