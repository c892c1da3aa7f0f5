"""Throughput of `retrv serve --ray` with 1 vs 2 Ray Serve replicas on this machine, same requests, same run.

    python bench/ray_replicas.py [--requests 24] [--concurrency 4] [--k 10] [--json OUT]

The service is the embedded default's INT8 pack and index as `retrv serve --demo` builds them (cached). Each
configuration: a local Ray cluster (head on loopback, every core), Serve's proxy on a free loopback port,
N replicas with `threads = cores / N` ONNX Runtime threads each (so 1 and 2 replicas use the same cores), one
warm-up request per replica, then `--requests` POST /v1/search requests from `--concurrency` client threads.
Reported: requests/s, p50 latency, and the 2-replica/1-replica ratio. The 1-replica run is the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import REPO, machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(pack: Path, index: Path, replicas: int, texts: list[str], concurrency: int, k: int, log) -> dict:
    import httpx

    from retrv.app.serve_ray import start, stop

    cores = os.cpu_count() or 1
    port = _free_port()
    t0 = time.perf_counter()
    start(pack, index, host="127.0.0.1", port=port, replicas=replicas, num_cpus=cores,
          cpus_per_replica=cores / replicas, threads=max(1, cores // replicas))
    up_s = time.perf_counter() - t0
    url = f"http://127.0.0.1:{port}/v1/search"
    try:
        with httpx.Client(timeout=600) as c:
            for _ in range(2 * replicas):  # warm-up: every replica has answered once
                c.post(url, json={"text": texts[0], "k": k}).raise_for_status()

        def one(text: str) -> float:
            with httpx.Client(timeout=600) as c:
                t = time.perf_counter()
                c.post(url, json={"text": text, "k": k}).raise_for_status()
                return (time.perf_counter() - t) * 1e3

        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            lat = list(pool.map(one, texts))
        wall = time.perf_counter() - t
    finally:
        stop()
    log(f"  {replicas} replica(s): {len(texts) / wall:.2f} req/s, p50 {statistics.median(lat):.0f} ms "
        f"(up in {up_s:.0f} s)")
    return {"replicas": replicas, "requests": len(texts), "rps": len(texts) / wall,
            "p50_ms": statistics.median(lat), "startup_s": up_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "ray_replicas.json"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    from retrv.app.demo import build_demo

    built = build_demo(None)
    if built is None:
        print("this install ships no default checkpoint (model/default/)", file=sys.stderr)
        return 2
    pack, index = built[2].path, built[4].path
    texts = [f"a photo of object {i % 7} on the left" for i in range(args.requests)]
    results = [run(pack, index, r, texts, args.concurrency, args.k, log) for r in (1, 2)]
    ratio = results[1]["rps"] / results[0]["rps"]
    out = {"meta": {"machine": machine(), "note": "shared 2-core machine, other engineers' jobs running",
                    "concurrency": args.concurrency, "k": args.k}, "results": results, "ratio_2_over_1": ratio}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    log(f"2 replicas / 1 replica (baseline): {ratio:.2f}x requests/s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
