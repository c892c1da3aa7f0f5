"""Coarse-stage benchmark: the HnswIndex wrapper against raw hnswlib (same M, ef_construction, ef_search, seed) and
brute-force numpy (`exact_search`), in one run, on a seeded random Gaussian dataset.

    python bench/index.py [--n 10000] [--dim 128] [--queries 1000] [--k 10] [--metric cosine]
                          [--m 16] [--ef-construction 200] [--ef-search 200] [--build-threads N] [--json OUT]
    python bench/index.py --embedders --clip-dir DIR [--images 48] [--rounds 2] [--workdir W] [--json OUT]

`--embedders`: index-build throughput (images/s) and peak memory of the coarse stage's embedder, in one run: the
mid preset's own Qwen2.5-VL embedder (the decoder's pooled output; the baseline) against the same reranker with a
CLIP ViT-B/32-sized embedder that optimum exported (`--clip-dir`: tests/fixtures/optimum/make.py OUT --clip-b, then
OUT/clip-b/onnx). Each index build runs in its own process (peak RSS is per process, VmHWM), the configurations
take turns within a round, a first warm-up round is not counted (it writes ONNX Runtime's optimised graphs), and the
median over rounds is reported. The corpus is image-only photos (flickr8k-1k when present), so CLIP runs its image
tower only; "embed" times the embedder's own calls, "build" the whole `Index.build` (the reranker's vision tokens
and t_con are cached at index time in both configurations).

Reported, each the median of 3 timed rounds after one warm-up round (the contenders take turns within a round):
  * build: create + add all n vectors in one call, on --build-threads threads (default: every core) for both hnsw
    variants, capacity preset to n for both; brute force has no build.
  * batch QPS: all queries in ONE search call, on ONE thread (hnswlib num_threads=1; BLAS pinned to one thread
    below, before numpy loads, so the brute-force matmul is single-threaded too).
  * call QPS: one query per search call, one thread: what a request-per-query server sees, wrapper overhead included.
  * recall@k against brute force; bytes per item of the saved index (hnsw.bin + ann.json) beside the raw vectors.
Random Gaussian data has no low-dimensional structure, so recall here is a lower bound for real embeddings.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy: single-threaded BLAS
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import hnswlib  # noqa: E402
import numpy as np  # noqa: E402

from retrv.runtime.index.ann import ANN_JSON, HNSW_BIN, RANDOM_SEED, HnswIndex, HnswParams, exact_search  # noqa: E402

REPEATS = 3  # timed runs per measurement; the median is reported


def interleaved(fns: dict, warmup: bool = True) -> dict:
    """{name: (median seconds, last result)} over REPEATS rounds; each round runs every fn once, in turn, so that
    load from other processes falls on all of them alike instead of on whichever ran during a busy spell."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    last: dict = {}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), last[name]) for name in fns}


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got.tolist(), want.tolist())]))


def _embed_worker(pack_dir: str, corpus: str, out: str, cache_dir: str) -> int:
    """One index build in this process: prints {"build_s", "embed_s", "images", "peak_rss_mb"} as JSON."""
    from _common import peak_rss_mb

    from retrv.runtime.backends import open_backend
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack
    from retrv.runtime.retriever import CandidateEncoder, Components

    pack = Pack.open(pack_dir)
    with open_backend(pack, "ort", cache_dir=Path(cache_dir)) as backend:
        comps = Components(pack, backend)
        spent = [0.0]
        embed = comps.embedder.embed

        def timed(items, role):
            t0 = time.perf_counter()
            try:
                return embed(items, role)
            finally:
                spent[0] += time.perf_counter() - t0

        comps.embedder.embed = timed
        t0 = time.perf_counter()
        index = Index.build(CandidateEncoder(comps), corpus, out)
        build_s = time.perf_counter() - t0
    print(json.dumps({"build_s": build_s, "embed_s": spent[0], "images": index.meta.count,
                      "peak_rss_mb": peak_rss_mb()}))
    return 0


