"""The per-mode quantizers of `retrv quantize` (calibration.quantize): one handler registered per config type,
each turning one canonical fp32 graph (a `Job`) into its quantized form with ONNX Runtime's tools or
calibration.matrix, and returning what it did for the manifest."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrv.calibration import readers
from retrv.calibration.config import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8StaticConfig, Int8WeightOnlyConfig,
                                      QuantConfig)
from retrv.calibration.rules import Plan, of_projection
from retrv.runtime.errors import InputError, RetrvError, require

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One graph to quantize: the canonical (Gemm-free) source, where to write, and the calibration reader."""

    role: str
    src: Path  # canonical fp32 graph
    dst: Path
    external: bool  # write weights as <dst>.data (the source had external data)
    plan: Plan
    reader: Callable[[], readers.FeedReader] | None


HANDLERS: dict[type, Callable[[QuantConfig, Job], dict]] = {}


def register_handler(config_type: type):
    def wrap(fn):
        HANDLERS[config_type] = fn
        return fn
    return wrap


@contextlib.contextmanager
def quiet_ort():
    """ONNX Runtime's quantization tools log through the root logger (and one module calls `basicConfig` at
    import), print progress to stdout and warn about missing pre-processing. Library code prints nothing
    (STYLE.md): for the duration, root-logger records are dropped, stdout goes to this module's debug log."""
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()  # stops logging.warning() from calling basicConfig
    drop = logging.Filter("retrv")  # root's own records (name "root") fail it; our loggers' do not reach root's
    if guard:
        root.addHandler(guard)
    root.addFilter(drop)
    level = root.level
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(drop)
        root.setLevel(level)
        if guard:
            root.removeHandler(guard)
        if buf.getvalue().strip():
            log.debug("onnxruntime.quantization output: %s", buf.getvalue().strip()[-2000:])


@register_handler(Int8DynamicConfig)
def _int8_dynamic(config: Int8DynamicConfig, job: Job) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_ort():  # --blockwise projections are MatMulNBits already (`blockwise_graph`): not MatMuls, untouched
        quantize_dynamic(job.src, job.dst, op_types_to_quantize=["MatMul"], per_channel=config.per_channel,
                         weight_type=QuantType.QUInt8 if config.weight_type == "uint8" else QuantType.QInt8,
                         nodes_to_exclude=job.plan.exclude, use_external_data_format=job.external,
                         extra_options={"MatMulConstBOnly": True})
    weights = "uint8 asymmetric" if config.weight_type == "uint8" else "int8 symmetric"
    return {"format": "QOperator (DynamicQuantizeLinear + MatMulInteger)", "weights": weights,
            "per_channel": config.per_channel, "activations": "uint8, per tensor, at run time"}


def projection_matmuls(flag: str, projections: tuple[str, ...], plan: Plan) -> tuple[str, ...]:
    """The planned MatMuls of `projections` (names such as down_proj). A projection that names none is refused:
    a misspelt name would otherwise change nothing, silently."""
    for p in projections:
        if not any(of_projection(n, (p,)) for n in plan.quantize):
            raise InputError(f"{flag}: got {p!r}, which names no quantized MatMul of the {plan.role} graph; "
                             f"expected a projection such as down_proj, o_proj, gate_up_proj")
    return tuple(n for n in plan.quantize if of_projection(n, projections))


def blockwise_graph(model, plan: Plan, config: QuantConfig) -> dict | None:
    """int8-dynamic's `--blockwise` projections of a decoder (an onnx.ModelProto, in place, before the mode's
    quantizer runs, as `quantize_head` does the head): each MatMul named */<projection>/* becomes int8-weight's
    8-bit MatMulNBits. A projection that names no planned MatMul is refused (a misspelt name would otherwise
    quantize nothing blockwise, silently). -> what was done, for the manifest; None when nothing was asked."""
    projections = getattr(config, "blockwise", ())
    if not projections:
        return None
    from retrv.calibration.matrix import nbits_graph

    names = projection_matmuls("--blockwise", projections, plan)
    done = nbits_graph(model, names, config.blockwise_block_size, "int", 4, bits=8)
    if done != len(names):
        raise RetrvError(f"{plan.role}: {done} of {len(names)} --blockwise MatMuls became MatMulNBits; expected all "
                         f"(each a MatMul with a constant 2-D weight)")
    return {"projections": list(projections), "matmuls": done, "format": "QOperator (com.microsoft MatMulNBits)",
            "bits": 8, "block_size": config.blockwise_block_size, "zero_point": "int",
            "activations": "int8 per block inside the kernel (accuracy_level 4)"}


