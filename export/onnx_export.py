"""PyTorch sub-model -> ONNX file, then validation of that file against the PyTorch module.

Exporter: torch's TorchScript-based `torch.onnx.export(..., dynamo=False)`. The dynamo exporter cannot express
the decoder's key-mask axis (`past + seq`, with `past` allowed to be 0) as a dynamic dimension in torch 2.13, and
the TorchScript path exports every graph here in well under a second with 1e-7-level error. See
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from retrv.export.graphs import GraphSpec, SubModel, cast_feeds, run_torch, sample_inputs
from retrv.model.config import ModelConfig
from retrv.runtime.errors import RetrvError

log = logging.getLogger(__name__)

OPSET = 18  # LayerNormalization/ReduceMean-with-axes-input era; supported by ORT >= 1.16 and TensorRT 10
PROTOBUF_LIMIT = 2**31 - 1  # a single ONNX protobuf cannot exceed 2 GB
EXTERNAL_DATA_THRESHOLD = 1 << 30  # above 1 GB of weights, keep them in <file>.data (mmap-able, under the limit)

# Validation tolerance relative to the output's scale: fp32 graphs differ from eager PyTorch by reassociation only.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


class ExportError(RetrvError):
    """Export of a sub-model failed."""


class ExportValidationError(ExportError):
    """An exported graph disagrees with the PyTorch model: names the file, output, difference and tolerance."""


def _torch_args(spec: GraphSpec, feeds: dict[str, np.ndarray], dtype: torch.dtype) -> tuple:
    args = []
    for name, ts in spec.inputs.items():
        t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
        args.append(t.to(dtype) if ts.dtype.startswith("float") else t)
    return tuple(args)


def export_onnx(sub: SubModel, cfg: ModelConfig, path: Path) -> list[Path]:
    """Export one sub-model to `path` (plus `path.data` when its weights are large). Returns the files written."""
    import onnx

    spec = sub.spec
    dtype = next(sub.module.parameters()).dtype
    args = _torch_args(spec, sample_inputs(spec, cfg, variant=0), dtype)  # traced in the model's own dtype
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.role}-") as tmp:
        raw = Path(tmp) / spec.filename
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript tracer warnings about Python ints in shapes
            torch.onnx.export(
                sub.module, args, str(raw),
                input_names=list(spec.inputs), output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )
        files, weight_bytes = save_model(onnx.load(str(raw), load_external_data=True), path)
    log.info("exported %s (%.1f MB of weights)", path.name, weight_bytes / 1e6)
    return files


def save_model(model, path: Path) -> tuple[list[Path], int]:
    """Write an onnx.ModelProto to `path`, its weights into `path.data` above EXTERNAL_DATA_THRESHOLD (the 2 GB
    protobuf limit). -> (the files written, the weight bytes)."""
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    files = [path]
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        files.append(data)
    else:
        onnx.save_model(model, str(path))
    return files, weight_bytes


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def validate_onnx(sub: SubModel, cfg: ModelConfig, path: Path, precision: str = "fp32", variants=(1, 2),
                  oracle: SubModel | None = None) -> dict:
    """Run the file in ONNX Runtime and the PyTorch module (`oracle`, default the exported module itself; for an
    fp16 graph, the fp32 model) on inputs of several shapes; raise `ExportValidationError` on the first output
    whose max abs difference exceeds tolerance x its scale."""
    spec = sub.spec
    oracle = oracle or sub
    sess = _session(path)
    tol = TOLERANCE[precision]
    worst: dict[str, float] = {}
    shapes = []
    for v in variants:
        feeds = sample_inputs(spec, cfg, variant=v)
        want = run_torch(oracle.module, oracle.spec, feeds)
        got = dict(zip(spec.outputs, sess.run(list(spec.outputs), cast_feeds(spec, feeds))))
        shapes.append({k: list(a.shape) for k, a in feeds.items() if not k.startswith("past_")})
        for name, ref in want.items():
            out = got[name]
            if out.shape != ref.shape:
                raise ExportValidationError(
                    f"{path.name} output '{name}': got shape {out.shape}; expected {ref.shape} (inputs {shapes[-1]})"
                )
            diff = float(np.abs(out.astype(np.float32) - ref).max()) if ref.size else 0.0
            limit = tol * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
            if not diff <= limit:  # also catches NaN
                raise ExportValidationError(
                    f"{path.name} output '{name}': max abs diff {diff:.3g} exceeds {limit:.3g} "
                    f"({precision} tolerance) on inputs {shapes[-1]}"
                )
            worst[name] = max(worst.get(name, 0.0), diff)
    result = {"shapes": shapes, "max_abs_diff": worst, "tolerance": tol}
    if spec.role == "decoder":
        result["uses_cache"] = check_uses_cache(sess, spec, cfg, path)
    return result


def check_uses_cache(sess, spec: GraphSpec, cfg: ModelConfig, path: Path) -> bool:
    """A cache-enabled decoder must read its past: the same new token with two different pasts must give
    different logits (a known optimum export bug produced graphs that silently ignored it)."""
    feeds = cast_feeds(spec, sample_inputs(spec, cfg, variant=0))
    logits_a = sess.run(["logits"], feeds)[0]
    other = {k: (v * -1 + 0.5).astype(v.dtype) if k.startswith("past_") else v for k, v in feeds.items()}
    logits_b = sess.run(["logits"], other)[0]
    if np.allclose(logits_a, logits_b, atol=1e-6):
        raise ExportValidationError(f"{path.name}: logits do not depend on past_key_*/past_value_*; expected a graph "
                                    f"that reads its KV cache")
    return True


def copy_into(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    return dst
