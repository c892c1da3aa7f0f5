"""Candidate-token fetch per query at Qwen2.5-VL-3B/7B widths: bytes per candidate and the time to read K = 50
candidates' tokens (dequantized), grids and t_con from the memory-mapped cache and from a sharded store, warm (in
the page cache) and cold (this file's pages evicted with posix_fadvise DONTNEED: other processes' cache untouched).

    python bench/token_fetch.py [--candidates 1000] [--tokens 64] [--k 50] [--queries 20] [--json OUT]

The baseline, in the same run, is reading the same bytes with one sequential `read()` of a contiguous block
(what a perfectly laid-out store could do): the ratio says what the per-candidate gathers cost over it.
Synthetic tokens (gaussian rows): the cache's layout and sizes depend on (L, H) only, not on values.
Widths from the released configs: hidden 2048 (3B) and 3584 (7B); L = 64 merged tokens is a 224 x 224 image
(16 x 16 patches of 14 px, 2 x 2 merge), L = 256 a 448 x 448 one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, machine

HIDDEN = {"3B": 2048, "7B": 3584}  # Qwen2.5-VL-3B/7B-Instruct config.json hidden_size
ROUNDS = 3


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fetch(store, labels) -> int:
    n = 0
    t_con = store.t_con(labels)  # (K, H)
    for i in labels.tolist():
        tok = store.tokens(i)  # (L, H) float32, dequantized
        store.grid(i)
        n += tok.shape[0]
    return n + t_con.shape[0]


def measure(model: str, n: int, length: int, k: int, queries: int, shards: int, tmp: Path, log) -> dict:
    from retrv.runtime.index.token_cache import TokenCache, TokenCacheWriter
    from retrv.runtime.index.token_store import ShardedTokenStore

    hidden = HIDDEN[model]
    rng = np.random.default_rng(0)
    root = tmp / f"{model}-{length}"
    t0 = time.perf_counter()
    with TokenCacheWriter(root / "cache", hidden=hidden, has_t_con=True) as w:
        block = rng.standard_normal((length, hidden), dtype=np.float32)
        for i in range(n):
            w.add(np.roll(block, i, axis=0), (1, 16, 16 * length // 64), block[0])
    cache = TokenCache.open(root / "cache", verify="size")
    dids = [f"c{i}" for i in range(n)]
    sharded = ShardedTokenStore.write(cache, dids, root / "shards", shards=shards)
    log(f"  {model} L={length}: wrote {n} candidates twice in {time.perf_counter() - t0:.1f} s")
    files = [p for p in root.rglob("*") if p.is_file()]
    picks = [np.sort(rng.choice(n, k, replace=False)) for _ in range(queries)]
    per_q = len(picks[0]) * (length * hidden + 4 * length + 32 + 2 * hidden)  # stored bytes read per query
    raw = root / "cache" / "tokens.i8"

    def contiguous(_labels) -> None:  # the baseline: the same number of bytes in one sequential read
        with open(raw, "rb") as f:
            f.read(per_q)

    out = {"model": model, "hidden": hidden, "tokens": length, "candidates": n, "k": k, "shards": shards,
           "bytes_per_candidate": cache.bytes_per_candidate(), "bytes_per_query": per_q}
    for state in ("warm", "cold"):
        times: dict[str, list[float]] = {"local": [], "sharded": [], "contiguous": []}
        for _ in range(ROUNDS):
            for name, fn in (("local", lambda ls: fetch(cache, ls)), ("sharded", lambda ls: fetch(sharded, ls)),
                             ("contiguous", contiguous)):
                for ls in picks:
                    if state == "cold":
                        evict(files)
                    else:
                        fn(ls)  # warm-up: in the page cache
                    t = time.perf_counter()
                    fn(ls)
                    times[name].append((time.perf_counter() - t) * 1e3)
        for name, ts in times.items():
            out[f"{state}_ms_{name}"] = statistics.median(ts)
    log(f"  {model} L={length}: warm local {out['warm_ms_local']:.2f} ms, cold local {out['cold_ms_local']:.2f} ms")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "token_fetch.json"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("RETRV_BENCH_TMP")) as tmp:
        for model in HIDDEN:
            for length in args.tokens:
                results.append(measure(model, args.candidates, length, args.k, args.queries, args.shards,
                                       Path(tmp), log))
                for p in sorted(Path(tmp).iterdir()):  # keep the disk footprint to one configuration at a time
                    import shutil

                    shutil.rmtree(p)
    out = {"meta": {"machine": machine(), "rounds": ROUNDS, "wall_s": round(time.perf_counter() - t_start, 1),
                    "note": "shared 2-core machine, other engineers' jobs running"}, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    head = ["model", "L", "B/candidate", "MB/query (K)", "warm ms local", "warm ms sharded", "warm ms contiguous",
            "cold ms local", "cold ms sharded", "cold ms contiguous"]
    print(" | ".join(head))
    for r in results:
        print(" | ".join([r["model"], str(r["tokens"]), f"{r['bytes_per_candidate']:.0f}",
                          f"{r['bytes_per_query'] / 1e6:.2f}",
                          *(f"{r[f'{s}_ms_{n}']:.2f}" for s in ("warm", "cold")
                            for n in ("local", "sharded", "contiguous"))]))
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