@register_handler(Int8WeightOnlyConfig)
def _int8_weight(config: Int8WeightOnlyConfig, job: Job) -> dict:
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    from retrv.calibration.matrix import nbits_graph

    zero_point = "symmetric" if config.symmetric else "int"
    proto = onnx.load(str(job.src))
    nbits_graph(proto, job.plan.quantize, config.block_size, zero_point, config.accuracy_level, bits=8)
    ONNXModel(proto).save_model_to_file(str(job.dst), job.external)
    return {"format": "QOperator (com.microsoft MatMulNBits)", "algo": "rtn", "bits": 8,
            "block_size": config.block_size, "symmetric": config.symmetric, "zero_point": zero_point,
            "accuracy_level": config.accuracy_level,
            "activations": "float" if config.accuracy_level in (0, 1) else
            ("int8 per block inside the kernel (accuracy_level 4)" if config.accuracy_level == 4 else
             f"accuracy_level {config.accuracy_level}")}


@register_handler(Int8StaticConfig)
def _int8_static(config: Int8StaticConfig, job: Job) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    reader = job.reader()
    trt = config.activations == "int8"
    options = {
        "ActivationSymmetric": trt,  # zero point 0: TensorRT's explicit quantization accepts nothing else
        "WeightSymmetric": True,
        "MatMulConstBOnly": True,
        # Q/DQ on the MatMul inputs only: the output stays float into the (float) residual Add, as TensorRT's own
        # QDQ producers place them; an extra int8 rounding of every projection output buys nothing.
        "OpTypesToExcludeOutputQuantization": ["MatMul"],
        # One feed per collection pass: prefill and decode feeds have different shapes, and ORT's histogram
        # calibrators (entropy, percentile) stack all feeds of a pass into one array.
        "CalibStridedMinMax": 1,
        "CalibPercentile": config.percentile,
    }
    with quiet_ort():
        quantize_static(job.src, job.dst, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=config.per_channel,
                        activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=job.plan.exclude,
                        use_external_data_format=job.external, calibrate_method=method, extra_options=options)
    return {"format": "QDQ (QuantizeLinear/DequantizeLinear, ONNX domain)", "method": config.method,
            "weights": "int8 symmetric", "per_channel": config.per_channel,
            "activations": f"{'int8 symmetric' if trt else 'uint8 asymmetric'}, per tensor, calibrated",
            "tensorrt_explicit_quantization": trt, "calibration_feeds": len(reader),
            **({"percentile": config.percentile} if config.method == "percentile" else {})}


