"""Tables (console and markdown) and headline ratios from the benchmark JSON files. Plots are in plots.py.

    python bench/report.py [--e2e bench/results/e2e.json] [--ann bench/results/ann.json] [--md docs/BENCHMARKS.md]

Every table puts the baseline row first and gives each other row's ratio to it (STYLE.md rule 8): latency as
baseline / row (above 1x: faster than the baseline), tokens and memory as baseline / row (above 1x: fewer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import REPO, fmt, ratio

BASELINE = "transformers"
SDPA = "transformers-sdpa"  # the second baseline: transformers' default attention
ORDER = ["transformers", "transformers-sdpa", "torch", "ort-fp32", "ort-int8", "ort-int4", "ort-fp32-full",
         "ort-int8-icm-v1"]
STAGES = [("coarse", ("embed", "search")), ("images/cache", ("images", "cache")), ("vision", ("vision",)),
          ("icm", ("icm",)), ("prefill", ("prefill",)), ("decode", ("decode",)), ("other", ("other",))]


def _p(agg: dict | None, stage: str = "total", q: str = "p50") -> float | None:
    if not agg:
        return None
    s = agg.get("latency_ms", {}).get(stage)
    return None if not s or not s.get("n") else s[q]


def _stage(agg: dict, keys: tuple) -> float | None:
    vals = [_p(agg, k) for k in keys]
    vals = [v for v in vals if v is not None]
    return sum(vals) if vals else None


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _rows(section: dict, key: str, point: str) -> list[tuple[str, dict]]:
    rows = section.get("rows", {})
    return [(n, rows[n][key][point]) for n in ORDER if n in rows and point in rows[n].get(key, {})]


# -------------------------------------------------------------------------------------------------- tables
def k_table(e2e: dict) -> tuple[list[str], list[list[str]]]:
    sec = e2e.get("k_sweep") or {}
    head = ["K", "configuration", "p50 ms", "p95 ms", "speed-up (p50)", "vs SDPA (p50)"] + [s for s, _ in STAGES] + \
           ["decoder tokens", "token reduction", "images encoded", "peak RSS MB", "RSS ratio"]
    body = []
    ks = sorted({int(k) for r in sec.get("rows", {}).values() for k in r["by_k"]})
    for k in ks:
        rows = _rows(sec, "by_k", str(k))
        base, sdpa = dict(rows).get(BASELINE), dict(rows).get(SDPA)
        for n, a in rows:
            body.append([str(k), sec["rows"][n]["label"], fmt(_p(a), ".0f"), fmt(_p(a, q="p95"), ".0f"),
                         _x(ratio(_p(base), _p(a))), _x(ratio(_p(sdpa), _p(a)))] +
                        [fmt(_stage(a, keys), ".0f") for _, keys in STAGES] +
                        [fmt(a["tokens"].get("total_tokens"), ".0f"),
                         _x(ratio(base and base["tokens"].get("total_tokens"), a["tokens"].get("total_tokens"))),
                         fmt(a["tokens"].get("images_encoded"), ".0f"), fmt(a.get("peak_rss_mb"), ".0f"),
                         _x(ratio(base and base.get("peak_rss_mb"), a.get("peak_rss_mb")))])
    return head, body


def size_table(e2e: dict) -> tuple[list[str], list[list[str]]]:
    sec = e2e.get("size_sweep") or {}
    head = ["image px", "configuration", "p50 ms", "p95 ms", "speed-up (p50)"] + [s for s, _ in STAGES] + \
           ["decoder tokens", "token reduction", "peak RSS MB", "RSS ratio"]
    body = []
    sizes = sorted({int(s) for r in sec.get("rows", {}).values() for s in r["by_size"]})
    for s in sizes:
        rows = _rows(sec, "by_size", str(s))
        base = dict(rows).get(BASELINE)
        for n, a in rows:
            body.append([str(s), sec["rows"][n]["label"], fmt(_p(a), ".0f"), fmt(_p(a, q="p95"), ".0f"),
                         _x(ratio(_p(base), _p(a)))] + [fmt(_stage(a, keys), ".0f") for _, keys in STAGES] +
                        [fmt(a["tokens"].get("total_tokens"), ".0f"),
                         _x(ratio(base and base["tokens"].get("total_tokens"), a["tokens"].get("total_tokens"))),
                         fmt(a.get("peak_rss_mb"), ".0f"),
                         _x(ratio(base and base.get("peak_rss_mb"), a.get("peak_rss_mb")))])
    return head, body


def memory_table(e2e: dict) -> tuple[list[str], list[list[str]]]:
    """Resident memory of each configuration's process: after loading (before any query) and peak through each K."""
    sec = e2e.get("k_sweep") or {}
    ks = sorted({int(k) for r in sec.get("rows", {}).values() for k in r["by_k"]})
    head = ["configuration", "RSS after load MB"] + [f"peak RSS through K={k} MB" for k in ks] + \
           ["torch imported", "load s"]
    body = []
    for n in ORDER:
        r = sec.get("rows", {}).get(n)
        if not r:
            continue
        load = r.get("load") or {}
        body.append([r["label"], fmt(load.get("rss_mb"), ".0f")] +
                    [fmt(r["by_k"].get(str(k), {}).get("peak_rss_mb"), ".0f") for k in ks] +
                    [str(bool((load.get("modules") or {}).get("torch"))).lower(), fmt(load.get("load_s"), ".1f")])
    return head, body


