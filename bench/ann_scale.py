"""Coarse stage vs corpus size: the project's HNSW index against brute-force exact search (the baseline), in one run.

    python bench/ann_scale.py [--ns 10000 100000] [--dim 512] [--queries 200] [--no-milvus] [--with-1m] [--json OUT]

RANDOM VECTORS, not real embeddings, of the mid preset's hidden size (512), seeded:
  * "latent-32": x = W z + 0.1 e with z ~ N(0, I_32), W a fixed random 512 x 32 matrix, e ~ N(0, I_512): random
    vectors with a 32-dimensional structure, a stand-in for real embeddings (whose intrinsic dimension is far below
    their width); the sizes asked for (10k, 100k) use these;
  * "gaussian": pure N(0, I_512), HNSW's worst case (no structure at all: its recall at the default ef is poor and
    its build slow); a small size only, as a bound.
What real encoding costs per candidate, and the token cache's bytes per candidate, come from e2e.py's index builds.

Index parameters are `Index.build`'s defaults (M, ef_construction, ef_search), read from its signature. Reported per n:
  * build s: one `HnswIndex.create` + `add` of all n vectors on every core (one build: too slow to repeat at 100k);
  * bytes/item: the saved hnsw.bin + ann.json over n (the raw float32 vector is 4 * dim bytes of it);
  * per-call QPS and p50 latency: one query per search call on ONE thread (hnswlib num_threads=1; BLAS pinned to one
    thread below, before numpy loads, so brute force is single-threaded too), what a request-per-query server sees;
    median of 3 rounds in which the two take turns;
  * the baseline is brute force as a user would write it: vectors normalised once (not timed, like a build), then
    per query one matrix-vector product and an argpartition for the top k;
  * recall@10 of HNSW against that exact top 10.
  * Milvus Lite (`--vector-store milvus`, the same `MilvusStore` the index uses; skipped without pymilvus or with
    --no-milvus) on the same vectors with the same M/efConstruction/ef: insert + flush + first search (its index
    is built by then) as build s, its database folder's bytes over n, per-call QPS and p50 (one query per gRPC call
    to the in-process server, the same 3 alternating rounds) and recall@10 against the same exact top 10.
  * --with-1m adds n = 1,000,000 (about 2 GB per store at dim 512, 4+ GB of disk while it runs; deleted after).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy: single-threaded BLAS
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from _common import REPO, machine  # noqa: E402

ROUNDS = 3  # timed rounds per measurement; the median is reported


def index_defaults() -> dict:
    from retrv.runtime.index.store import Index

    p = inspect.signature(Index.build).parameters
    return {"M": p["m"].default, "ef_construction": p["ef_construction"].default, "ef_search": p["ef_search"].default}


LATENT = 32  # intrinsic dimension of the "latent-32" vectors
NOISE = 0.1  # per-coordinate noise around the latent structure


def vectors(kind: str, n: int, dim: int, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal((n, dim), dtype=np.float32)  # (n, dim)
    z = rng.standard_normal((n, LATENT), dtype=np.float32)  # (n, LATENT)
    return z @ basis + NOISE * rng.standard_normal((n, dim), dtype=np.float32)  # (n, dim)


class BruteForce:
    """Exact cosine top-k as a user writes it: normalise once, then a matrix-vector product per query."""

    def __init__(self, data: np.ndarray) -> None:
        self.m = data / np.linalg.norm(data, axis=1, keepdims=True)  # (n, dim)

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        s = self.m @ (q[0] / np.linalg.norm(q[0]))  # (n,)
        top = np.argpartition(-s, k)[:k]
        return top[np.argsort(-s[top])][None]  # (1, k)


def measure(kind: str, n: int, dim: int, n_queries: int, k: int, seed: int, log, with_milvus: bool = False) -> dict:
    from retrv.runtime.index.ann import HnswIndex, HnswParams

    d = index_defaults()
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)  # (LATENT, dim)
    data = vectors(kind, n, dim, rng, basis)  # (n, dim)
    queries = vectors(kind, n_queries, dim, rng, basis)  # (q, dim)
    labels = np.arange(n, dtype=np.int64)
    params = HnswParams("cosine", dim, M=d["M"], ef_construction=d["ef_construction"], ef_search=d["ef_search"])
    t0 = time.perf_counter()
    index = HnswIndex.create(params, capacity=n)
    index.add(labels, data)
    build_s = time.perf_counter() - t0
    log(f"  {kind} n={n:,}: built in {build_s:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        index.save(tmp)
        saved = sum(p.stat().st_size for p in Path(tmp).iterdir())

    brute = BruteForce(data)
    runs = {"hnsw": lambda q: index.search(q, k, num_threads=1)[0], "brute": lambda q: brute.search(q, k)}
    milvus_dir = tempfile.TemporaryDirectory(dir=os.environ.get("RETRV_BENCH_TMP")) if with_milvus else None
    if milvus_dir is not None:
        milvus, milvus_build_s = build_milvus(Path(milvus_dir.name), params, labels, data)
        log(f"  {kind} n={n:,}: Milvus Lite built in {milvus_build_s:.1f} s")
        runs["milvus"] = lambda q: milvus.search(q, k, below=n)[0]
    for fn in runs.values():  # warm-up
        fn(queries[:1])
    per_call: dict[str, list[float]] = {name: [] for name in runs}
    round_s: dict[str, list[float]] = {name: [] for name in runs}
    got: dict[str, np.ndarray] = {}
    for _ in range(ROUNDS):
        for name, fn in runs.items():
            out, t_round = [], time.perf_counter()
            for i in range(n_queries):
                t = time.perf_counter()
                out.append(fn(queries[i:i + 1])[0])
                per_call[name].append((time.perf_counter() - t) * 1e3)
            round_s[name].append(time.perf_counter() - t_round)
            got[name] = np.stack(out)
    def recall(name: str) -> float:
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got[name].tolist(), got["brute"].tolist())]))

    extra = {}
    if milvus_dir is not None:
        from retrv.runtime.index.milvus import LOCAL_DB, release_local

        db = Path(milvus_dir.name) / LOCAL_DB
        release_local(db)  # flushes and closes: the folder's size is what stays on disk
        extra = {"milvus_build_s": milvus_build_s,
                 "milvus_bytes_per_item": sum(p.stat().st_size for p in db.rglob("*") if p.is_file()) / n,
                 "qps_milvus": n_queries / statistics.median(round_s["milvus"]),
                 "p50_ms_milvus": float(np.percentile(per_call["milvus"], 50)), "recall_at_10_milvus": recall("milvus")}
        milvus_dir.cleanup()
    return {**extra, "vectors": kind, "n": n, "dim": dim, "queries": n_queries, "params": d, "build_s": build_s,
            "bytes_per_item": saved / n,
            "qps_hnsw": n_queries / statistics.median(round_s["hnsw"]),
            "qps_brute": n_queries / statistics.median(round_s["brute"]),
            "p50_ms_hnsw": float(np.percentile(per_call["hnsw"], 50)),
            "p50_ms_brute": float(np.percentile(per_call["brute"], 50)), "recall_at_10": recall("hnsw")}


def build_milvus(root: Path, params, labels: np.ndarray, data: np.ndarray):
    """The index's own Milvus store (Milvus Lite in root/vectors.db), filled and searched once (index built)."""
    from retrv.runtime.index.milvus import MilvusStore, StoreSpec

    t0 = time.perf_counter()
    store = MilvusStore.create(StoreSpec.parse("milvus"), root, params)
    store.add(labels, data)
    store.search(data[:1], 1, below=len(labels))
    return store, time.perf_counter() - t0


