"""End-to-end benchmark: the project's reranking runtime against the transformers baseline, in one run.

    python bench/e2e.py [--quick] [--preset mid|tiny] [--ks 50] [--sizes 112 224 448] [--json OUT]

`python bench/e2e.py` with no flags IS the pinned protocol of docs/BENCHMARKS.md for its K part (PROTOCOL below:
mid preset, K=50, 20 timed queries after 1 warm-up, think 32, inspect 3, 224-px candidates, 1 intra-op thread in
every configuration, queries interleaved, the 1-minute load average read and printed before each configuration
runs each query, p50 and p95). The JSON records the protocol, this run's values and whether they matched.

Configurations, each in its own worker process (peak memory is per process; _common.py):
  transformers   Qwen2_5_VLForConditionalGeneration.generate, eager, fp32, query + all K candidates' full image
                 tokens in one prompt, every candidate image re-read and re-encoded per query (THE BASELINE)
  transformers-sdpa   the same with attn_implementation="sdpa" (torch's scaled_dot_product_attention), the
                 attention transformers picks when none is asked for: what a user gets (the second baseline)
  torch          the project's Retriever on its PyTorch fallback (TorchBackend), ICM, token cache
  ort-fp32/int8/int4   the project's Retriever on ONNX Runtime packs, ICM, token cache; INT8 = `--mode
                 int8-dynamic`'s defaults (every graph dynamic, the decoder's down_proj and LM head in 8-bit blocks),
                 INT4 = `--mode int4`'s defaults on the decoder (calibration.quantize)
  ort-fp32-full  ONNX Runtime fp32 without the ICM (full cached candidate tokens): splits the gain into what the
                 cache/runtime buys and what the ICM buys
  ort-int8-icm-v1  (--legacy-icm) the INT8 pack with the ICM relation graph as exported before issue 20 (the query
                 expanded over the K candidates): the ICM step before vs after, in the same run
All rerank the K candidates in ONE window (window = K), with Budget(think, inspect); the baseline generates think
+ the tokens the project spends closing the reasoning and writing the answer. Queries are interleaved across the
configurations (query i goes to every worker before query i+1) after one warm-up query per K.

Parts: (1) latency, decoder tokens and peak RSS vs K on a random `--preset` checkpoint with `--size`-px photos;
(2) vs candidate image size at K = `--size-k`; (3) on the embedded default (model/default) when it exists:
Recall@1/5/10 of every configuration at one budget, and Recall against think/inspect budgets on ONNX Runtime fp32.
Random weights produce garbage text: their recall is not reported, only their cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

from _common import (REPO, WorkerError, close_all, machine, memory, run_interleaved, start_workers, summarize,
                     versions)

import _prep

LABELS = {
    "transformers": "transformers eager, full tokens (baseline)",
    "transformers-sdpa": "transformers SDPA (its default), full tokens (second baseline)",
    "torch": "retrv PyTorch fallback, ICM",
    "ort-fp32": "retrv ONNX Runtime fp32, ICM",
    "ort-int8": "retrv ONNX Runtime INT8, ICM",
    "ort-int4": "retrv ONNX Runtime INT4, ICM",
    "ort-fp32-full": "retrv ONNX Runtime fp32, no ICM (full cached tokens)",
    "ort-int8-icm-v1": "retrv ONNX Runtime INT8, ICM graph before issue 20 (query expanded over K)",
}
# The pinned protocol of the K part (docs/BENCHMARKS.md): the defaults of the flags below, written once here.
# 20 queries: p95 of 20 samples is the 19th-20th order statistic, the fewest that make a p95 mean something;
# 1 thread per configuration: on the shared 2-core machine 2 threads per process oversubscribe the cores.
PROTOCOL = {"preset": "mid", "ks": [50], "queries": 20, "warmup": 1, "think": 32, "inspect": 3, "size": 224,
            "corpus": 50, "threads": 1}
BASELINE = "transformers"
DEFAULT_CKPT = REPO / "model" / "default"
KS_RECALL = (1, 5, 10)


# -------------------------------------------------------------------------------------------------- aggregation
def aggregate(replies: list[dict], positives: list[list[str]] | None) -> dict:
    stages: dict[str, list[float]] = {}
    for r in replies:
        for k, v in r["timings_ms"].items():
            stages.setdefault(k, []).append(v)
    keys = sorted({k for r in replies for k in r["tokens"]})
    out = {"queries": len(replies),
           "latency_ms": {k: summarize(v) for k, v in stages.items()},
           "tokens": {k: sum(r["tokens"].get(k, 0) for r in replies) / max(1, len(replies)) for k in keys},
           "answered_rate": sum(bool(r.get("answered")) for r in replies) / max(1, len(replies)),
           "rss_during_queries_mb": max((r.get("rss_mb", 0) for r in replies), default=None)}
    if positives is not None and replies:
        from retrv.runtime.metrics import recall_at_k

        pos = positives[: len(replies)]
        out["recall"] = {"reranked": recall_at_k([r["ranked"] for r in replies], pos, KS_RECALL),
                         "coarse": recall_at_k([r["coarse"] for r in replies], pos, KS_RECALL)}
    return out


def answer_tokens(tokenizer_json: Path, k: int) -> int:
    """Tokens the project spends after the think budget: close the reasoning, open the answer, the index, close."""
    from retrv.runtime.inputs.prompt import PromptTokenizer
    from retrv.runtime.rerank.prompt import RerankTemplate

    tok, t = PromptTokenizer(tokenizer_json), RerankTemplate()
    return len(tok.encode_text(f"\n{t.think_close}\n{t.answer_open}")) + len(tok.encode_text(f"{k}{t.answer_close}"))


def query_msgs(items: list[dict], k: int, think: int, inspect: int, force_length: bool, n_answer: int) -> list[dict]:
    return [{"op": "query", "text": q.get("text"), "image": q.get("image"), "k": k,
             "budget": {"think": think, "inspect": inspect}, "force_length": force_length,
             "answer_tokens": n_answer} for q in items]


def _warm(items: list, n: int) -> list:
    """Warm-up queries: the last n items (untimed)."""
    return items[-n:] if n > 0 else []


def specs(names: list[str], ckpt: Path, packs: dict, indexes: dict, ort_cache: Path, threads: int,
          random_weights: bool) -> dict[str, dict]:
    """Worker init messages; `indexes[pack_key]` is the index built with that pack. `random_weights`: suppress EOS
    in the project's rows as the baseline's min_new_tokens does (_worker.SuppressEos)."""
    common = {"threads": threads or None, "suppress_eos": random_weights}
    out = {}
    for n in names:
        if n in ("transformers", "transformers-sdpa"):
            out[n] = {"kind": "baseline", "ckpt": str(ckpt), "index": str(indexes["fp32"]),
                      "attn": "sdpa" if n.endswith("sdpa") else "eager", **common}
        elif n == "torch":
            out[n] = {"kind": "retriever", "backend": "torch", "pack": str(packs["fp32"]),
                      "index": str(indexes["fp32"]), "ckpt": str(ckpt), **common}
        else:
            key = "int8-icm-v1" if n == "ort-int8-icm-v1" else n.split("-")[1]
            if packs.get(key) is None or indexes.get(key) is None:
                continue
            out[n] = {"kind": "retriever", "backend": "ort", "pack": str(packs[key]), "index": str(indexes[key]),
                      "ort_cache": str(ort_cache), "use_icm": False if n.endswith("-full") else None, **common}
    return out


def load_info(workers) -> dict:
    return {n: {k: w.info.get(k) for k in ("load_s", "rss_mb", "modules", "processor") if k in w.info}
            for n, w in workers.items() if not w.error}


# ------------------------------------------------------------------------------------------------------ parts
def prepare_model(workdir: Path, ckpt: Path, log) -> tuple[dict, dict, dict]:
    """-> (packs {fp32, int8, int4} (None when missing), pack info, errors). Named by the checkpoint's path, so a
    checkpoint used by two parts is exported and quantized once."""
    tag = f"{ckpt.name}-{hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()[:8]}"
    pack, info = _prep.fp32_pack(workdir, ckpt, f"{tag}-pack-fp32")
    packs, infos, errors = {"fp32": pack}, {"fp32": info}, {}
    for mode in ("int8", "int4"):
        path, qinfo = _prep.quantized_pack(workdir, pack, mode, f"{tag}-pack-{mode}")
        packs[mode], infos[mode] = path, qinfo
        if path is None:
            errors[f"ort-{mode}"] = f"quantize_pack ({mode}) failed: {qinfo['error']}"
        log(f"  pack {mode}: {'FAILED ' + qinfo['error'] if path is None else 'ok'}")
    return packs, infos, errors


def k_sweep(args, workdir: Path, ckpt: Path, packs: dict, pack_errors: dict, log) -> dict:
    corpus_dir, cinfo = _prep.photo_corpus(workdir, args.size, args.corpus)
    indexes, iinfo = {}, {}
    for key, pack in packs.items():
        if pack is not None:
            indexes[key], iinfo[key] = _prep.index(workdir, pack, corpus_dir / "corpus.jsonl",
                                                   f"{args.preset}-index-{key}-{args.size}px-n{args.corpus}")
    log(f"  corpus {cinfo['images']} images at {args.size} px; indexes: "
        + ", ".join(f"{k} {v.get('build_s')} s" for k, v in iinfo.items()))
    names = ["transformers", "transformers-sdpa", "torch", "ort-fp32", "ort-int8", "ort-int4", "ort-fp32-full"]
    if args.legacy_icm and packs.get("int8-icm-v1") is not None:
        names.append("ort-int8-icm-v1")
    workers = start_workers(specs(names, ckpt, packs, indexes, workdir / "ort-cache", args.threads, True),
                            workdir / "logs")
    errors = dict(pack_errors)
    loads: dict[str, list] = {}
    photos = json.loads((corpus_dir / "queries.json").read_text())
    rows: dict[str, dict] = {n: {"label": LABELS[n], "by_k": {}} for n in names}
    phases: dict[str, dict] = {}
    load: dict = {}
    try:
        for i, k in enumerate(args.ks):
            n_answer = answer_tokens(packs["fp32"] / "tokenizer.json", k)
            n_q = args.queries
            # Warm-up before the first K only: later K find the process warm (one slow first query at a new
            # shape moves a p50 of 3-5 samples little), and a warm-up at K=50 costs the baseline a minute.
            warm = query_msgs(_warm(photos, args.warmup if i == 0 else 0), k, args.think, args.inspect, True,
                              n_answer)
            msgs = query_msgs(photos[:n_q], k, args.think, args.inspect, True, n_answer)
            t0 = time.perf_counter()
            loads[str(k)] = []
            replies = run_interleaved(workers, msgs, warm, errors, loads=loads[str(k)], log=log)
            mem = memory(workers)
            for n, rs in replies.items():
                if rs:
                    rows[n]["by_k"][str(k)] = {**aggregate(rs, None),
                                               "peak_rss_mb": mem.get(n, {}).get("peak_rss_mb")}
            phases[str(k)] = {"wall_s": round(time.perf_counter() - t0, 1), "loadavg_after": machine()["loadavg"]}
            log(f"  K={k}: {n_q} queries x {len(replies)} configurations in {time.perf_counter() - t0:.0f} s")
        load = load_info(workers)
    finally:
        close_all(workers)
    for n in names:
        rows[n]["load"] = load.get(n)
    return {"image_px": args.size, "corpus": cinfo, "indexes": iinfo, "think": args.think, "inspect": args.inspect,
            "window": "K (one window)", "threads": {n: args.threads or "library default" for n in workers},
            "phases": phases, "load_before_each_configuration": loads,
            "rows": {n: r for n, r in rows.items() if r["by_k"]}, "errors": errors}


def size_sweep(args, workdir: Path, ckpt: Path, packs: dict, log) -> dict:
    names = ["transformers", "ort-fp32"]
    corpora, indexes, iinfo = {}, {}, {}
    for s in sorted(args.sizes):
        corpora[s], _ = _prep.photo_corpus(workdir, s, args.size_corpus)
        indexes[s], iinfo[str(s)] = _prep.index(workdir, packs["fp32"], corpora[s] / "corpus.jsonl",
                                                f"{args.preset}-index-fp32-{s}px-n{args.size_corpus}")
    sizes = sorted(args.sizes)
    # Fresh workers; sizes run in ascending order, so the peak after size s covers the sizes up to s.
    workers = start_workers(specs(names, ckpt, packs, {"fp32": indexes[sizes[0]]}, workdir / "ort-cache",
                                  args.threads, True), workdir / "logs")
    errors: dict[str, str] = {}
    rows: dict[str, dict] = {n: {"label": LABELS[n], "by_size": {}} for n in names}
    phases: dict[str, dict] = {}
    k = args.size_k
    n_answer = answer_tokens(packs["fp32"] / "tokenizer.json", k)
    try:
        for i, s in enumerate(sizes):
            for n, w in workers.items():
                if not w.error:
                    try:
                        w.call({"op": "index", "path": str(indexes[s])})
                    except WorkerError as e:
                        errors[n], w.error = str(e), str(e)
            photos = json.loads((corpora[s] / "queries.json").read_text())
            warm = query_msgs(_warm(photos, args.warmup if i == 0 else 0), k, args.think, args.inspect, True,
                              n_answer)
            msgs = query_msgs(photos[: args.size_queries], k, args.think, args.inspect, True, n_answer)
            t0 = time.perf_counter()
            replies = run_interleaved(workers, msgs, warm, errors)
            mem = memory(workers)
            for n, rs in replies.items():
                if rs:
                    rows[n]["by_size"][str(s)] = {**aggregate(rs, None),
                                                  "peak_rss_mb": mem.get(n, {}).get("peak_rss_mb")}
            phases[str(s)] = {"wall_s": round(time.perf_counter() - t0, 1), "loadavg_after": machine()["loadavg"]}
            log(f"  {s} px: {len(msgs)} queries in {time.perf_counter() - t0:.0f} s")
    finally:
        close_all(workers)
    return {"k": k, "think": args.think, "corpus": args.size_corpus, "indexes": iinfo, "phases": phases,
            "rows": {n: r for n, r in rows.items() if r["by_size"]}, "errors": errors}


def _synth_config(ckpt: Path) -> dict:
    """The synthetic data the default was trained on, from its training.json when it says; else the defaults."""
    from retrv.train.synth import SynthConfig

    found: dict = {}

    def walk(obj) -> None:
        if isinstance(obj, dict):
            if not found and {"seed", "image_size", "pool_per_query"} <= set(obj):
                found.update(obj)
            for v in obj.values():
                walk(v)

    path = ckpt / "training.json"
    if path.is_file():
        record = json.loads(path.read_text())
        walk(record)
        config = record.get("config", {})
        if not found and isinstance(config.get("data"), dict) and "seed" in config:  # train.run's record
            found.update(seed=config["seed"], n_test=config["data"].get("n_test"),
                         max_objects=config["data"].get("max_objects"))
    d = SynthConfig()
    return {"seed": int(found.get("seed", d.seed)), "n_test": int(found.get("n_test") or d.n_test),
            "image_size": int(found.get("image_size", d.image_size)),
            "pool_per_query": int(found.get("pool_per_query", d.pool_per_query)),
            "max_objects": int(found.get("max_objects") or d.max_objects),
            "source": f"{path.name}" if found else "SynthConfig defaults (training.json has no dataset config)"}


def default_section(args, workdir: Path, log) -> dict:
    ckpt = Path(args.default_ckpt)
    if not (ckpt / "config.json").is_file():
        shown = ckpt.resolve().relative_to(REPO) if ckpt.resolve().is_relative_to(REPO) else ckpt
        return {"present": False, "reason": f"{shown}/config.json not found: the embedded default is not trained yet; "
                                            f"this part runs as soon as it exists"}
    from retrv.runtime.inputs.corpus import read_queries

    syn = _synth_config(ckpt)
    if args.default_n_test:
        syn.update(n_test=args.default_n_test,
                   source=syn["source"] + f"; n_test {args.default_n_test} from --default-n-test")
    data, dinfo = _prep.synth_test_set(workdir, syn["seed"], syn["n_test"], syn["image_size"], syn["pool_per_query"],
                                       syn["max_objects"])
    packs, pinfo, errors = prepare_model(workdir, ckpt, log)
    indexes = {}
    for key, pack in packs.items():
        if pack is not None:
            indexes[key], _ = _prep.index(workdir, pack, data / "corpus_test.jsonl",
                                          f"{pack.name.replace('-pack-', '-index-')}-{data.name}")
    queries = read_queries(data / "queries_test.jsonl")[: args.default_queries]
    items = [{"text": q.query_txt, "image": q.query_img_path} for q in queries]
    positives = [list(q.pos_cand_list) for q in queries]
    names = ["transformers", "torch", "ort-fp32", "ort-int8", "ort-int4"]
    workers = start_workers(specs(names, ckpt, packs, indexes, workdir / "ort-cache", args.threads, False),
                            workdir / "logs")
    k, think, inspect = args.default_k, args.default_think, args.default_inspect
    n_answer = answer_tokens(ckpt / "tokenizer.json", k)
    rows, sweep, load = {}, [], {}
    try:
        t0 = time.perf_counter()
        replies = run_interleaved(workers, query_msgs(items, k, think, inspect, False, n_answer),
                                  query_msgs(_warm(items, args.warmup), k, think, inspect, False, n_answer), errors)
        mem = memory(workers)
        for n, rs in replies.items():
            if rs:
                rows[n] = {"label": LABELS[n], **aggregate(rs, positives),
                           "peak_rss_mb": mem.get(n, {}).get("peak_rss_mb")}
        log(f"  default, {len(items)} queries x {len(replies)} configurations in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        sweep_workers = {n: w for n, w in workers.items() if n in args.sweep_configs}
        for ins in args.sweep_inspect:
            for th in args.sweep_think:
                rs = run_interleaved(sweep_workers, query_msgs(items, k, th, ins, False, n_answer), [], errors)
                for n, r in rs.items():
                    if r:
                        agg = aggregate(r, positives)
                        sweep.append({"config": n, "think": th, "inspect": ins, "recall": agg["recall"],
                                      "tokens": agg["tokens"], "latency_ms": agg["latency_ms"].get("total")})
        log(f"  budget sweep in {time.perf_counter() - t0:.0f} s")
        load = load_info(workers)
    finally:
        close_all(workers)
    for n in rows:
        rows[n]["load"] = load.get(n)
    return {"present": True, "checkpoint": str(ckpt), "data": {**syn, **dinfo, "queries_used": len(items)},
            "k": k, "think": think, "inspect": inspect, "packs": pinfo, "rows": rows, "sweep": sweep,
            "errors": errors}


# --------------------------------------------------------------------------------------------------------- main
def protocol_record(args) -> dict:
    """The pinned protocol, this run's values of it, and whether they match (a deviating run is labelled so)."""
    used = {"preset": args.preset, "ks": list(args.ks), "queries": args.queries, "warmup": args.warmup,
            "think": args.think, "inspect": args.inspect, "size": args.size, "corpus": args.corpus,
            "threads": args.threads}
    deviations = {k: {"protocol": v, "this_run": used[k]} for k, v in PROTOCOL.items() if used[k] != v}
    return {"pinned": dict(PROTOCOL), "this_run": used, "followed": not deviations, "deviations": deviations,
            "interleaved": "each query runs through every configuration before the next query",
            "load": "1-minute os.getloadavg() read and printed before each configuration runs each query",
            "percentiles": ["p50", "p95"], "document": "docs/BENCHMARKS.md, 'Pinned protocol'"}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="K=10 only, 2 queries, no image-size sweep (~2 minutes)")
    ap.add_argument("--preset", default=PROTOCOL["preset"], choices=("tiny", "mid"))
    ap.add_argument("--ks", type=int, nargs="+", default=PROTOCOL["ks"], help="e.g. 10 20 50 for the curve")
    ap.add_argument("--size", type=int, default=PROTOCOL["size"], help="candidate image side in px for the K sweep")
    ap.add_argument("--sizes", type=int, nargs="*", default=[112, 224, 448])
    ap.add_argument("--size-k", type=int, default=10)
    ap.add_argument("--size-corpus", type=int, default=20, help="photos per image size (>= --size-k)")
    ap.add_argument("--threads", type=int, default=PROTOCOL["threads"],
                    help="intra-op threads of every configuration (0: each library's default, every core). 1 by "
                         "default: on a shared 2-core machine 2 threads per process oversubscribe the cores")
    ap.add_argument("--corpus", type=int, default=PROTOCOL["corpus"], help="photos in the candidate pool (>= max K)")
    ap.add_argument("--queries", type=int, default=None,
                    help=f"timed queries per configuration and K ({PROTOCOL['queries']}; quick 2)")
    ap.add_argument("--size-queries", type=int, default=None, help="timed queries per image size (4; quick 2)")
    ap.add_argument("--warmup", type=int, default=PROTOCOL["warmup"],
                    help="untimed warm-up queries per configuration (before the first K)")
    ap.add_argument("--think", type=int, default=PROTOCOL["think"])
    ap.add_argument("--inspect", type=int, default=PROTOCOL["inspect"])
    ap.add_argument("--legacy-icm", action="store_true",
                    help="also time the INT8 pack with the ICM relation graph as exported before issue 20")
    ap.add_argument("--default-ckpt", default=str(DEFAULT_CKPT))
    ap.add_argument("--default-k", type=int, default=10)
    ap.add_argument("--default-think", type=int, default=128, help="the runtime's default, as the card evaluates")
    ap.add_argument("--default-inspect", type=int, default=3)
    ap.add_argument("--default-queries", type=int, default=None, help="synthetic test queries used (200; quick 10)")
    ap.add_argument("--default-n-test", type=int, default=None, help="test scenes to generate (default: training.json)")
    ap.add_argument("--sweep-think", type=int, nargs="*", default=None, help="(0 16 32 64 128; quick 0 32)")
    ap.add_argument("--sweep-inspect", type=int, nargs="*", default=None, help="(0 3)")
    ap.add_argument("--sweep-configs", nargs="*", default=["ort-fp32"])
    ap.add_argument("--skip", nargs="*", default=[], choices=("k", "sizes", "default"))
    ap.add_argument("--workdir", default=str(REPO / "bench" / ".work"))
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "e2e.json"))
    args = ap.parse_args(argv)
    quick = args.quick

    def pick(value, full, fast):
        return value if value is not None else (fast if quick else full)

    args.queries = pick(args.queries, PROTOCOL["queries"], 2)
    args.size_queries = pick(args.size_queries, 4, 2)
    args.default_queries = pick(args.default_queries, 200, 10)  # R@1 to about +-3 points (one standard error)
    args.sweep_think = pick(args.sweep_think, [0, 16, 32, 64, 128], [0, 32])
    args.sweep_inspect = pick(args.sweep_inspect, [0, 3], [0, 3])
    if quick:  # K=10 unless --ks says otherwise
        args.ks, args.sizes = ([10] if args.ks == PROTOCOL["ks"] else [min(args.ks)]), []
    if args.corpus < max(args.ks):
        ap.error(f"--corpus {args.corpus}: expected >= the largest K ({max(args.ks)})")
    if args.sizes and args.size_corpus < args.size_k:
        ap.error(f"--size-corpus {args.size_corpus}: expected >= --size-k ({args.size_k})")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    result = {"meta": {"machine_before": machine(), "versions": versions(), "argv": sys.argv[1:],
                       "quick": args.quick, "preset": args.preset}, "protocol": protocol_record(args)}
    if not result["protocol"]["followed"]:
        log(f"NOT the pinned protocol: {result['protocol']['deviations']}")
    log(f"preparing the {args.preset} checkpoint, packs (fp32, INT8, INT4) in {workdir}")
    ckpt = _prep.checkpoint(workdir, args.preset)
    packs, pinfo, pack_errors = prepare_model(workdir, ckpt, log)
    if args.legacy_icm and packs.get("int8") is not None:
        legacy_fp32, _ = _prep.legacy_icm_pack(workdir, packs["fp32"], ckpt, f"{args.preset}-pack-fp32-icm-v1")
        packs["int8-icm-v1"], pinfo["int8-icm-v1"] = _prep.quantized_pack(workdir, legacy_fp32, "int8",
                                                                          f"{args.preset}-pack-int8-icm-v1")
    result["packs"] = pinfo
    if "k" not in args.skip:
        log(f"latency vs K {args.ks} ({args.size} px candidates)")
        result["k_sweep"] = k_sweep(args, workdir, ckpt, packs, pack_errors, log)
    if args.sizes and "sizes" not in args.skip:
        log(f"latency vs candidate image size {sorted(args.sizes)} at K={args.size_k}")
        result["size_sweep"] = size_sweep(args, workdir, ckpt, packs, log)
    if "default" not in args.skip:
        log(f"embedded default ({args.default_ckpt})")
        result["default"] = default_section(args, workdir, log)
        if not result["default"]["present"]:
            log("  " + result["default"]["reason"])
    result["meta"]["machine_after"] = machine()
    result["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    from report import console

    print(console(result))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