def default_table(e2e: dict) -> tuple[list[str], list[list[str]]]:
    sec = e2e.get("default") or {}
    head = ["configuration", "R@1", "R@5", "R@10", "coarse R@1", "R@1 vs fp32", "p50 ms", "p95 ms", "speed-up (p50)",
            "decoder tokens", "answered", "peak RSS MB"]
    rows = sec.get("rows", {})
    base, fp32 = rows.get(BASELINE), rows.get("ort-fp32")
    body = []
    for n in ORDER:
        if n not in rows:
            continue
        a = rows[n]
        rr, rc = a["recall"]["reranked"], a["recall"]["coarse"]
        delta = None if fp32 is None else rr["recall@1"] - fp32["recall"]["reranked"]["recall@1"]
        body.append([a["label"], f"{rr['recall@1']:.3f}", f"{rr['recall@5']:.3f}", f"{rr['recall@10']:.3f}",
                     f"{rc['recall@1']:.3f}", fmt(delta, "+.3f"), fmt(_p(a), ".0f"), fmt(_p(a, q="p95"), ".0f"),
                     _x(ratio(_p(base), _p(a))), fmt(a["tokens"].get("total_tokens"), ".0f"),
                     f"{a['answered_rate']:.2f}", fmt(a.get("peak_rss_mb"), ".0f")])
    return head, body


def sweep_table(e2e: dict) -> tuple[list[str], list[list[str]]]:
    sec = e2e.get("default") or {}
    head = ["configuration", "think", "inspect", "R@1", "R@5", "coarse R@1", "decoder tokens", "think tokens",
            "inspected", "p50 ms"]
    body = [[s["config"], str(s["think"]), str(s["inspect"]), f"{s['recall']['reranked']['recall@1']:.3f}",
             f"{s['recall']['reranked']['recall@5']:.3f}", f"{s['recall']['coarse']['recall@1']:.3f}",
             fmt(s["tokens"].get("total_tokens"), ".0f"), fmt(s["tokens"].get("think_tokens"), ".1f"),
             fmt(s["tokens"].get("inspected"), ".2f"), fmt((s.get("latency_ms") or {}).get("p50"), ".0f")]
            for s in sec.get("sweep", [])]
    return head, body