def milvus_available() -> bool:
    try:
        import pymilvus  # noqa: F401
        import milvus_lite  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[10_000, 100_000], help="sizes, latent-32 vectors")
    ap.add_argument("--gaussian-ns", type=int, nargs="*", default=[10_000], help="sizes, pure Gaussian vectors")
    ap.add_argument("--dim", type=int, default=512, help="the mid preset's hidden size")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-milvus", action="store_true", help="hnswlib and brute force only")
    ap.add_argument("--with-1m", action="store_true", help="also n = 1,000,000 (~2 GB per store; deleted after)")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "ann.json"))
    args = ap.parse_args(argv)
    with_milvus = not args.no_milvus and milvus_available()
    if args.with_1m and 1_000_000 not in args.ns:
        args.ns = [*args.ns, 1_000_000]
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    log(f"coarse stage vs corpus size {args.ns} (+ gaussian {args.gaussian_ns}), dim {args.dim}, random vectors")
    results = [measure("latent-32", n, args.dim, args.queries, args.k, args.seed, log, with_milvus) for n in args.ns]
    results += [measure("gaussian", n, args.dim, args.queries, args.k, args.seed, log, with_milvus)
                for n in args.gaussian_ns]
    out = {"meta": {"machine": machine(), "vectors": f"random, seeded: latent-{LATENT} (noise {NOISE}) and gaussian",
                    "build_threads": "all cores", "query_threads": 1, "rounds": ROUNDS,
                    "milvus": "Milvus Lite (pymilvus local mode), in-process gRPC server" if with_milvus else "not run",
                    "wall_s": round(time.perf_counter() - t_start, 1)}, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    from report import ann_table, console_table

    print(console_table(*ann_table(out)))
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
