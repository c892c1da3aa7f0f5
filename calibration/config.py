"""Quantization configs: one frozen dataclass per mode, validated on construction, saved in the manifest.

Light on purpose (stdlib only): the CLI builds its parser from these without importing onnx or onnxruntime.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from retrv.runtime.errors import InputError

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_LIMIT = "default"  # QuantConfig.max_drop: the mode's calibrated default limit
ALGOS = ("mse", "rtn", "hqq", "gptq")  # mse: a least-squares search per block (calibration.matrix)
ZERO_POINTS = ("int", "offset", "float")  # int4's asymmetric forms (calibration.matrix)
# The LM head: kept in fp32, or MatMulNBits (8 or 4 bits, blocks of LM_HEAD_BLOCK) through calibration.matrix,
# whatever the mode's own format for the other MatMuls.
LM_HEADS = ("fp32", "int8", "int4")
LM_HEAD_BLOCK = 32  # llama.cpp's Q8_0/Q4_1 block; MatMulNBits' most tuned CPU path
# MatMulNBits takes power-of-two blocks of at least 16 (ORT's contrib op spec).
MIN_BLOCK = 16


def _check_fraction(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0) \
            or not math.isfinite(value):
        raise InputError(f"{name}: got {value!r}; expected a number from 0 to 1")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}: got {value!r}; expected an integer >= 1")


def _check_block(name: str, b) -> None:
    if isinstance(b, bool) or not isinstance(b, int) or b < MIN_BLOCK or b & (b - 1):
        raise InputError(f"{name}: got {b!r}; expected a power of two >= {MIN_BLOCK} (MatMulNBits)")


def _projections(name: str, value, example: str) -> tuple[str, ...]:
    """A tuple of decoder projection names (e.g. ('down_proj',)); a string, a non-sequence or an empty name is
    refused (a bare string would otherwise be read one letter at a time)."""
    if not isinstance(value, (tuple, list)) or not all(isinstance(k, str) and k for k in value):
        raise InputError(f"{name}: got {value!r}; expected projection names such as {example}, or () for none")
    return tuple(value)


# ------------------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class QuantConfig:
    """What every mode shares. `calib` is a corpus (M-BEIR candidate JSONL, or a folder with captions.csv and
    images/): calibration items for the modes that calibrate, and the accuracy gate's held-out items for all."""

    calib: str | None = None
    # The LM head's format (LM_HEADS). Tied to the embedding, a quantized head is stored once and the runtime's
    # embedding lookup dequantizes its rows (runtime/inputs/table.py). Covered by the mode's gate like the rest.
    lm_head: str = "fp32"
    num_calib: int = 16  # calibration items; ORT's docs suggest tens to hundreds, decode-like steps multiply them
    num_heldout: int = 4  # gate items, never used for calibration
    gate_tokens: int = 16  # positions per gate item: the prefill's last position + 15 teacher-forced steps
    # Refuse when 1 - top-1 agreement exceeds this. DEFAULT: the mode's `default_max_drop`, calibrated on real
    # weights (the SmolLM2 graft, docs/BENCHMARKS.md), unless the source pack records random weights, where the
    # gate runs as a stress test and reports only (a random model's near-ties make top-1 meaningless).
    # None: report only, whatever the weights.
    max_drop: float | str | None = "default"

    mode: ClassVar[str] = ""
    precision: ClassVar[str] = "int8"  # what the manifest says of a quantized graph
    roles: ClassVar[tuple[str, ...]] = ("vision", "decoder", "icm_content", "icm_relation")
    needs_calib: ClassVar[bool] = False
    # Default gate limits, calibrated on the SmolLM2 graft (docs/BENCHMARKS.md): the drop the mode's default
    # settings measured there (int8-dynamic: 0.240 on the gate's 96 built-in positions) plus room for the gate's
    # granularity (0.01 a position) and for a prompt set that differs.
    default_max_drop: ClassVar[float] = 0.3

    def __post_init__(self) -> None:
        if self.calib is not None and not isinstance(self.calib, (str, Path)):
            raise InputError(f"--calib: got {self.calib!r}; expected a path")
        if self.calib is not None:
            object.__setattr__(self, "calib", str(self.calib))
        if self.lm_head not in LM_HEADS:
            raise InputError(f"--lm-head: got {self.lm_head!r}; expected one of {list(LM_HEADS)}")
        for name in ("num_calib", "num_heldout", "gate_tokens"):
            _check_positive(name, getattr(self, name))
        if self.max_drop != DEFAULT_LIMIT:
            _check_fraction("--max-drop", self.max_drop)
        if self.needs_calib and self.calib is None:
            raise InputError(f"--calib: required for {self.describe()}; expected a corpus (M-BEIR JSONL or a folder "
                             f"with captions.csv and images/)")

    def describe(self) -> str:
        return f"--mode {self.mode}"

    def to_dict(self) -> dict:
        return {"mode": self.mode, **asdict(self)}