def ann_table(ann: dict) -> tuple[list[str], list[list[str]]]:
    head = ["vectors", "items", "dim", "build s (HNSW)", "bytes/item (HNSW files)", "raw vector bytes", "QPS HNSW",
            "QPS brute force (baseline)", "QPS ratio", "p50 ms HNSW", "p50 ms brute force", "recall@10 vs exact"]
    body = []
    for r in ann.get("results", []):
        body.append([r.get("vectors", "gaussian"), f"{r['n']:,}", str(r["dim"]), f"{r['build_s']:.1f}",
                     f"{r['bytes_per_item']:.0f}",
                     str(4 * r["dim"]), f"{r['qps_hnsw']:.0f}", f"{r['qps_brute']:.0f}",
                     _x(ratio(r["qps_hnsw"], r["qps_brute"])), f"{r['p50_ms_hnsw']:.3f}",
                     f"{r['p50_ms_brute']:.2f}", f"{r['recall_at_10']:.3f}"])
    if any("qps_milvus" in r for r in ann.get("results", [])):  # Milvus Lite on the same vectors (issue 19)
        head += ["build s (Milvus Lite)", "bytes/item (Milvus Lite)", "QPS Milvus Lite", "p50 ms Milvus Lite",
                 "recall@10 Milvus Lite"]
        for r, row in zip(ann["results"], body):
            row += ([f"{r['milvus_build_s']:.1f}", f"{r['milvus_bytes_per_item']:.0f}", f"{r['qps_milvus']:.0f}",
                     f"{r['p50_ms_milvus']:.3f}", f"{r['recall_at_10_milvus']:.3f}"] if "qps_milvus" in r else ["-"] * 5)
    return head, body


def index_table(e2e: dict) -> tuple[list[str], list[list[str]]]:
    """Real encoding at index time: what each candidate costs once, against what the baseline pays per query."""
    head = ["index", "candidates", "encode + build s", "ms / candidate", "token cache B/item", "HNSW B/item",
            "rows B/item", "cached tokens / candidate"]
    body = []
    for sec_name in ("k_sweep", "size_sweep"):
        for name, i in ((e2e.get(sec_name) or {}).get("indexes") or {}).items():
            if not i or "candidates" not in i:
                continue
            b = i["bytes_per_item"]
            label = f"{sec_name.replace('_', ' ')}: {name}"
            body.append([label, str(i["candidates"]), f"{i['encode_and_build_s']:.1f}", f"{i['ms_per_candidate']:.0f}",
                         f"{b['token_cache']:.0f}", f"{b['ann']:.0f}", f"{b['rows']:.0f}",
                         f"{i['cached_tokens_per_candidate']:.0f}"])
    return head, body


# ----------------------------------------------------------------------------------------------- headline
SHORT = {"transformers-sdpa": "transformers SDPA", "ort-int8-icm-v1": "INT8 with the pre-issue-20 ICM graph",
         "torch": "PyTorch fallback", "ort-fp32": "ONNX Runtime fp32", "ort-int8": "ONNX Runtime INT8",
         "ort-int4": "ONNX Runtime INT4", "ort-fp32-full": "ONNX Runtime fp32 WITHOUT the ICM (full cached tokens)"}