def embedders(args) -> int:
    import shutil
    import subprocess

    import _prep

    work = Path(args.workdir)
    ckpt = _prep.checkpoint(work, args.preset)
    qwen, _ = _prep.fp32_pack(work, ckpt, f"{args.preset}-pack")

    def export_clip(out: Path) -> None:
        from retrv.export.pack_export import export_pack

        export_pack(ckpt, out, embedder=args.clip_dir)

    clip, _ = _prep.cached(work, f"{args.preset}-optimum-pack", {"ckpt": str(ckpt), "clip": str(args.clip_dir),
                                                    "model": (Path(args.clip_dir) / "config.json").read_text()},
                           export_clip)
    corpus, info = _prep.photo_corpus(work, 224, args.images)
    baseline = f"qwen2.5-vl {args.preset} (baseline)"
    configs = {baseline: qwen, "optimum clip (--clip-dir)": clip}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    load = {"start": list(os.getloadavg())}  # the machine is shared: say how busy it was
    for r in range(args.rounds + 1):  # round 0: warm-up (ORT writes its optimised graphs), not counted
        order = list(configs) if r % 2 == 0 else list(configs)[::-1]
        for name in order:
            out = work / "bench-index"
            shutil.rmtree(out, ignore_errors=True)
            done = subprocess.run([sys.executable, __file__, "--embed-worker", str(configs[name]),
                                   str(corpus / "corpus.jsonl"), str(out), str(work / "ort-cache")],
                                  capture_output=True, text=True, check=True)
            if r:
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    load["end"] = list(os.getloadavg())
    rows = {}
    for name, rs in runs.items():
        n = rs[0]["images"]
        rows[name] = {"images": n, "build_images_per_s": n / statistics.median(x["build_s"] for x in rs),
                      "embed_images_per_s": n / statistics.median(x["embed_s"] for x in rs),
                      "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "rounds": rs}
    base = rows[baseline]
    print(f"index build over {base['images']} photos ({info['source']}, 224 px), ONNX Runtime CPU, "
          f"{os.cpu_count()} cores; median of {args.rounds} rounds after a warm-up, configurations interleaved")
    print(f"{'':<28}{'build img/s':>12}{'embed img/s':>12}{'peak RSS MB':>13}")
    for name, row in rows.items():
        print(f"{name:<28}{row['build_images_per_s']:>12.1f}{row['embed_images_per_s']:>12.1f}"
              f"{row['peak_rss_mb']:>13.0f}")
    clip_row = rows["optimum clip (--clip-dir)"]
    ratios = {k: clip_row[k] / base[k] for k in ("build_images_per_s", "embed_images_per_s", "peak_rss_mb")}
    print(f"{'clip / baseline':<28}{ratios['build_images_per_s']:>11.2f}x{ratios['embed_images_per_s']:>11.2f}x"
          f"{ratios['peak_rss_mb']:>12.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "corpus": info, "rows": rows, "ratios": ratios,
                                               "load_avg": load},
                                              indent=2))
    return 0


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--embed-worker":
        return _embed_worker(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embedders", action="store_true", help="embedder index-build throughput (see above)")
    ap.add_argument("--clip-dir", default=None, help="with --embedders: a CLIP-B optimum export folder")
    ap.add_argument("--images", type=int, default=48, help="with --embedders: photos in the corpus")
    ap.add_argument("--preset", default="mid", help="with --embedders: the reranker checkpoint's preset (tiny: tests)")
    ap.add_argument("--rounds", type=int, default=2, help="with --embedders: timed rounds after the warm-up")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "retrv-bench-index"),
                    help="with --embedders: where checkpoints, packs and corpora are built (reused)")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--metric", choices=("cosine", "ip", "l2"), default="cosine")
    ap.add_argument("--m", type=int, default=HnswParams.M)
    ap.add_argument("--ef-construction", type=int, default=HnswParams.ef_construction)
    ap.add_argument("--ef-search", type=int, default=HnswParams.ef_search)
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.embedders:
        if not args.clip_dir:
            ap.error("--embedders needs --clip-dir (tests/fixtures/optimum/make.py OUT --clip-b; OUT/clip-b/onnx)")
        return embedders(args)

    rng = np.random.default_rng(args.seed)
    data = rng.standard_normal((args.n, args.dim), dtype=np.float32)  # (n, dim)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)  # (q, dim)
    labels = np.arange(args.n, dtype=np.int64)
    params = HnswParams(args.metric, args.dim, M=args.m, ef_construction=args.ef_construction,
                        ef_search=args.ef_search)
    k, threads = args.k, args.build_threads

    def build_wrapper() -> HnswIndex:
        index = HnswIndex.create(params, capacity=args.n)
        index.add(labels, data, num_threads=threads)
        return index

    def build_raw():
        index = hnswlib.Index(space=args.metric, dim=args.dim)
        index.init_index(max_elements=args.n, ef_construction=args.ef_construction, M=args.m, random_seed=RANDOM_SEED)
        index.add_items(data, labels, num_threads=threads)
        index.set_ef(max(args.ef_search, k))
        return index

    def raw_search(index, q: np.ndarray):
        lab, dist = index.knn_query(q, k=k, num_threads=1)
        return lab.astype(np.int64), (dist if args.metric == "l2" else 1.0 - dist)

    builds = interleaved({"wrapper": build_wrapper, "raw hnswlib": build_raw}, warmup=False)
    built = {name: ix for name, (_, ix) in builds.items()} | {"brute force": None}
    searchers = {
        "wrapper": lambda q: built["wrapper"].search(q, k, num_threads=1),
        "raw hnswlib": lambda q: raw_search(built["raw hnswlib"], q),
        "brute force": lambda q: exact_search(data, labels, q, k, args.metric),
    }
    calls = {name: queries[: 200 if name == "brute force" else len(queries)] for name in searchers}  # bf is slow
    batch = interleaved({name: (lambda f=f: f(queries)) for name, f in searchers.items()})
    per_call = interleaved({name: (lambda f=f, c=calls[name]: [f(c[i:i + 1]) for i in range(len(c))])
                            for name, f in searchers.items()})
    results: dict[str, dict] = {
        name: {"build_s": builds[name][0] if name in builds else None,
               "batch_qps": len(queries) / batch[name][0], "call_qps": len(calls[name]) / per_call[name][0],
               "labels": batch[name][1][0]}
        for name in searchers}
    truth = results["brute force"]["labels"]
    for r in results.values():
        r["recall"] = recall(r.pop("labels"), truth)

    with tempfile.TemporaryDirectory() as tmp:
        built["wrapper"].save(tmp)
        saved = sum((Path(tmp) / f).stat().st_size for f in (HNSW_BIN, ANN_JSON))
    bytes_per_item = saved / args.n

    def ratio(key: str, other: str) -> float | None:
        a, b = results["wrapper"][key], results[other][key]
        return a / b if a is not None and b else None

    ratios = {f"wrapper/{o}": {key: ratio(key, o) for key in ("build_s", "batch_qps", "call_qps")}
              for o in ("raw hnswlib", "brute force")}

    def cell(v, fmt, width):
        return f"{'n/a':>{width}}" if v is None else f"{v:>{width}{fmt}}"

    print(f"n={args.n} dim={args.dim} metric={args.metric} queries={args.queries} k={k}  M={args.m} "
          f"ef_construction={args.ef_construction} ef_search={args.ef_search}  hnswlib {version('hnswlib')} "
          f"| build on {threads} threads, queries on 1 thread; median of {REPEATS} interleaved rounds after a warm-up")
    print(f"{'':<26}{'build s':>9}{'batch QPS':>11}{'call QPS':>10}{f'recall@{k}':>11}")
    for name, r in results.items():
        print(f"{name:<26}{cell(r['build_s'], '.2f', 9)}{r['batch_qps']:>11.0f}{r['call_qps']:>10.0f}"
              f"{r['recall']:>11.3f}")
    for name, rr in ratios.items():
        print(f"{name:<26}{cell(rr['build_s'], '.2f', 8)}{'x' if rr['build_s'] else ' '}"
              f"{rr['batch_qps']:>10.2f}x{rr['call_qps']:>9.2f}x")
    print("ratios: build is a time (below 1x: the wrapper is faster), QPS a rate (above 1x: the wrapper is faster)")
    print(f"saved index: {bytes_per_item:.1f} bytes/item (hnsw.bin + ann.json), raw float32 vectors "
          f"{4 * args.dim} bytes/item: {bytes_per_item / (4 * args.dim):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios,
                                               "bytes_per_item": bytes_per_item}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
