"""Load benchmark of `retrv serve` on the embedded default (the demo's INT8 pack and index).

    python bench/serve.py --quick          # a few seconds per point; what docs/BENCHMARKS.md reports
    python bench/serve.py                  # 10 s per point

This process drives real `retrv serve` subprocesses over HTTP (asyncio + httpx; request bodies encoded once, so
the driver's own work per request is small), closed loop: C clients each send their next request when the last is
answered (after a refusal, a client backs off 100 ms, a shorter stand-in for Retry-After). Per point: throughput
(answers 200 per second), p50/p95/p99 latency of the 200s, refusals (429/503), errors (anything else, and
connection failures). Scenarios, at C = 1, 2, 4, 8, 16, 64:

    rerank K=10 / K=20   POST /v1/rerank, the query's text and K candidate images as data URLs (the gold one
                         among them); images repeat across requests, so the server's encoded-image cache is warm
                         after the warm-up, as it is for a RAG stack reranking a corpus it has seen
    search K=50          POST /v1/search, the query (text, and its image for composed queries), coarse top 50,
                         reranked in sliding windows
    deadline             rerank K=20 with `deadline_ms` at C = 1 and 4: the share answered within it, p95, and the
                         share that reasoned at all (the rest answered the coarse order: no prompt fitted)

Server configurations on this 2-core machine (the concurrency-model comparison in docs/ARCHITECTURE.md):
`1x2` = one worker process whose ONNX Runtime session has 2 threads; `2x1` = two worker processes, 1 thread each.
Baseline in the same run: the in-process Python API (`Engine`, 2 threads, one request at a time) on the same
requests; the server's overhead is its C = 1 latency minus the in-process one.

The machine is shared with other engineers' jobs: figures move with their load (recorded as loadavg).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine  # noqa: E402

CONCURRENCY = (1, 2, 4, 8, 16, 64)
CONFIGS = {"1x2": (1, 2), "2x1": (2, 1)}  # name -> (worker processes, ONNX Runtime threads each)
BACKOFF_S = 0.1  # a refused client waits this long before its next request
DEADLINE_SHARE = 0.75  # default deadline: 3/4 of the unconstrained K=20 p50 at C = 1: the planner must cut thinking
DEADLINE_S = 8.0  # the deadline points run at least this long: their p95 is what the criterion reads
REQUESTS = 24  # distinct request bodies per scenario (one per query), cycled; --quick: 12


def _data_url(path: Path) -> str:
    kind = "png" if path.suffix.lower() == ".png" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def request_bodies(data: Path, n: int = REQUESTS, seed: int = 0) -> dict[str, list[dict]]:
    """The scenarios' request bodies from the demo's test queries and candidates (seeded)."""
    from retrv.runtime.inputs.corpus import read_candidates, read_queries

    rng = np.random.default_rng(seed)
    queries = [q for q in read_queries(data / "queries_test.jsonl") if q.query_txt][:n]
    cands = read_candidates(data / "corpus_test.jsonl")
    by_did = {c.did: c for c in cands}
    urls: dict[str, str] = {}

    def doc(c):
        if c.img_path:
            urls.setdefault(c.did, _data_url(Path(c.img_path)))
            return {"text": c.txt, "image": urls[c.did]} if c.txt else urls[c.did]
        return c.txt

    out: dict[str, list[dict]] = {"rerank10": [], "rerank20": [], "search50": []}
    for q in queries:
        gold = [by_did[d] for d in q.pos_cand_list if d in by_did][:1]
        for k in (10, 20):
            others = [cands[i] for i in rng.permutation(len(cands)) if cands[i].did not in q.pos_cand_list]
            picked = gold + others[:k - len(gold)]
            picked = [picked[i] for i in rng.permutation(len(picked))]
            out[f"rerank{k}"].append({"query": q.query_txt, "documents": [doc(c) for c in picked]})
        body = {"text": q.query_txt, "k": 50}
        if q.query_img_path:
            body["image"] = _data_url(Path(q.query_img_path))
        out["search50"].append(body)
    return out


# ------------------------------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`retrv serve INDEX --pack PACK --workers W --threads T` as a subprocess on a free loopback port."""

    def __init__(self, pack: Path, index: Path, workers: int, threads: int, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from retrv.app.cli import main; raise SystemExit(main())", "serve", str(index),
             "--pack", str(pack), "--port", str(self.port), "--workers", str(workers), "--threads", str(threads)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)

    def __enter__(self) -> "Server":
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"retrv serve exited {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError(f"retrv serve did not start in 300 s; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------------------------------- the driver
def _pcts(ms: list[float]) -> dict:
    if not ms:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.asarray(ms), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


