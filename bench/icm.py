"""Where the ICM relation step's time goes: the graph exported as before (the query expanded over the K
candidates) against the current one (the query side once, broadcast; the pooling folded into its one query), in
one process, on ONNX Runtime, with a per-part table from ONNX Runtime's profiler.

    python bench/icm.py [--preset mid] [--k 50] [--cand-len 64] [--query-len 0] [--threads 1] [--runs 20]

--cand-len 64: a 224-px candidate image (16 x 16 patches, 2 x 2 merged); --query-len 0: the mean token length of
the e2e benchmark's caption queries (bench/e2e.py's photo corpus) under the checkpoint's tokenizer. Also reports
what caching the one query-independent candidate-side product (ATT2 layer 0's query projection) at index time
would save per query and cost per candidate in the token cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, machine, summarize

import _prep


def parts_of(node: str) -> str:
    """ONNX node name (`/icm/relation_attn/layers.0/attn/k_proj/MatMul`) -> the part of the ICM it belongs to."""
    p = node.strip("/").split("/")
    p = p[1:] if p and p[0] == "icm" else p
    if p and p[0].split("_")[0] in ("attn", "mlp", "norm"):  # the folded pooling, called outside its stack
        return "ATT1' relation_pool (folded) " + ("attn" if p[0].startswith("attn") else "mlp + norms")
    if not p or p[0] not in ("relation_attn", "relation_pool"):
        return "other (reshapes, masks, casts)"
    stack = "ATT2 relation_attn" if p[0] == "relation_attn" else "ATT1' relation_pool"
    if len(p) < 3 or not p[1].startswith("layers."):
        return f"{stack}: final norm"
    layer, sub = p[1].split(".")[1], p[2]
    if sub == "attn":
        what = f"attn {p[3]}" if len(p) > 4 and p[3].endswith("_proj") else "attn scores/softmax/mix"
    elif sub == "mlp":
        what = "mlp (gate, up, down)"
    elif sub.startswith("norm"):
        what = "norms"
    else:
        what = sub
    return f"{stack} L{layer} {what}"


GROUPS = ("ATT2 query-side key/value projections", "ATT2 layer 0 candidate q_proj (query-independent)",
          "ATT2 other candidate-side attention (q_proj L1+, o_proj, scores, norms)", "ATT2 MLPs",
          "ATT1' pooling", "other")


def group_of(part: str) -> str:
    """A part of `parts_of` -> one of GROUPS: what the change removes, what it cannot, what could be cached."""
    if part.startswith("ATT1'"):
        return GROUPS[4]
    if not part.startswith("ATT2") or part.endswith("final norm"):
        return GROUPS[5] if not part.startswith("ATT2") else GROUPS[2]
    if "k_proj" in part or "v_proj" in part:
        return GROUPS[0]
    if " L0 attn q_proj" in part:
        return GROUPS[1]
    return GROUPS[3] if "mlp" in part else GROUPS[2]


def export(module, spec, cfg, path: Path) -> Path:
    from retrv.export.graphs import SubModel
    from retrv.export.onnx_export import export_onnx

    export_onnx(SubModel(spec, module), cfg, path)
    return path


def session(path: Path, threads: int, profile: str | None = None):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = threads, 1, 3
    if profile:
        o.enable_profiling, o.profile_file_prefix = True, profile
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def profile(path: Path, feeds: dict, threads: int, runs: int, prefix: str) -> dict[str, float]:
    """Mean ms per run of each part, from ONNX Runtime's node events."""
    sess = session(path, threads, prefix)
    for _ in range(runs):
        sess.run(None, feeds)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    out: dict[str, float] = {}
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            part = parts_of(ev["name"][: -len("_kernel_time")])
            out[part] = out.get(part, 0.0) + ev["dur"] / 1e3 / runs
    return out


