"""The `retrv` command line. Each subcommand imports what it needs when it runs, so a subcommand whose optional
dependency is missing says so in one line and the others keep working."""

from __future__ import annotations

import argparse
import logging
import sys

from retrv.runtime.errors import RetrvError


def _cmd_demo(args: argparse.Namespace) -> int:
    from retrv.runtime.demo import run_demo

    return run_demo(cache_dir=args.cache_dir, seed=args.seed, out=sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="retrv", description="Serve reasoning-based multimodal rerankers on edge devices.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the pipeline end to end on the embedded default")
    demo.add_argument("--cache-dir", default=None, help="where to keep the demo's checkpoint (default: a temp dir)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RetrvError as e:
        print(f"retrv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