async def _drive(url: str, path: str, bodies: list[bytes], concurrency: int, seconds: float,
                 deadline_ms: float | None) -> dict:
    import httpx

    ok_ms: list[float] = []
    refused = errors = sent = reranked = 0
    stop = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def one_client(j: int) -> None:
            nonlocal refused, errors, sent, reranked
            i = j
            while time.perf_counter() < stop:
                body = bodies[i % len(bodies)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    r = await client.post(url + path, content=body, headers=headers)
                    status = r.status_code
                except httpx.TransportError:
                    status = -1
                ms = (time.perf_counter() - t0) * 1e3
                sent += 1
                if status == 200:
                    ok_ms.append(ms)
                    if deadline_ms is not None:  # did any reasoning fit, or did the coarse order answer?
                        reranked += r.json()["meta"]["retrv"]["tokens"]["total_tokens"] > 0
                elif status in (429, 503):
                    refused += 1
                    await asyncio.sleep(BACKOFF_S)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(j) for j in range(concurrency)))
        elapsed = time.perf_counter() - t0
    row = {"concurrency": concurrency, "seconds": round(elapsed, 3), "sent": sent, "ok": len(ok_ms),
           "refused": refused, "errors": errors, "throughput_rps": len(ok_ms) / elapsed, **_pcts(ok_ms)}
    if deadline_ms is not None:
        row["deadline_ms"] = deadline_ms
        row["within_deadline"] = sum(ms <= deadline_ms for ms in ok_ms) / max(sent, 1)
        row["reranked"] = reranked / max(len(ok_ms), 1)
    return row


def drive(url, path, bodies, concurrency, seconds, deadline_ms=None) -> dict:
    if deadline_ms is not None:
        bodies = [{**b, "deadline_ms": deadline_ms} for b in bodies]
    raw = [json.dumps(b).encode() for b in bodies]
    return asyncio.run(_drive(url, path, raw, concurrency, seconds, deadline_ms))


def run_in_process(result: dict, pack: Path, index: Path, scenarios: dict, n: int) -> None:
    both = in_process(pack, index, scenarios, n)
    result["in_process"], result["in_process_1thread"] = both[2], both[1]
    for t, rows in both.items():
        for scen, r in rows.items():
            print(f"in-process {t} thread(s) {scen:9s} p50 {r['p50']:8.1f}  p95 {r['p95']:8.1f} ms", flush=True)


def warm_up(url: str, path: str, bodies: list[dict]) -> None:
    """Every body once, one at a time: the server's image and vector caches hold them all, as in_process's do."""
    import httpx

    with httpx.Client(timeout=300) as client:
        for b in bodies:
            client.post(url + path, json=b).raise_for_status()


def in_process(pack: Path, index: Path, scenarios: dict[str, list[dict]], n: int,
               threads: tuple[int, ...] = (2, 1)) -> dict[int, dict]:
    """The same requests through the Python API (`Engine`), one at a time: the baseline without HTTP. One engine per
    ONNX Runtime thread count, taking turns request by request (rotating who goes first)."""
    from retrv.app.serve_engine import Engine, ServeLimits, decode_image, parse_document
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack
    from retrv.runtime.rerank.budget import Budget

    p = Pack.open(pack)
    engines = {t: Engine(p, Index.open(index, pack=p), threads=t) for t in threads}
    limits = ServeLimits()
    out: dict[int, dict] = {t: {} for t in threads}
    for name, bodies in scenarios.items():
        ms: dict[int, list[float]] = {t: [] for t in threads}
        warm = len(bodies)  # one pass over every body first: the caches as warm as the server's
        for i in range(warm + n):
            b = bodies[i % len(bodies)]
            for t in threads[i % len(threads):] + threads[:i % len(threads)]:
                t0 = time.perf_counter()
                if name.startswith("rerank"):
                    docs = [parse_document(j, d, limits) for j, d in enumerate(b["documents"])]
                    engines[t].rerank(b["query"], docs, Budget())
                else:
                    image = decode_image(b["image"], "image", limits)[0] if "image" in b else None
                    engines[t].search(b["text"], image, k=b["k"])
                if i >= warm:
                    ms[t].append((time.perf_counter() - t0) * 1e3)
        for t in threads:
            out[t][name] = {"n": len(ms[t]), **_pcts(ms[t])}
    return out