def query_len(ckpt: Path, workdir: Path) -> float:
    from retrv.runtime.inputs.prompt import PromptTokenizer

    corpus, _ = _prep.photo_corpus(workdir, 224, 50)
    tok = PromptTokenizer(ckpt / "tokenizer.json")
    caps = [q["text"] for q in json.loads((corpus / "queries.json").read_text())]
    return float(np.mean([len(tok.encode_text(c)) for c in caps]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mid", choices=("tiny", "mid"))
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--cand-len", type=int, default=64)
    ap.add_argument("--query-len", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--workdir", default=str(REPO / "bench" / ".work"))
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "icm.json"))
    args = ap.parse_args(argv)

    import torch

    from retrv.export.graphs import IcmRelationGraph, IcmRelationReference, icm_relation_spec
    from retrv.model.loading import load_checkpoint

    workdir = Path(args.workdir).resolve()
    ckpt = _prep.checkpoint(workdir, args.preset)
    model = load_checkpoint(ckpt, dtype=torch.float32)
    cfg, h = model.cfg, model.cfg.text.hidden_size
    lq = args.query_len or round(query_len(ckpt, workdir))
    rng = np.random.default_rng(0)
    feeds = {"cand_tokens": rng.standard_normal((args.k, args.cand_len, h)).astype(np.float32),
             "cand_mask": np.ones((args.k, args.cand_len), np.int64),
             "query_tokens": rng.standard_normal((lq, h)).astype(np.float32),
             "query_mask": np.ones(lq, np.int64)}
    spec = icm_relation_spec(cfg)
    with torch.no_grad():
        want = model.icm.relation(*(torch.from_numpy(feeds[n]) for n in spec.inputs)).numpy()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="retrv-bench-icm-") as tmp:
        graphs = {"before": IcmRelationReference(model), "after": IcmRelationGraph(model)}
        paths = {n: export(m, spec, cfg, Path(tmp) / f"{n}.onnx") for n, m in graphs.items()}
        sessions = {n: session(p, args.threads) for n, p in paths.items()}
        samples: dict[str, list[float]] = {n: [] for n in graphs}
        for n, s in sessions.items():  # warm-up
            got = s.run(None, feeds)[0]
            rows[n] = {"max_abs_diff_vs_torch": float(np.abs(got - want).max())}
        load = [round(x, 2) for x in os.getloadavg()]
        for _ in range(args.runs):  # interleaved, so drifting load hits both alike
            for n, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds)
                samples[n].append((time.perf_counter() - t0) * 1e3)
        for n in graphs:
            parts = profile(paths[n], feeds, args.threads, max(3, args.runs // 4), f"{tmp}/{n}")
            groups = {g: 0.0 for g in GROUPS}
            for part, ms in parts.items():
                groups[group_of(part)] += ms
            rows[n].update(latency_ms=summarize(samples[n]), parts_ms=parts, groups_ms=groups)
    # The one query-independent candidate-side product: ATT2 layer 0's q_proj of the candidate tokens.
    cacheable = rows["before"]["parts_ms"].get("ATT2 relation_attn L0 attn q_proj", 0.0)
    cache = {"what": "ATT2 layer 0 q_proj(norm_q(candidate tokens)), (L, C) per candidate",
             "ms_saved_per_query": round(cacheable, 2),
             "bytes_per_candidate_int8": args.cand_len * h, "bytes_per_candidate_fp32": 4 * args.cand_len * h,
             "token_cache_bytes_per_candidate_int8": args.cand_len * h}
    result = {"machine_load_before": load, "machine": machine(), "preset": args.preset, "k": args.k,
              "cand_len": args.cand_len, "query_len": lq, "threads": args.threads, "runs": args.runs,
              "rows": rows, "cache_candidate_q_proj": cache}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    b, a = rows["before"], rows["after"]
    print(f"ICM relation, {args.preset} preset, K={args.k}, L={args.cand_len}, Lq={lq}, {args.threads} thread(s), "
          f"{args.runs} runs; load before {load}")
    print(f"  before (query expanded over K): p50 {b['latency_ms']['p50']:.1f} ms, "
          f"max |diff| vs torch {b['max_abs_diff_vs_torch']:.2g}")
    print(f"  after  (query once, broadcast): p50 {a['latency_ms']['p50']:.1f} ms, "
          f"max |diff| vs torch {a['max_abs_diff_vs_torch']:.2g}; "
          f"{b['latency_ms']['p50'] / a['latency_ms']['p50']:.2f}x faster")
    print(f"  {'part (ORT profiler, mean ms per run)':<72} {'before':>8} {'after':>8}")
    for part in sorted(set(b["parts_ms"]) | set(a["parts_ms"])):
        print(f"  {part:<72} {b['parts_ms'].get(part, 0):8.2f} {a['parts_ms'].get(part, 0):8.2f}")
    print(f"  {'grouped':<72} {'before':>8} {'after':>8}")
    for g in GROUPS:
        print(f"  {g:<72} {b['groups_ms'][g]:8.1f} {a['groups_ms'][g]:8.1f}")
    print(f"  caching {cache['what']} at index time: saves {cache['ms_saved_per_query']:.2f} ms per query (of the "
          f"'before' graph) for {cache['bytes_per_candidate_int8']} B/candidate in int8 (the token cache holds "
          f"{cache['token_cache_bytes_per_candidate_int8']} B/candidate now)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