@register_handler(Int4WeightOnlyConfig)
def _int4(config: Int4WeightOnlyConfig, job: Job) -> dict:
    import onnx

    with quiet_ort():
        from onnxruntime.quantization import matmul_nbits_quantizer as mnb

        if config.algo == "gptq":
            model = _gptq(config, job)
        else:
            if config.algo == "hqq":
                require("torch", "export")  # ORT's HQQ runs in PyTorch
                algo = mnb.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4,
                                                    op_types_to_quantize=("MatMul",))
            else:  # rtn / mse, one matrix at a time (retrv.calibration.matrix)
                algo = None
            if algo is not None:
                quantizer = mnb.MatMulNBitsQuantizer(onnx.load(str(job.src)), nodes_to_exclude=job.plan.exclude,
                                                     algo_config=algo)
                quantizer.process()
                model = quantizer.model
            else:
                from onnxruntime.quantization.onnx_model import ONNXModel

                from retrv.calibration.matrix import int4_graph

                proto = onnx.load(str(job.src))
                int_zero = projection_matmuls("--int-zero", config.int_zero, job.plan) if config.int_zero else ()
                if int_zero:  # integer zero points there, no side product (Int4WeightOnlyConfig.int_zero)
                    int4_graph(proto, int_zero, config.block_size, "int", config.accuracy_level, fit=config.algo)
                int4_graph(proto, tuple(n for n in job.plan.quantize if n not in int_zero), config.block_size,
                           "symmetric" if config.symmetric else config.zero_point, config.accuracy_level,
                           fit=config.algo)
                model = ONNXModel(proto)
        for node in model.model.graph.node:  # HQQ and GPTQ leave accuracy_level unset; one level for all
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = config.accuracy_level
                        break
                else:
                    node.attribute.append(onnx.helper.make_attribute("accuracy_level", config.accuracy_level))
        if not any(o.domain == "com.microsoft" for o in model.model.opset_import):  # GPTQ omits it
            model.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        model.save_model_to_file(str(job.dst), job.external)
    return {"format": "QOperator (com.microsoft MatMulNBits)", "algo": config.algo, "bits": 4,
            "block_size": config.block_size, "symmetric": config.symmetric if config.algo != "hqq" else False,
            "zero_point": ("symmetric" if config.symmetric else config.zero_point) if config.algo in ("rtn", "mse") else
            ("float" if config.algo == "hqq" else "int"),
            "accuracy_level": config.accuracy_level, "activations": "float",
            **({"int_zero": list(config.int_zero)} if config.int_zero else {})}


def ort_gptq_propagates_error() -> bool:
    """Whether the installed onnxruntime's GPTQ does what GPTQ is for: carry each column's rounding error into
    the columns not yet quantized. onnxruntime 1.31's (vendored `neural_compressor.weight_only.gptq`) factors the
    inverse Hessian as upper-triangular (`cholesky(inv(H)).T`) and then reads it below the diagonal
    (`Hinv1[i:, i]`, `Hinv[i2:, i1:i2]`), where it is zero: nothing propagates and the weights equal
    round-to-nearest (on a correlated 256x128 problem: output error 0.0814 for both; 0.0586 with the factor read
    the right way round). Checked on a small problem rather than assumed from the version, so a fixed release is
    picked up."""
    import numpy as np
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)) @ rng.normal(size=(64, 64))  # (S, K) correlated inputs
    w = rng.normal(size=(64, 8))  # (K, N)
    h = 2 * x.T @ x / len(x)
    kw = dict(num_bits=4, group_size=32, scheme="asym", blocksize=32, percdamp=0.01)
    with quiet_ort():
        correlated = gptq(w.copy(), h.copy(), **kw)
        independent = gptq(w.copy(), np.diag(np.diag(h)), **kw)  # a diagonal Hessian: GPTQ is RTN
    return not np.allclose(correlated, independent)


def _gptq(config: Int4WeightOnlyConfig, job: Job):
    """ORT's GPTQ (`neural_compressor.gptq_quantize`, vendored in onnxruntime). Called directly rather than
    through MatMulNBitsQuantizer, whose GPTQ path ignores `nodes_to_exclude`; excluded nodes are marked "fp32"
    in the weight config, the form gptq_quantize honours."""
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    reader = job.reader()
    scheme = "sym" if config.symmetric else "asym"
    weights = {n: {"bits": 4, "group_size": config.block_size, "scheme": scheme, "algorithm": "GPTQ"}
               for n in job.plan.quantize}
    weights.update({n: "fp32" for n in job.plan.exclude})
    # A path, not a ModelProto: gptq_quantize then handles graphs over 2 GB through their external data.
    return gptq_quantize(str(job.src), ((feed, None) for feed in reader), weight_config=weights,
                         num_bits=4, group_size=config.block_size, scheme=scheme, n_samples=-1,
                         accuracy_level=config.accuracy_level)