@dataclass(frozen=True)
class Int8DynamicConfig(QuantConfig):
    """Weights per output channel; activations quantized per tensor at run time (no calibration).

    Weights default to uint8 (asymmetric): ONNX Runtime's u8 x s8 CPU kernel on x86 without VNNI (AVX2's
    vpmaddubsw) can saturate its int16 pair sums, and per-channel s8 weights make it worse; ORT's guidance is u8
    weights (or reduce_range) there. Measured on the mid config's decoder with real prompts: logits cosine
    0.978-0.993 with s8 per channel, 0.989-0.998 with u8 per channel. `weight_type="int8"` for VNNI/ARM targets."""

    per_channel: bool = True
    weight_type: str = "uint8"
    # Decoder projections written as int8-weight's form instead (8-bit MatMulNBits, blocks of `blockwise_block_size`
    # along K, uint8 zero points, activations int8 per block inside the kernel), by name. down_proj's input, the
    # SwiGLU product, has rare large values that set the whole step's per-tensor uint8 range: on the SmolLM2 graft
    # (docs/BENCHMARKS.md, "INT8 on a CPU without VNNI") the gate's top-1 goes 0.74 -> 0.88-0.94 with down_proj in
    # blocks (or in fp32), and the pack still prefills ~1.7x faster than int8-weight on AVX2, where 8-bit
    # MatMulNBits prefills slower than fp32. () is plain dynamic quantization everywhere.
    blockwise: tuple[str, ...] = ("down_proj",)
    blockwise_block_size: int = 128
    lm_head: str = "int8"  # as int8-weight's and int4's (docs/BENCHMARKS.md, "LM head")
    # Decoder MatMuls kept in fp32 by name (rules.plan_graph "sensitive"), e.g. ("down_proj",): its input is the
    # SwiGLU product, whose rare large values set the per-tensor uint8 range of the step. Measured on the SmolLM2
    # graft (docs/BENCHMARKS.md): perplexity +1.78% -> +1.14%, but the decoder grows from 0.41x to 0.56x of fp32
    # (past the 0.30x the mid config is held to) and the +0.5% goal is still missed: off by default.
    keep_matmuls: tuple[str, ...] = ()
    mode: ClassVar[str] = "int8-dynamic"

    def __post_init__(self) -> None:
        super().__post_init__()
        keep = _projections("keep_matmuls", self.keep_matmuls, "('down_proj',)")
        object.__setattr__(self, "keep_matmuls", keep)
        # a projection kept in fp32 is not also blockwise: keep_matmuls wins (it is the stronger choice)
        blockwise = _projections("--blockwise", self.blockwise, "('down_proj',)")
        object.__setattr__(self, "blockwise", tuple(b for b in blockwise if b not in keep))
        _check_block("blockwise_block_size", self.blockwise_block_size)
        if self.weight_type not in ("uint8", "int8"):
            raise InputError(f"weight_type: got {self.weight_type!r}; expected 'uint8' or 'int8'")


