"""`retrv quantize PACK OUT --mode ...`: wired into `retrv.app.cli` through `register(subparsers)`.

Flags left out take the config dataclass's default (defaults are written once, in quantize.py); a flag that does
not apply to the chosen mode is refused rather than ignored.
"""

from __future__ import annotations

import argparse
import sys

from retrv.runtime.errors import InputError

MODES = ("int8-weight", "int8-dynamic", "int8-static", "int4")
# flag -> the modes it applies to
MODE_FLAGS = {"method": ("int8-static",), "activations": ("int8-static",), "block_size": ("int4", "int8-weight"), "algo": ("int4",),
              "zero_point": ("int4",), "blockwise": ("int8-dynamic",), "int_zero": ("int4",)}


def _fraction(text: str) -> float | str | None:
    if text == "none":  # report only
        return None
    if text == "default":  # argparse passes a string default through `type` too
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a number from 0 to 1") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"got {value}; expected a number from 0 to 1")
    return value


def _names(text: str) -> tuple[str, ...]:
    """'down_proj,o_proj' -> ('down_proj', 'o_proj'); 'none' -> ()."""
    if text == "none":
        return ()
    names = tuple(t.strip() for t in text.split(","))
    if not all(n.replace("_", "").isalnum() for n in names):
        raise argparse.ArgumentTypeError(f"got {text!r}; expected projection names separated by commas "
                                         f"(e.g. down_proj), or 'none'")
    return names


def _default(mode: str, name: str):
    """A config field's default, for help texts (the value lives in the dataclass only)."""
    from dataclasses import fields

    from retrv.calibration.config import CONFIGS

    return next(f.default for f in fields(CONFIGS[mode]) if f.name == name)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `quantize` subcommand to `retrv`'s subparsers."""
    q = subparsers.add_parser(
        "quantize", help="fp32 pack -> INT8 or INT4 pack, gated on accuracy against the fp32 pack",
        description="Quantize an fp32 pack with ONNX Runtime's quantization tools. Norms, rotary, softmax, the "
                    "attention products and the ICM's attention stay in float; the LM head follows --lm-head. "
                    "Fp16 packs come from `retrv export --precision fp16`.")
    q.add_argument("pack", help="fp32 pack directory (from `retrv export`)")
    q.add_argument("out", help="output pack directory: new, empty, or a pack (replaced atomically)")
    q.add_argument("--mode", required=True, choices=MODES)
    add_mode_options(q)
    q.add_argument("--json", action="store_true", help="print the report as one JSON object")
    q.set_defaults(func=run)
    return q


def add_mode_options(q: argparse.ArgumentParser) -> None:
    """The per-mode flags, shared by `retrv quantize` and `retrv export --quantize` (same names, same meaning)."""
    q.add_argument("--calib", default=None, metavar="CORPUS",
                   help="M-BEIR candidate JSONL, or a folder with captions.csv (image,caption) and images/: "
                        "calibration items (int8-static, int4 --algo gptq) and the gate's held-out items (all modes)")
    q.add_argument("--method", default=None, choices=["minmax", "entropy", "percentile"],
                   help=f"activation calibration for int8-static (default {_default('int8-static', 'method')})")
    q.add_argument("--activations", default=None, choices=["int8", "uint8"],
                   help="int8-static activations: int8 symmetric, TensorRT's explicit-quantization form (default), "
                        "or uint8 asymmetric, the form ONNX Runtime's CPU provider fuses into integer kernels")
    q.add_argument("--max-drop", type=_fraction, default="default", metavar="X",
                   help="refuse the pack when 1 - top-1 next-token agreement with the fp32 pack exceeds X "
                        "(default: the mode's limit, calibrated on real weights; report only for a pack the "
                        "source checkpoint marks as random weights; 'none': report only)")
    q.add_argument("--block-size", type=int, default=None,
                   help=f"int4 / int8-weight block size (default {_default('int4', 'block_size')} for int4, "
                        f"{_default('int8-weight', 'block_size')} for int8-weight)")
    q.add_argument("--algo", default=None, choices=["mse", "rtn", "hqq", "gptq"],
                   help=f"int4 algorithm: mse (each block's scale and zero point or minimum searched for the least "
                        f"squared error, llama.cpp k-quant style), rtn (the block's min/max), hqq, gptq "
                        f"(default {_default('int4', 'algo')})")
    q.add_argument("--zero-point", default=None, choices=["int", "offset", "float"],
                   help=f"int4 zero points (mse / rtn): offset (a float minimum per block, as llama.cpp's Q4_1, "
                        f"on ONNX Runtime's fast packed kernel plus a small fp32 side product); int (uint8 zero "
                        f"points, the fast kernel alone); float (--algo rtn: the same grid as offset, "
                        f"but ONNX Runtime's CPU kernel dequantizes the whole matrix on every call: several times "
                        f"slower decode) (default {_default('int4', 'zero_point')})")
    q.add_argument("--lm-head", default=None, choices=["fp32", "int8", "int4"],
                   help=f"the LM head: fp32, or 8-/4-bit MatMulNBits (blocks of 32) in any mode; a head tied to "
                        f"the embedding is stored once (default: {_default('int4', 'lm_head')}; "
                        f"{_default('int8-static', 'lm_head')} for int8-static)")
    q.add_argument("--keep-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="alias: --keep-lm-head is --lm-head fp32; --no-keep-lm-head is --lm-head int4 for "
                        "--mode int4, int8 otherwise")
    q.add_argument("--blockwise", type=_names, default=None, metavar="NAMES",
                   help=f"int8-dynamic: decoder projections (comma-separated) quantized as int8-weight's 8-bit "
                        f"blocks, activations per block, instead of one range per tensor; 'none' for plain dynamic "
                        f"quantization (default {','.join(_default('int8-dynamic', 'blockwise'))})")
    q.add_argument("--int-zero", type=_names, default=None, metavar="NAMES",
                   help="int4 offset form: decoder projections (comma-separated) given integer zero points "
                        "instead, without the side product: faster decode, less accurate (the block minimum "
                        "rounded to the scale's grid; e.g. o_proj,down_proj; default none)")
    q.add_argument("--calib-items", type=int, default=None,
                   help=f"calibration items (default {_default('int8-static', 'num_calib')})")