def headline(e2e: dict) -> list[str]:
    out = []
    sec = e2e.get("k_sweep") or {}
    ks = sorted({int(k) for r in sec.get("rows", {}).values() for k in r["by_k"]})
    if ks:
        k = max(ks)
        rows = dict(_rows(sec, "by_k", str(k)))
        base = rows.get(BASELINE)
        if base is None:
            out.append(f"K={k}: the transformers baseline is missing ({sec.get('errors', {}).get(BASELINE)}); "
                       f"no ratios")
        else:
            sdpa = rows.get(SDPA)
            speed = "; ".join(f"{SHORT.get(n, n)} {_x(ratio(_p(base), _p(a)))}"
                              + (f" / {_x(ratio(_p(sdpa), _p(a)))}" if sdpa and n != SDPA else "")
                              + f" (p50 {_p(a):,.0f} ms)" for n, a in rows.items() if n != BASELINE)
            vs = (f" / over transformers SDPA (p50 {_p(sdpa):,.0f} ms)" if sdpa else "")
            out.append(f"End-to-end speed-up at K={k} over transformers eager with full tokens (p50 {_p(base):,.0f} "
                       f"ms per query){vs}, same run: {speed}.")
            icm, full = rows.get("ort-fp32"), rows.get("ort-fp32-full")
            if icm and full:
                out.append(f"Of that, at K={k}: the runtime and token cache without the ICM give "
                           f"{_x(ratio(_p(base), _p(full)))}, the ICM on top {_x(ratio(_p(full), _p(icm)))} "
                           f"(ONNX Runtime fp32 with vs without it).")
            if icm:
                bt, it = base["tokens"]["total_tokens"], icm["tokens"]["total_tokens"]
                images = (base["tokens"].get("images_encoded", 0), icm["tokens"].get("images_encoded", 0))
                out.append(f"Decoder tokens per query at K={k}: baseline {bt:,.0f}, retrv with the ICM {it:,.0f}: "
                           f"{bt / it:.1f}x fewer; candidate images encoded per query: {images[0]:.0f} vs "
                           f"{images[1]:.0f}.")
                bm, im = base.get("peak_rss_mb"), icm.get("peak_rss_mb")
                if bm and im:
                    out.append(f"Peak RSS of the process through K={k}: baseline {bm:,.0f} MB, ONNX Runtime fp32 "
                               f"{im:,.0f} MB ({bm / im:.1f}x less).")
        for n, msg in sec.get("errors", {}).items():
            out.append(f"missing row {n}: {msg}")
    d = e2e.get("default") or {}
    if d.get("present"):
        rows = d.get("rows", {})
        fp = rows.get("ort-fp32")
        for mode in ("ort-int8", "ort-int4"):
            if fp and mode in rows:
                a, b = fp["recall"]["reranked"], rows[mode]["recall"]["reranked"]
                out.append(f"Recall cost of {mode[4:].upper()} on the embedded default ({d['data']['queries_used']} "
                           f"queries, K={d['k']}, think={d['think']}, inspect={d['inspect']}): Recall@1 "
                           f"{a['recall@1']:.3f} -> {b['recall@1']:.3f} ({b['recall@1'] - a['recall@1']:+.3f}), "
                           f"Recall@5 {a['recall@5']:.3f} -> {b['recall@5']:.3f} "
                           f"({b['recall@5'] - a['recall@5']:+.3f})")
            elif mode in d.get("errors", {}):
                out.append(f"Recall cost of {mode[4:].upper()}: not measured, {d['errors'][mode]}")
    else:
        reason = d.get("reason", "the default section did not run").rstrip(".")
        out.append(f"Recall cost of INT8/INT4: not measured. {reason}.")
    return out


# -------------------------------------------------------------------------------------------------- render
def console_table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def md_table(head: list[str], body: list[list[str]]) -> str:
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    return "\n".join(rows + ["| " + " | ".join(r) + " |" for r in body])


def console(e2e: dict, ann: dict | None = None) -> str:
    parts = []
    for title, (head, body) in (("latency, tokens and memory vs K", k_table(e2e)),
                                ("process memory", memory_table(e2e)),
                                ("vs candidate image size", size_table(e2e)),
                                ("embedded default: recall", default_table(e2e)),
                                ("embedded default: recall vs budget", sweep_table(e2e)),
                                ("index build with real encoding", index_table(e2e))):
        if body:
            parts.append(f"\n== {title}\n{console_table(head, body)}")
    if ann:
        parts.append(f"\n== coarse stage vs corpus size (random vectors)\n{console_table(*ann_table(ann))}")
    parts.append("\n== headline\n" + "\n".join(headline(e2e)))
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--e2e", default=str(REPO / "bench" / "results" / "e2e.json"))
    ap.add_argument("--ann", default=str(REPO / "bench" / "results" / "ann.json"))
    ap.add_argument("--md", default=None, help="also draw the plots and write the markdown document here")
    ap.add_argument("--img-dir", default=str(REPO / "docs" / "img"))
    args = ap.parse_args(argv)
    e2e = json.loads(Path(args.e2e).read_text())
    ann = json.loads(Path(args.ann).read_text()) if Path(args.ann).is_file() else None
    print(console(e2e, ann))
    if args.md:
        from markdown_doc import write_markdown
        from plots import draw_all

        run_json = Path(args.e2e).with_name("run_all.json")
        run = json.loads(run_json.read_text()) if run_json.is_file() else {}
        write_markdown(e2e, ann, Path(args.md), Path(args.img_dir), draw_all(e2e, Path(args.img_dir)), run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