PATHS = {"rerank10": "/v1/rerank", "rerank20": "/v1/rerank", "search50": "/v1/search"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few seconds per point")
    ap.add_argument("--seconds", type=float, default=None, help="per point (default 10, --quick 3)")
    ap.add_argument("--configs", default="1x2,2x1", help=f"of {sorted(CONFIGS)}")
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    ap.add_argument("--deadline-ms", type=float, default=None,
                    help=f"for the deadline points (default: {DEADLINE_SHARE} x the K=20 p50 at C = 1)")
    ap.add_argument("--cache-dir", default=None, help="the demo's cache (as `retrv demo --cache-dir`)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.json"))
    ap.add_argument("--img-dir", default=str(REPO / "docs" / "img"))
    ap.add_argument("--md", default=str(REPO / "docs" / "BENCHMARKS.md"), help="the page its section goes into")
    ap.add_argument("--report-only", action="store_true", help="plots and the page's section from --out, no run")
    ap.add_argument("--in-process-only", action="store_true", help="redo only the in-process baseline into --out")
    args = ap.parse_args(argv)
    if args.report_only:
        return report(json.loads(Path(args.out).read_text()), args)
    if args.in_process_only:  # redo the baseline into an existing result (the servers' rows are kept)
        from retrv.app.demo import build_demo

        _, data, pack, _, index, _ = build_demo(args.cache_dir)
        result = json.loads(Path(args.out).read_text())
        scenarios = request_bodies(data, REQUESTS // 2 if args.quick else REQUESTS)
        run_in_process(result, Path(pack.path), Path(index.path), scenarios, 10 if args.quick else 30)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return report(result, args)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    levels = [int(x) for x in args.concurrency.split(",")]

    from retrv.app.demo import build_demo

    built = build_demo(args.cache_dir)
    if built is None:
        print("bench/serve.py: this install ships no default checkpoint; nothing to serve", file=sys.stderr)
        return 2
    _, data, pack, _, index, _ = built
    pack_path, index_path = Path(pack.path), Path(index.path)
    scenarios = request_bodies(data, REQUESTS // 2 if args.quick else REQUESTS)
    result = {"machine": machine(), "seconds_per_point": seconds, "backoff_s": BACKOFF_S, "configs": {},
              "note": "2-core machine shared with other engineers' jobs during the run"}
    names = args.configs.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="retrv-bench-serve-"))
    with contextlib.ExitStack() as stack:
        # Every configuration's server is up for the whole run and they take turns point by point (rotating who
        # goes first), so a busy spell from other jobs on this shared machine falls on all of them alike; an idle
        # server costs no CPU.
        servers = {n: stack.enter_context(Server(pack_path, index_path, *CONFIGS[n], log_dir / f"serve-{n}.log"))
                   for n in names}
        rows: dict = {n: {} for n in names}
        for scen, bodies in scenarios.items():
            for n in names:
                warm_up(servers[n].url, PATHS[scen], bodies)
                rows[n][scen] = []
            for j, c in enumerate(levels):
                for n in names[j % len(names):] + names[:j % len(names)]:
                    row = drive(servers[n].url, PATHS[scen], bodies, c, seconds)
                    rows[n][scen].append(row)
                    print(f"{n} {scen:9s} C={c:<3d} {row['throughput_rps']:6.2f} req/s  p50 {row['p50'] or 0:8.1f}"
                          f"  p95 {row['p95'] or 0:8.1f}  p99 {row['p99'] or 0:8.1f} ms  refused {row['refused']:4d}"
                          f"  errors {row['errors']}", flush=True)
            for n in names:
                rows[n][scen].sort(key=lambda r: r["concurrency"])
        base = next((r for r in rows[names[0]]["rerank20"] if r["concurrency"] == 1), None)
        deadline = args.deadline_ms or round(DEADLINE_SHARE * base["p50"])  # one deadline for every configuration
        for n in names:
            rows[n]["deadline"] = []
        for c in (1, 4):
            for n in names:
                row = drive(servers[n].url, "/v1/rerank", scenarios["rerank20"], c, max(seconds, DEADLINE_S),
                            deadline_ms=deadline)
                rows[n]["deadline"].append(row)
                print(f"{n} deadline  C={c:<3d} {deadline:.0f} ms: p95 {row['p95'] or 0:.1f} ms, within "
                      f"{row['within_deadline']:.0%}, reranked {row['reranked']:.0%}, refused {row['refused']}",
                      flush=True)
        for n in names:
            metrics = __import__("httpx").get(f"{servers[n].url}/metrics").text
            counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                          if line.startswith("retrv_requests_total{"))
            result["configs"][n] = {"workers": CONFIGS[n][0], "threads": CONFIGS[n][1], "rows": rows[n],
                                    "metrics_requests_total": counted}
    run_in_process(result, pack_path, index_path, scenarios, 10 if args.quick else 30)
    result["machine_after"] = machine()
    result["command"] = "python bench/serve.py" + (" --quick" if args.quick else "")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return report(result, args)