OPTION_FLAGS = ("calib", "method", "activations", "max_drop", "block_size", "algo", "zero_point", "lm_head",
                "keep_lm_head", "blockwise", "int_zero", "calib_items")


def build_config(args: argparse.Namespace):
    """The mode's config from the flags; None when no mode was chosen (`retrv export` without --quantize), where
    a per-mode flag is refused rather than ignored."""
    from retrv.calibration.config import CONFIGS

    if args.mode is None:
        from retrv.calibration.config import DEFAULT_LIMIT

        given = [f for f in OPTION_FLAGS if getattr(args, f) not in (None, DEFAULT_LIMIT)]
        if given:
            raise InputError(f"--{given[0].replace('_', '-')}: applies with --quantize MODE; got no --quantize")
        return None

    for flag, modes in MODE_FLAGS.items():
        if getattr(args, flag) is not None and args.mode not in modes:
            raise InputError(f"--{flag.replace('_', '-')}: applies to --mode {' / '.join(modes)}; got --mode "
                             f"{args.mode}")
    given = {"calib": args.calib, "method": args.method, "activations": args.activations,
             "block_size": args.block_size, "algo": args.algo, "zero_point": args.zero_point,
             "lm_head": lm_head(args), "blockwise": args.blockwise, "int_zero": args.int_zero,
             "num_calib": args.calib_items}
    return CONFIGS[args.mode](max_drop=args.max_drop, **{k: v for k, v in given.items() if v is not None})


def lm_head(args: argparse.Namespace) -> str | None:
    """--lm-head, or what its alias --[no-]keep-lm-head stands for; both given is refused."""
    if args.keep_lm_head is None:
        return args.lm_head
    alias = "fp32" if args.keep_lm_head else ("int4" if args.mode == "int4" else "int8")
    if args.lm_head is not None:
        flag = "--keep-lm-head" if args.keep_lm_head else "--no-keep-lm-head"
        raise InputError(f"{flag}: an alias of --lm-head {alias}; got --lm-head {args.lm_head} too; expected one "
                         f"of the two")
    return alias


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run(args: argparse.Namespace) -> int:
    import json

    from retrv.runtime.errors import require
    from retrv.runtime.outputs import check_output

    check_output(args.out, "pack", {"the pack being quantized": args.pack, "the --calib corpus": args.calib})
    require("onnx", "export")
    from retrv.calibration.quantize import quantize_pack

    report = quantize_pack(args.pack, args.out, build_config(args))
    if args.json:
        print(json.dumps({"out": str(report.out), "config": report.config,
                          "sizes": {k: {"before": b, "after": a} for k, (b, a) in report.sizes.items()},
                          "gate": report.gate}))
        return 0
    out = sys.stdout
    print(f"wrote {args.mode} pack {report.out}", file=out)
    for name, (before, after) in report.sizes.items():
        print(f"  {name:<20} {_mb(before):>12} -> {_mb(after):>12}  ({after / before:.2f}x)", file=out)
    before, after = report.total
    print(f"  {'quantized graphs':<20} {_mb(before):>12} -> {_mb(after):>12}  ({after / before:.2f}x)", file=out)
    g = report.gate
    icm = f", ICM cosine min {g['icm_cosine_min']:.4f}" if g.get("icm_cosine_min") is not None else ""
    print(f"  gate ({g['inputs']}, {g['positions']} positions): logits cosine mean {g['logits_cosine_mean']:.4f} "
          f"min {g['logits_cosine_min']:.4f}; top-1 agreement {g['top1_agreement']:.4f} (drop {g['drop']:.4f}); "
          f"embedding cosine min {g['embedding_cosine_min']:.4f}{icm}; answer agreement {g['answer_agreement']}",
          file=out)
    return 0
