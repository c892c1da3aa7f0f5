"""PNG plots from the benchmark JSON (matplotlib, Agg backend: no display needed).

    latency_vs_k.png        p50 end-to-end latency (p95 as the bar's top) and peak RSS against K, every
                            configuration beside the transformers baseline from the same run
    latency_breakdown.png   share of each stage at the largest K: where the time goes
    latency_vs_image_size.png   p50 latency against candidate image size
    recall_vs_budget.png    Recall@1 against the think budget for each inspect budget (embedded default only)
    decode_pareto.png       decode ms/token against perplexity, retrv packs and llama.cpp GGUFs (bench/decode.py)
"""

from __future__ import annotations

from pathlib import Path

from report import BASELINE, ORDER, STAGES, _p, _stage

COLORS = {"transformers": "#444444", "torch": "#d62728", "ort-fp32": "#1f77b4", "ort-int8": "#2ca02c",
          "ort-int4": "#9467bd", "ort-fp32-full": "#ff7f0e", "transformers-sdpa": "#888888",
          "ort-int8-icm-v1": "#98df8a"}
STYLE = {"transformers": "--", "transformers-sdpa": ":"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(sec: dict, key: str) -> dict[str, tuple[list[int], list[dict]]]:
    out = {}
    for n in ORDER:
        r = sec.get("rows", {}).get(n)
        if r and r.get(key):
            xs = sorted(int(x) for x in r[key])
            out[n] = (xs, [r[key][str(x)] for x in xs])
    return out


def latency_vs_k(e2e: dict, path: Path, subtitle: str) -> Path | None:
    sec = e2e.get("k_sweep")
    if not sec or not sec.get("rows"):
        return None
    plt = _plt()
    series = _series(sec, "by_k")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for n, (xs, aggs) in series.items():
        p50 = [_p(a) / 1e3 for a in aggs]
        p95 = [_p(a, q="p95") / 1e3 for a in aggs]
        label = sec["rows"][n]["label"]
        ax.errorbar(xs, p50, yerr=[[0] * len(xs), [b - a for a, b in zip(p50, p95)]], marker="o", capsize=3,
                    color=COLORS.get(n), linestyle=STYLE.get(n, "-"), label=label)
        ax2.plot(xs, [a.get("peak_rss_mb") or 0 for a in aggs], marker="o", color=COLORS.get(n),
                 linestyle=STYLE.get(n, "-"), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("K (candidates reranked per query)")
    ax.set_ylabel("end-to-end latency per query, s (p50; bar to p95)")
    ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set_xlabel("K")
    ax2.set_ylabel("peak RSS of the configuration's process, MB")
    ax2.set_xticks(ax.get_xticks())
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"Latency and memory vs K, {subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def breakdown(e2e: dict, path: Path) -> Path | None:
    """Share of each stage in each configuration's time at the largest K (stage p50s, normalised per row), with
    the row's total p50 written at the end of its bar."""
    sec = e2e.get("k_sweep")
    if not sec or not sec.get("rows"):
        return None
    ks = sorted({int(k) for r in sec["rows"].values() for k in r["by_k"]})
    k = str(max(ks))
    names = [n for n in ORDER if k in sec["rows"].get(n, {}).get("by_k", {})]
    if not names:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(names) + 1.8))
    cmap = plt.get_cmap("tab10")
    for i, n in enumerate(names):
        a = sec["rows"][n]["by_k"][k]
        parts = [(_stage(a, keys) or 0.0) for _, keys in STAGES]
        total, left = sum(parts) or 1.0, 0.0
        for j, v in enumerate(parts):
            ax.barh(i, 100 * v / total, left=left, color=cmap(j), label=STAGES[j][0] if i == 0 else None)
            left += 100 * v / total
        ax.text(101, i, f"{_p(a) / 1e3:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [sec["rows"][n]["label"] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 112)
    ax.set_xlabel(f"share of the query's time per stage at K={k}, % (stage p50s; right: total p50 per query)")
    ax.legend(fontsize=7, ncol=len(STAGES), loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_vs_size(e2e: dict, path: Path, subtitle: str) -> Path | None:
    sec = e2e.get("size_sweep")
    if not sec or not sec.get("rows"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    for n, (xs, aggs) in _series(sec, "by_size").items():
        ax.plot(xs, [_p(a) / 1e3 for a in aggs], marker="o", color=COLORS.get(n), linestyle=STYLE.get(n, "-"),
                label=sec["rows"][n]["label"])
    ax.set_yscale("log")
    ax.set_xlabel("candidate image side, px (square photos)")
    ax.set_ylabel("end-to-end latency per query, s (p50)")
    ax.set_xticks(sorted({int(s) for r in sec["rows"].values() for s in r["by_size"]}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Latency vs image size at K={sec['k']}, {subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recall_vs_budget(e2e: dict, path: Path) -> Path | None:
    d = e2e.get("default") or {}
    if not d.get("present") or not d.get("sweep"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    groups: dict[tuple, list] = {}
    for s in d["sweep"]:
        groups.setdefault((s["config"], s["inspect"]), []).append(s)
    for (config, ins), pts in sorted(groups.items()):
        pts = sorted(pts, key=lambda s: s["think"])
        ax.plot([s["think"] for s in pts], [s["recall"]["reranked"]["recall@1"] for s in pts], marker="o",
                label=f"{config}, inspect budget {ins}")
    coarse = d["sweep"][0]["recall"]["coarse"]["recall@1"]
    ax.axhline(coarse, color="grey", linestyle=":", label=f"coarse stage only (HNSW), R@1 {coarse:.2f}")
    for n, marker in (("transformers", "s"), ("torch", "D"), ("ort-fp32", "o"), ("ort-int8", "^"), ("ort-int4", "v")):
        r = d.get("rows", {}).get(n)
        if r:
            ax.scatter([d["think"]], [r["recall"]["reranked"]["recall@1"]], marker=marker, color=COLORS[n], zorder=3,
                       label=f"{r['label']} (think {d['think']}, inspect {d['inspect']})")
    ax.set_xscale("symlog", linthresh=8)
    thinks = sorted({s["think"] for s in d["sweep"]} | {d["think"]})
    ax.set_xticks(thinks, [str(t) for t in thinks])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("think budget (tokens per query; symlog scale)")
    ax.set_ylabel("Recall@1 after reranking")
    ax.set_title(f"Embedded default: recall vs budget, K={d['k']}, {d['data']['queries_used']} synthetic test queries",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple]) -> list[tuple]:
    """The (x, y, ...) points no other point beats on both axes (lower is better), by x: sorted by x then y, a point
    stays if its y is below every y before it."""
    pts = sorted(points)
    return [q for i, q in enumerate(pts) if all(q[1] < r[1] for r in pts[:i])]


def decode_pareto(result: dict, path: Path) -> Path | None:
    """bench/decode.py's result: ms/token (y) against perplexity (x) per engine and thread count; lower-left is
    better on both. Every pack is a marker (filled: the largest thread count; hollow: the smallest); the line joins
    each engine's Pareto frontier, the packs no other pack of that engine beats on both axes."""
    ppl = result.get("perplexity", {}).get("by_engine", {})
    if not ppl:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    threads = sorted(result["timing"], key=int)
    for engine, color, marker in (("retrv", "#1f77b4", "o"), ("llama.cpp", "#d62728", "s")):
        names = [n for n, s in result["engines"].items() if s["engine"] == engine and n in ppl]
        for t in threads:
            pts = sorted((ppl[n], result["timing"][t][n]["ms_per_token"], n) for n in names
                         if n in result["timing"][t])
            if not pts:
                continue
            filled = t == threads[-1]
            front = pareto_front(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, linestyle="none",
                    markerfacecolor=color if filled else "none")
            ax.plot([p[0] for p in front], [p[1] for p in front], color=color, linestyle="-" if filled else ":",
                    marker=marker, markerfacecolor=color if filled else "none",
                    label=f"{engine}, {t} thread{'s' if t != '1' else ''} (frontier)")
            if filled:
                for x, y, n in pts:
                    ax.annotate(n.replace("llama.cpp ", ""), (x, y), textcoords="offset points", xytext=(5, 4),
                                fontsize=7, color=color)
    ax.set_xlabel(f"perplexity on the captions ({result['perplexity']['positions']} positions, teacher-forced)")
    ax.set_ylabel("decode ms/token (median)")
    ax.set_title("SmolLM2-135M: retrv packs vs llama.cpp GGUFs (one run, shared 2-core machine)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(e2e: dict, img_dir: Path) -> dict[str, Path]:
    img_dir.mkdir(parents=True, exist_ok=True)
    preset = e2e.get("meta", {}).get("preset", "mid")
    ks = e2e.get("k_sweep") or {}
    subtitle = f"{preset} random checkpoint, {ks.get('image_px', '?')} px photos, think {ks.get('think', '?')}"
    made = {
        "latency_vs_k": latency_vs_k(e2e, img_dir / "latency_vs_k.png", subtitle),
        "latency_breakdown": breakdown(e2e, img_dir / "latency_breakdown.png"),
        "latency_vs_image_size": latency_vs_size(e2e, img_dir / "latency_vs_image_size.png",
                                                 f"{preset} random checkpoint"),
        "recall_vs_budget": recall_vs_budget(e2e, img_dir / "recall_vs_budget.png"),
    }
    return {k: v for k, v in made.items() if v is not None}


__all__ = ["draw_all", "BASELINE"]