@dataclass(frozen=True)
class Int8StaticConfig(QuantConfig):
    """QDQ with calibrated activation ranges and per-channel symmetric S8 weights, Q/DQ on the MatMul inputs only.

    `activations="int8"` (default): symmetric S8, every zero point 0: the form TensorRT's explicit quantization
    consumes. ONNX Runtime's CPU provider fuses only the single-consumer MatMuls of that form (o_proj, down_proj)
    into integer kernels and dequantizes the other weights on every call: on the mid config a decode step takes
    ~74 ms against 16 ms in fp32. `activations="uint8"` (asymmetric) is the form ORT's CPU provider fuses
    completely (MatMulIntegerToFloat, ~11 ms), for a static pack served by ORT on a CPU; TensorRT refuses it."""

    method: str = "minmax"
    activations: str = "int8"
    percentile: float = 99.999  # for method="percentile": ORT's default
    decode_steps: int = 3  # one-token feeds after each prefill, on the real KV cache
    per_channel: bool = True
    mode: ClassVar[str] = "int8-static"
    needs_calib: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise InputError(f"--method: got {self.method!r}; expected one of {list(METHODS)}")
        if self.activations not in ("int8", "uint8"):
            raise InputError(f"--activations: got {self.activations!r}; expected 'int8' (TensorRT) or 'uint8' "
                             f"(ONNX Runtime CPU)")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50.0 < self.percentile <= 100.0:
            raise InputError(f"percentile: got {self.percentile!r}; expected a number in (50, 100]")
        if isinstance(self.decode_steps, bool) or not isinstance(self.decode_steps, int) or self.decode_steps < 0:
            raise InputError(f"decode_steps: got {self.decode_steps!r}; expected an integer >= 0")
        if self.activations == "int8" and self.lm_head != "fp32":
            raise InputError(f"--lm-head {self.lm_head}: with int8-static --activations int8 (TensorRT's QDQ form) "
                             f"expected --lm-head fp32 (MatMulNBits is an ONNX Runtime contrib op TensorRT refuses)")


@dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantConfig):
    """4-bit blockwise weights (MatMulNBits), activations in float. `accuracy_level=4` lets ONNX Runtime's CPU
    kernel quantize activations to int8 per block for the dot products (what onnxruntime-genai uses on CPU);
    0 computes in fp32.

    Default: `algo="mse"`, `zero_point="offset"`: Q4_1-like blocks (scale and float minimum) whose scale and
    minimum are searched for the least squared error (llama.cpp's make_qkx2), on ONNX Runtime's fast packed kernel,
    the minimum added by a small side product (calibration.matrix). On the SmolLM2 graft (Q4_1 weights) it is exact:
    +0.0% perplexity, where integer zero points (even searched) stay at +14% (docs/BENCHMARKS.md)."""

    block_size: int = 32
    algo: str = "mse"
    symmetric: bool = False  # asymmetric blocks (a zero point each): lower error for the same bits
    # The asymmetric form (calibration.matrix): "offset" (the Q4_1 grid on the fast kernel, + a side product),
    # "int" (uint8 zero points: the fast kernel alone), "float" (rtn only: the Q4_1 grid, but ORT 1.32's CPU kernel
    # dequantizes the whole matrix on every call for non-uint8 zeros: 4x slower decode on the graft).
    zero_point: str = "offset"
    # Decoder projections given integer zero points instead of the offset form, by name (e.g. ("o_proj",
    # "down_proj")): no side product (three small nodes a projection fewer a step: faster decode, most at two
    # threads), the block minimum rounded to the scale's grid. On the SmolLM2 graft (docs/BENCHMARKS.md, "INT4
    # with fewer side products") o_proj and down_proj so: decode 8% faster at two threads, perplexity +0.16% on the
    # captions but +9.0% on other text (the default: +0.27%): a speed point, not the default.
    int_zero: tuple[str, ...] = ()
    accuracy_level: int = 4
    decode_steps: int = 3  # GPTQ's calibration feeds, as for static INT8
    # INT8 head: on the SmolLM2 graft it is most of the bytes a decoded token reads; measured there within the
    # perplexity goal and the gate (docs/BENCHMARKS.md, "LM head").
    lm_head: str = "int8"
    mode: ClassVar[str] = "int4"
    # 0.25 refuses ORT's RTN with integer zeros (drop 0.344 on the graft) and passes float zeros (0.000), whose
    # grid the default offset form carries (top-1 0.972 vs fp32 on the captions at accuracy_level 4; its gate drop
    # on the graft is bench/quality.py's next run: docs/BENCHMARKS.md).
    default_max_drop: ClassVar[float] = 0.25
    precision: ClassVar[str] = "int4"
    roles: ClassVar[tuple[str, ...]] = ("decoder",)

    @property
    def needs_calib(self) -> bool:  # type: ignore[override]
        return self.algo == "gptq"

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise InputError(f"--algo: got {self.algo!r}; expected one of {list(ALGOS)}")
        _check_block("--block-size", self.block_size)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"accuracy_level: got {self.accuracy_level!r}; expected 0-4 (MatMulNBits)")
        if self.zero_point not in ZERO_POINTS:
            raise InputError(f"--zero-point: got {self.zero_point!r}; expected one of {list(ZERO_POINTS)}")
        if self.zero_point == "float" and self.algo == "mse":
            raise InputError("--zero-point float: applies to --algo rtn; got --algo mse (expected --zero-point "
                             "offset, the same grid on the fast kernel)")
        object.__setattr__(self, "int_zero", _projections("--int-zero", self.int_zero, "('o_proj', 'down_proj')"))
        if self.int_zero and (self.zero_point != "offset" or self.symmetric or self.algo not in ("mse", "rtn")):
            form = f"--algo {self.algo}" if self.algo not in ("mse", "rtn") else \
                ("symmetric blocks" if self.symmetric else f"--zero-point {self.zero_point}")
            raise InputError(f"--int-zero: applies to the offset form (--zero-point offset, --algo mse or rtn); got "
                             f"{form}")
        if self.algo == "hqq" and self.symmetric:
            raise InputError("--algo hqq: symmetric blocks are not supported by ORT's HQQ; expected symmetric=False")
        super().__post_init__()

    def describe(self) -> str:
        return f"--mode int4 --algo {self.algo}"


