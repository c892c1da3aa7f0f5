"""The `retrv` command line. Each subcommand imports what it needs when it runs, so a subcommand whose optional
dependency is missing says so in one line and the others keep working."""

from __future__ import annotations

import argparse
import logging
import sys

from retrv.app.commands import SEED_MAX, int_in, positive_int, thread_flags
from retrv.runtime.errors import RetrvError


def _cmd_demo(args: argparse.Namespace) -> int:
    from retrv.app.demo import run_demo

    return run_demo(cache_dir=args.cache_dir, seed=args.seed, out=sys.stdout, n_queries=args.queries)


def _cmd_export(args: argparse.Namespace) -> int:
    from retrv.runtime.errors import require
    from retrv.runtime.outputs import check_output

    # checked here too, before torch is imported: a wrong path is refused in milliseconds
    check_output(args.pack, "pack", {"the checkpoint being exported": args.checkpoint,
                                     "the --embedder checkpoint": args.embedder})
    require("torch", "export")
    require("onnx", "export")
    from retrv.export.pack_export import export_pack

    from retrv.calibration.cli import build_config

    stream = {"auto": None, "on": True, "off": False}[args.stream]
    path = export_pack(args.checkpoint, args.pack, precision=args.precision, embedder=args.embedder,
                       verify=args.verify, quantize=build_config(args), stream=stream, decoder=args.decoder,
                       projections=args.projections)
    print(f"wrote pack {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import json

    from retrv.runtime.generate import load_pack_generator

    from retrv.app.commands import thread_kwargs

    kwargs = {"provider": args.provider} if args.provider else {}
    gen = load_pack_generator(args.pack, backend=args.backend, **kwargs, **thread_kwargs(args))
    result = gen.generate(args.prompt, images=args.image or [], max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.text)
        print(f"[{len(result.prompt_ids)} prompt tokens, {len(result.token_ids)} generated; "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items()) + "]", file=sys.stderr)
        for name, c in result.limits.items():
            print(f"[--{name.replace('_', '-')} {c.asked} capped to {c.capped_to}: {c.reason}]", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from retrv.runtime.errors import InputError, require

    if args.demo == (args.pack is not None) or (args.demo and args.index is not None):
        raise InputError("serve: got " + ("--demo with --pack/INDEX" if args.demo else "no --pack") +
                         "; expected `retrv serve [INDEX] --pack PACK` or `retrv serve --demo`")
    if not args.ray and (args.replicas != 1 or args.max_replicas is not None):
        raise InputError(f"serve: got --replicas {args.replicas} / --max-replicas {args.max_replicas} without --ray; "
                         f"expected them with --ray")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise InputError(f"serve: got --max-replicas {args.max_replicas}; expected at least --replicas "
                         f"({args.replicas})")
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve")
    from retrv.app.serve import serve

    pack, index = args.pack, args.index
    if args.demo:  # the embedded default's INT8 pack and index, built (once, cached) as `retrv demo` builds them
        from retrv.app.demo import build_demo

        built = build_demo(args.cache_dir)
        if built is None:
            raise InputError("serve --demo: this install ships no default checkpoint (model/default/); expected "
                             "`retrv serve INDEX --pack PACK`")
        pack, index = built[2], built[4]
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack

    # Open (and verify) both before saying where it serves: a bad path is one line, not an address then an error.
    pack = pack if isinstance(pack, Pack) else Pack.open(pack)
    if index is not None and not isinstance(index, Index):
        index = Index.open(index, pack=pack)
    api_key = args.api_key or os.environ.get("RETRV_API_KEY") or None
    where = "rerank only" if index is None else f"index {getattr(index, 'path', index)}"
    print(f"retrv serve: http://{args.host}:{args.port} ({where}{', API key required' if api_key else ''})",
          file=sys.stderr)
    app_kwargs = dict(model_name=args.model_name, api_key=api_key, workers=args.workers, max_queue=args.max_queue,
                      threads=args.threads, inter_op_threads=args.inter_op_threads, backend=args.backend,
                      cors_origins=tuple(args.cors_origin or ()))
    if args.ray:  # the same app as Ray Serve replicas (app/serve_ray.py)
        from retrv.app.serve_ray import check_shareable, serve_ray

        check_shareable(index)
        require("ray.serve", "scale")
        print(f"retrv serve: {args.replicas} Ray Serve replica(s)"
              f"{f', autoscaling to {args.max_replicas}' if args.max_replicas else ''}", file=sys.stderr)
        serve_ray(pack.path, None if index is None else index.path, host=args.host, port=args.port,
                  replicas=args.replicas, max_replicas=args.max_replicas, **app_kwargs)
        return 0
    serve(pack, index, host=args.host, port=args.port, **app_kwargs)
    return 0


def _register_optional(sub, module: str) -> None:
    """Subcommands whose modules live outside the runtime register themselves; their heavy imports happen when
    they run, so a missing optional dependency fails that subcommand alone, with an install hint."""
    import importlib

    importlib.import_module(module).register(sub)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="retrv", description="Serve reasoning-based multimodal rerankers on edge devices.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from retrv.calibration.cli import MODES, add_mode_options  # stdlib-only module: the parser stays light

    exp = sub.add_parser("export", help="checkpoint -> verified ONNX pack")
    exp.add_argument("checkpoint", help="Hugging Face Qwen2.5-VL directory (safetensors)")
    exp.add_argument("pack", help="output pack directory: new, empty or a pack (replaced atomically)")
    exp.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    exp.add_argument("--embedder", default=None,
                     help="the coarse stage's embedder: a Qwen2.5-VL-family checkpoint, or a CLIP / SigLIP / text encoder folder written by `optimum-cli export onnx` (default: the reranker's own backbone)")
    exp.add_argument("--verify", action="store_true",
                     help="also require identical greedy tokens from the pack, PyTorch and transformers "
                          "(streamed: every weight against the checkpoint, each layer against PyTorch, greedy on a "
                          "truncated copy)")
    exp.add_argument("--quantize", dest="mode", default=None, choices=MODES,
                     help="write a quantized pack (the modes and flags of `retrv quantize`)")
    exp.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                     help="read the checkpoint tensor by tensor and write weights as they come (auto: checkpoints "
                          "of 1 GiB or more)")
    exp.add_argument("--decoder", default=None, choices=["fused", "traced"],
                     help="decoder graph layout: fused (ONNX Runtime contrib ops and a preallocated KV buffer; the "
                          "default) or traced (standard ONNX ops: TensorRT; the streaming export's only layout)")
    exp.add_argument("--projections", default=None, choices=["conv", "matmul"],
                     help="the fused fp32 decoder's projections: conv (1x1 convolutions, faster decode on ONNX "
                          "Runtime's CPU kernels; the default) or matmul (faster prefill at 2+ threads); fp16 is "
                          "matmul only")
    add_mode_options(exp)
    exp.set_defaults(func=_cmd_export)

    gen = sub.add_parser("generate", help="greedy generation through a pack (no torch needed)")
    gen.add_argument("pack")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", action="append", help="image path; repeat for several, in order")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32,
                     help="a ceiling: capped to what fits the model's context after the prompt (reported)")
    gen.add_argument("--backend", default="auto", choices=["auto", "ort"])
    gen.add_argument("--provider", default=None, choices=["auto", "cpu", "cuda"], help="ONNX Runtime provider")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    thread_flags(gen)
    gen.set_defaults(func=_cmd_generate)

    from retrv.app import commands

    commands.register(sub)
    _register_optional(sub, "retrv.calibration.cli")  # retrv quantize
    _register_optional(sub, "retrv.export.trt")  # retrv build-engine

    srv = sub.add_parser("serve", help="[INDEX] --pack PACK: a Cohere-compatible rerank (and search) HTTP service")
    srv.add_argument("index", nargs="?", default=None, help="an index for /v1/search (omit: rerank only)")
    srv.add_argument("--pack", default=None)
    srv.add_argument("--demo", action="store_true", help="serve the embedded default (built as `retrv demo` builds it)")
    srv.add_argument("--cache-dir", default=None, help="with --demo: where the demo keeps its pack and index")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    srv.add_argument("--port", type=int_in(0, 65535), default=8080)
    srv.add_argument("--workers", type=int_in(1, 64), default=1,
                     help="worker processes, each with its own pack and ONNX Runtime session running one query at a "
                          "time (default 1: all cores on one query)")
    srv.add_argument("--max-queue", type=int_in(0, 10_000), default=8,
                     help="requests waiting per worker beyond the running one; the next gets 429 with Retry-After")
    thread_flags(srv, "ONNX Runtime intra-op threads per worker (default: physical cores / workers)")
    srv.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                     help="allow browser requests from this origin (repeatable; default: no CORS headers)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every endpoint but /health (or RETRV_API_KEY)")
    srv.add_argument("--model-name", default=None, help="requests' `model` must equal this (default: ignored)")
    srv.add_argument("--backend", default="auto", choices=["auto", "ort", "trt"])
    srv.add_argument("--ray", action="store_true", help="serve as a Ray Serve application (the scale extra): replicas "
                                                        "in their own processes behind Ray's HTTP proxy")
    srv.add_argument("--replicas", type=int_in(1, 1024), default=1, help="with --ray: replicas (the minimum when "
                                                                          "--max-replicas is given)")
    srv.add_argument("--max-replicas", type=int_in(1, 1024), default=None,
                     help="with --ray: let Ray's autoscaler run up to this many replicas")
    srv.set_defaults(func=_cmd_serve)

    demo = sub.add_parser("demo", help="run the pipeline end to end on the embedded default")
    demo.add_argument("--cache-dir", default=None,
                      help="where to keep the demo's data, packs and index (default: ~/.cache/retrv/demo)")
    # Each demo query is a generated scene (about 10 ms each): 10,000 is minutes of work, past it hours.
    demo.add_argument("--queries", type=int_in(1, 10_000), default=40, help="held-out queries to evaluate")
    demo.add_argument("--seed", type=int_in(0, SEED_MAX), default=0)
    demo.set_defaults(func=_cmd_demo)
    return ap


EXIT_ERROR = 2  # bad input, refused file, missing dependency: the user can fix it (also argparse's usage error)
EXIT_INTERNAL = 3  # a bug in retrv: anything else that escaped a command
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def _one_line(text: object, limit: int = 2000) -> str:
    line = " ".join(str(text).split())  # messages may quote file contents; the contract is one line
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _os_error(e: OSError) -> str:
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{where}: {reason}" if where else reason


def main(argv: list[str] | None = None) -> int:
    """Run one command. Whatever escapes it becomes one line on stderr and an exit code (EXIT_*); with -v an
    unexpected error's traceback is printed too. Nothing else reaches the user as a traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prefix = f"retrv {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RetrvError as e:
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # a path the command could not read or write, a full disk
        print(f"{prefix}: error: {_one_line(_os_error(e))}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print(f"{prefix}: error: out of memory (MemoryError); expected inputs that fit this machine's memory",
              file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        if args.verbose:
            import traceback

            traceback.print_exc(file=sys.stderr)
        hint = "" if args.verbose else "; rerun with -v for the traceback"
        print(f"{prefix}: internal error: {type(e).__name__}: {_one_line(e, 500)}{hint}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