def report(result: dict, args) -> int:
    from markdown_doc import splice_section

    plot(result, Path(args.img_dir))
    splice_section(Path(args.md), "serve", section(result))
    print(f"wrote {args.md} (section serve) and {args.img_dir}/serve_*.png", file=sys.stderr)
    return 0


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def section(result: dict) -> str:
    """The page's "retrv serve" section: every point, the deadline points, the in-process baseline."""
    m, after = result["machine"], result.get("machine_after", {})
    names = list(result["configs"])
    out = ["## retrv serve: load (issue 22)", "",
           f"`{result.get('command', 'python bench/serve.py --quick')}` ({result['seconds_per_point']:g} s per point; "
           f"bench/results/serve.json). **The machine ({m['cores']} cores, {m.get('cpu')}) was shared with other "
           f"engineers' jobs during the run: load average {m.get('loadavg')} at the start, {after.get('loadavg')} at "
           f"the end**, so every figure is noisy; both configurations were up for the whole run and took turns point "
           f"by point, so a busy spell fell on both. {m['time']}.", "",
           "The embedded default's INT8 pack and index (`retrv serve --demo` builds them); requests from its test "
           "queries: rerank K = 10 / 20 (the query text and K candidate images as data URLs, the gold one among them), "
           "search K = 50 (text, and the query image for composed queries; coarse top 50, sliding windows 20/10). "
           "Closed loop: C clients each send the next request when the last is answered; a refused one backs off "
           f"{result['backoff_s'] * 1e3:.0f} ms. Every body was sent once before timing (caches warm). "
           "Latencies are of the 200s, measured by the client (HTTP included).", "",
           "| config | scenario | C | answers/s | p50 ms | p95 ms | p99 ms | refused | errors |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        cfg = result["configs"][n]
        label = f"{n} ({cfg['workers']} worker{'s' if cfg['workers'] > 1 else ''} x {cfg['threads']} thread" \
                f"{'s' if cfg['threads'] > 1 else ''})"
        for scen in ("rerank10", "rerank20", "search50"):
            for r in cfg["rows"].get(scen, []):
                out.append(f"| {label} | {scen} | {r['concurrency']} | {r['throughput_rps']:.2f} | {_ms(r['p50'])} | "
                           f"{_ms(r['p95'])} | {_ms(r['p99'])} | {r['refused']} | {r['errors']} |")
    out += ["", "![throughput and p95 against concurrency](img/serve_throughput.png)", "",
            "**Deadlines** (rerank K = 20 with `deadline_ms`; one deadline for both configurations, 3/4 of the first "
            "one's unconstrained p50 at C = 1). *Within*: answered 200 within the deadline, of all sent; *reasoned*: "
            "answers whose rerank ran (the others answered the coarse order: the prompts did not fit what was left).",
            "", "| config | C | deadline ms | answered | p50 ms | p95 ms | within | reasoned | refused |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        for r in result["configs"][n]["rows"].get("deadline", []):
            out.append(f"| {n} | {r['concurrency']} | {r['deadline_ms']:,.0f} | {r['ok']} | {_ms(r['p50'])} | "
                       f"{_ms(r['p95'])} | "
                       f"{r['within_deadline']:.0%} | {r.get('reranked', float('nan')):.0%} | {r['refused']} |")
    out += ["", "![p95 against the deadline](img/serve_deadline.png)", ""]
    ip = result.get("in_process", {})
    if ip:
        ip1 = result.get("in_process_1thread", {})
        out += ["**The server's overhead**: the same requests through the Python API (`Engine`, one at a time, in the "
                "bench's own process after the servers stopped; with 2 and with 1 ONNX Runtime thread, taking turns "
                "request by request) against each server at C = 1 (ratio: server / in-process with the server's threads per "
                "session).", "",
                "| scenario | in-process p50 ms, 2 threads | 1 thread | "
                + " | ".join(f"{n} C=1 p50 ms (ratio)" for n in names) + " |",
                "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for scen, r in ip.items():
            cells = []
            for n in names:
                c1 = next((x for x in result["configs"][n]["rows"].get(scen, []) if x["concurrency"] == 1), None)
                v = c1 and c1["p50"]
                same = (ip1 if result["configs"][n]["threads"] == 1 else ip).get(scen, {}).get("p50")
                cells.append(f"{_ms(v)} ({v / same:.2f}x)" if v and same else "n/a")
            out.append(f"| {scen} | {_ms(r.get('p50'))} | {_ms(ip1.get(scen, {}).get('p50'))} | "
                       + " | ".join(cells) + " |")
    counted = {n: result["configs"][n].get("metrics_requests_total") for n in names}
    errors = sum(r["errors"] for n in names for rows in result["configs"][n]["rows"].values() for r in rows)
    out += ["", f"`/metrics` counted {', '.join(f'{n}: {v:,.0f}' for n, v in counted.items() if v is not None)} "
            f"requests over the whole run (warm-up and every point, all workers). Errors (neither 200 nor 429/503, "
            f"or no answer) over every point: {errors}."]
    return "\n".join(out)


def plot(result: dict, img_dir: Path) -> list[Path]:
    """serve_throughput.png (answers/s and p95 against concurrency) and serve_deadline.png."""
    from plots import _plt

    plt = _plt()
    img_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"rerank10": "#1f77b4", "rerank20": "#2ca02c", "search50": "#d62728"}
    styles = {"1x2": "-", "2x1": "--"}
    for name, cfg in result["configs"].items():
        for scen, rows in cfg["rows"].items():
            if scen == "deadline":
                continue
            xs = [r["concurrency"] for r in rows]
            label = f"{scen} ({name})"
            ax.plot(xs, [r["throughput_rps"] for r in rows], marker="o", color=colors[scen],
                    linestyle=styles.get(name, "-"), label=label)
            ax2.plot(xs, [(r["p95"] or np.nan) / 1e3 for r in rows], marker="o", color=colors[scen],
                     linestyle=styles.get(name, "-"), label=label)
    for a, ylabel in ((ax, "answers 200 per second"), (ax2, "p95 latency of the 200s, s")):
        a.set_xscale("log", base=2)
        a.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        a.set_xlabel("concurrent clients")
        a.set_ylabel(ylabel)
        a.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax.legend(fontsize=7)
    fig.suptitle("retrv serve on the embedded default, 2 cores (solid: 1 worker x 2 threads; dashed: 2 workers x "
                 "1 thread); machine shared with other jobs", fontsize=9)
    fig.tight_layout()
    paths = [img_dir / "serve_throughput.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    width = 0.35
    for j, (name, cfg) in enumerate(result["configs"].items()):
        rows = cfg["rows"].get("deadline", [])
        xs = np.arange(len(rows)) + j * width
        ax.bar(xs, [r["p95"] or 0 for r in rows], width, label=f"p95 ({name})")
        for x, r in zip(xs, rows):
            ax.text(x, (r["p95"] or 0), f"{r['within_deadline']:.0%}", ha="center", va="bottom", fontsize=8)
        if rows:
            ax.axhline(rows[0]["deadline_ms"], color="k", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(2) + width / 2, ["C = 1", "C = 4"])
    ax.set_ylabel("ms (dotted: the deadline; label: share within it)")
    ax.set_title("rerank K=20 with deadline_ms", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(img_dir / "serve_deadline.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