@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    """8-bit blockwise weights (com.microsoft MatMulNBits, bits=8, blocks of 128 along K, uint8 zero points: ONNX
    Runtime's CPU kernel refuses float zeros at 8 bits). No activation range is fixed per tensor at run time
    (int8-dynamic's loss on the graft): with `accuracy_level=4` (default) the kernel quantizes each row's
    activations to int8 per block of 32 for the dot products, as for int4; 0 multiplies in fp32, but ONNX Runtime
    1.32's CPU kernel then dequantizes the 8-bit weights on every call (measured on a 576x1536 matrix, one thread:
    17 ms against 0.6 ms for the fp32 MatMul and 0.03 ms at level 4).

    Every graph's weight MatMuls, as int8-dynamic; the LM head as 8-bit MatMulNBits too by default (blocks of 32).
    Measured on the SmolLM2 graft in docs/BENCHMARKS.md.

    Blocks of 128, not 32: at 8 bits a scale per 128 weights loses little (the graft's perplexity: -0.46% against
    fp32 at 128, -0.91% at 32, within the gate's +0.5% either way), and ORT's 8-bit kernel is a fifth faster at
    decode with it (8.5 against 11.1 ms/token on two threads, docs/BENCHMARKS.md) and faster at prefill."""

    block_size: int = 128
    symmetric: bool = False
    accuracy_level: int = 4
    lm_head: str = "int8"  # as int4's (docs/BENCHMARKS.md, "LM head")
    mode: ClassVar[str] = "int8-weight"
    # the graft's measured drop: 0.042 (docs/BENCHMARKS.md); 0.15 leaves room for other prompt sets
    default_max_drop: ClassVar[float] = 0.15

    def __post_init__(self) -> None:
        _check_block("--block-size", self.block_size)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"accuracy_level: got {self.accuracy_level!r}; expected 0-4 (MatMulNBits)")
        super().__post_init__()


CONFIGS = {c.mode: c for c in (Int8DynamicConfig, Int8WeightOnlyConfig, Int8StaticConfig, Int4WeightOnlyConfig)}
