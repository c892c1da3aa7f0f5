"""`retrv build-engine PACK [--fp16] [--int8] [--icm-plugin CKPT]`: TensorRT engines beside a pack's ONNX graphs.

For every graph in the pack (vision, decoder, a separate embedder's two graphs `embedder_vision` and `embedder`
when the pack has one, icm_content, icm_relation) one engine,
`<role>.plan`, listed in a new manifest (written atomically, last) as a FileEntry with role `trt_<role>`, plus
`timing.cache` (role `trt_timing_cache`) so a rebuild on the same device skips tactic timing. The manifest's
`extra.tensorrt` records the device fingerprint (TensorRT version, GPU name, compute capability), the shape limits
and each engine's profiles; the runtime refuses engines whose fingerprint is not this device's
(`runtime/backends/trt.py`).

Precision comes from the graphs: networks are built strongly typed (TensorRT 11 allows nothing else; 10.x has the
flag), so an fp16 pack (`retrv export --precision fp16`, norms/rotary/softmax kept fp32 inside) gives fp16 engines
and a QDQ pack (`retrv quantize --mode int8-static`) gives INT8 by explicit quantization. No calibrator, no
BuilderFlag.FP16/INT8 (deprecated in 10.x, removed in 11). `--fp16` / `--int8` state the intent and are checked
against the pack, with a one-line error naming the graph and the command that makes the right pack.

Optimization profiles come from `EngineShapes` (named axes of the manifest's I/O specs -> min/opt/max); the decoder
gets two: prefill/extension (any sequence length, any past) and decode (one token). `--icm-plugin CKPT` exports
the ICM graphs with one `retrv::` custom node per attention core (kernels/trt_plugin.py) from the checkpoint the
pack came from, checks them against the pack's own ICM graphs, and builds the ICM engines from them.

Without a GPU this fails at once with one line saying so.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from retrv.runtime.backends.trt import ENGINE_ROLES, device_fingerprint, fingerprint_mismatch
from retrv.runtime.errors import InputError, RetrvError, require
from retrv.runtime.fsutil import atomic_write_bytes
from retrv.runtime.pack import Manifest, Pack, describe_file, write_manifest

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
TIMING_ROLE = "trt_timing_cache"
BUILD_ORDER = ("vision", "decoder", "embedder_vision", "embedder", "icm_content", "icm_relation")
Range = tuple[int, int, int]  # (min, opt, max)


class EngineBuildError(RetrvError):
    """TensorRT could not parse a graph or build its engine."""


@dataclass(frozen=True)
class EngineShapes:
    """Shape limits the engines are built for (TensorRT optimises for `opt_*` and refuses beyond `max_*`).

    Defaults: K = 50 candidates is the papers' efficiency setting (64 leaves room); 1,024 merged tokens is a
    ~900x900 px image; 8,192 positions cover a 3,371-token K=50 prompt plus inspections and a think budget."""

    max_batch: int = 4
    opt_prefill: int = 1024  # tokens per prefill/extension call
    max_seq: int = 4096
    opt_past: int = 2048  # cached positions during decode
    max_total: int = 8192  # past + new, the KV cache length
    opt_patches: int = 1024  # vision patches per call (4 patches merge into one token)
    max_patches: int = 16384
    opt_cands: int = 50
    max_cands: int = 64
    opt_cand_len: int = 256
    max_cand_len: int = 1024
    opt_query_len: int = 64
    max_query_len: int = 1024
    workspace_mb: int = 4096  # TensorRT scratch memory for tactics

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"engine shape {f.name}: got {v!r}; expected an integer >= 1")
        for opt, mx in (("opt_prefill", "max_seq"), ("opt_past", "max_total"), ("opt_patches", "max_patches"),
                        ("opt_cands", "max_cands"), ("opt_cand_len", "max_cand_len"),
                        ("opt_query_len", "max_query_len"), ("max_seq", "max_total")):
            if getattr(self, opt) > getattr(self, mx):
                raise InputError(f"engine shape {opt}={getattr(self, opt)}: expected <= {mx}={getattr(self, mx)}")
        if self.opt_past >= self.max_total:
            raise InputError(f"engine shape opt_past={self.opt_past}: expected < max_total={self.max_total}")

    def axes(self, role: str, merge: int = 4) -> list[dict[str, Range]]:
        """Named axis -> (min, opt, max), one dict per optimization profile of `role`'s graph."""
        b = (1, 1, self.max_batch)
        if role in ("vision", "embedder_vision"):
            p = (merge, max(merge, self.opt_patches), self.max_patches)
            return [{"patches": p, "tokens": tuple(x // merge for x in p)}]
        if role == "embedder":
            return [{"batch": b, "seq": (1, self.opt_prefill, self.max_seq)}]
        if role == "decoder":
            prefill = {"batch": b, "seq": (1, self.opt_prefill, self.max_seq), "past": (0, 0, self.max_total - 1),
                       "total": (1, self.opt_prefill, self.max_total)}
            decode = {"batch": b, "seq": (1, 1, 1), "past": (0, self.opt_past, self.max_total - 1),
                      "total": (1, self.opt_past + 1, self.max_total)}
            return [prefill, decode]
        if role in ("icm_content", "icm_relation"):
            return [{"cands": (1, self.opt_cands, self.max_cands), "cand_len": (1, self.opt_cand_len, self.max_cand_len),
                     "query_len": (1, self.opt_query_len, self.max_query_len)}]
        raise InputError(f"role {role!r}: expected one of {list(BUILD_ORDER)}")


def profiles_for(role: str, inputs: dict, shapes: EngineShapes, merge: int = 4) -> list[dict[str, list[list[int]]]]:
    """Input name -> [min, opt, max] shapes for each profile, from the manifest's I/O spec (ints fixed, strings
    named axes)."""
    out = []
    for axes in shapes.axes(role, merge):
        prof = {}
        for name, spec in inputs.items():
            dims = []
            for d in spec["shape"]:
                if isinstance(d, str) and d not in axes:
                    raise InputError(f"{role} input '{name}': axis {d!r} has no engine shape; expected one of "
                                     f"{sorted(axes)}")
                dims.append(axes[d] if isinstance(d, str) else (d, d, d))
            prof[name] = [[dim[i] for dim in dims] for i in range(3)]
        out.append(prof)
    return out


def plan_graphs(pack: Pack, fp16: bool, int8: bool) -> list[tuple[str, str]]:
    """(role, onnx file) to build, after checking precisions against the flags (one-line errors)."""
    from retrv.runtime.backends.fused import refuse_fused

    refuse_fused(pack, "build-engine")
    plan, any_int8 = [], False
    for role in BUILD_ORDER:
        if not pack.has(role):
            continue
        name = pack.file(role).name
        entry = pack.manifest.files[name]
        fmt = str((entry.quantization or {}).get("format", ""))
        if entry.precision == "int4":
            raise InputError(f"{name}: INT4 (MatMulNBits) graph; TensorRT engines are built from fp32, fp16 or "
                             f"QDQ INT8 graphs (use the ONNX Runtime backend for INT4 packs)")
        if entry.precision == "int8":
            if not fmt.startswith("QDQ"):
                raise InputError(f"{name}: INT8 in format {fmt or 'unknown'!r}; TensorRT needs explicit QDQ "
                                 f"quantization (`retrv quantize PACK OUT --mode int8-static`)")
            if not int8:
                raise InputError(f"{name}: a QDQ INT8 graph; pass --int8 to build INT8 engines (explicit "
                                 f"quantization), or build from the fp32/fp16 pack")
            any_int8 = True
        elif fp16 and entry.precision != "fp16":
            raise InputError(f"{name}: precision {entry.precision!r}; --fp16 builds from an fp16 pack (strongly "
                             f"typed TensorRT takes precision from the graph): `retrv export CKPT PACK "
                             f"--precision fp16`")
        plan.append((role, name))
    if int8 and not any_int8:
        raise InputError(f"{pack.path}: --int8 given but no graph is QDQ INT8; expected a pack from "
                         f"`retrv quantize PACK OUT --mode int8-static`")
    if not plan:
        raise InputError(f"{pack.path}: no ONNX graphs to build; expected a pack written by `retrv export`")
    return plan


# --------------------------------------------------------------------------------------------------- the builder
class TrtBuilder:
    """Builds one serialized engine per call, sharing one timing cache; `timing_cache()` returns it serialized."""

    def __init__(self, cache_bytes: bytes = b"", workspace_mb: int = 4096) -> None:
        self.trt = trt = require("tensorrt", "gpu")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.workspace = workspace_mb << 20
        self._cache = self.builder.create_builder_config().create_timing_cache(cache_bytes)

    def _network(self):
        trt = self.trt
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            raise EngineBuildError(f"TensorRT {trt.__version__} has no strongly typed networks; expected TensorRT "
                                   f">= 10 (precision comes from the graph, INT8 from its Q/DQ nodes)")
        return self.builder.create_network(1 << int(flag))

    def build(self, onnx_path: Path, profiles: list[dict], plugins: bool = False) -> bytes:
        trt = self.trt
        if plugins:
            from retrv.kernels.trt_plugin import register_plugins

            register_plugins()
        network = self._network()
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise EngineBuildError(f"{onnx_path.name}: TensorRT's ONNX parser failed: {errors}")
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        if hasattr(trt.BuilderFlag, "TF32"):  # on by default; an fp32 pack asked for fp32 matmuls, not 10-bit ones
            config.clear_flag(trt.BuilderFlag.TF32)
        config.set_timing_cache(self._cache, False)  # False: a cache from another device is an error, not ignored
        for prof in profiles:
            p = self.builder.create_optimization_profile()
            for name, (lo, opt, hi) in prof.items():
                p.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(p)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(f"{onnx_path.name}: TensorRT could not build an engine (see its log above)")
        return bytes(plan)

    def timing_cache(self) -> bytes:
        return bytes(self._cache.serialize())


# ---------------------------------------------------------------------------------------------- the ICM plugin
def export_icm_plugin_graphs(model, out_dir: Path) -> dict[str, Path]:
    """The pack's two ICM graphs with every attention core as one `retrv::` custom node (kernels/trt_plugin.py):
    same names, I/O and dynamic axes as `icm_content.onnx` / `icm_relation.onnx`. Returns role -> path."""
    import warnings

    import torch

    from retrv.export.graphs import FLOAT_NAMES, icm_content_spec, icm_relation_spec, sample_inputs
    from retrv.export.onnx_export import OPSET, _torch_args
    from retrv.kernels.split import SplitIcmContent, SplitIcmRelation
    from retrv.kernels.trt_plugin import NAMESPACE, OnnxPluginCores

    if model.icm is None:
        raise InputError("--icm-plugin: the checkpoint has no ICM; expected a Retrv-R1 checkpoint")
    cfg, fdt = model.cfg, FLOAT_NAMES[model.dtype]
    out = {}
    for spec, module in ((icm_content_spec(cfg, fdt), SplitIcmContent(model.icm, OnnxPluginCores)),
                         (icm_relation_spec(cfg, fdt), SplitIcmRelation(model.icm, OnnxPluginCores))):
        path = Path(out_dir) / f"{spec.role}.plugin.onnx"
        args = _torch_args(spec, sample_inputs(spec, cfg, variant=0), model.dtype)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=list(spec.inputs),
                              output_names=list(spec.outputs), dynamic_axes=spec.dynamic_axes(),
                              opset_version=OPSET, custom_opsets={NAMESPACE: 1}, dynamo=False)
        out[spec.role] = path
    return out


def _icm_plugin_graphs(pack: Pack, checkpoint: Path, out_dir: Path) -> dict[str, Path]:
    """Export the plugin graphs from `checkpoint` after checking it is the pack's: its ICM must reproduce the
    pack's ICM graphs (ONNX Runtime) on the exporter's sample inputs."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from retrv.export.graphs import IcmContentGraph, IcmRelationGraph, cast_feeds, run_torch, sample_inputs
    from retrv.export.graphs import icm_content_spec, icm_relation_spec
    from retrv.model.loading import load_checkpoint

    fp16 = pack.manifest.files[pack.file("icm_relation").name].precision == "fp16"
    model = load_checkpoint(checkpoint, dtype=torch.float32)
    model = model.half() if fp16 else model  # as `retrv export --precision fp16` makes its graphs
    fdt = "float16" if fp16 else "float32"
    for spec, module in ((icm_content_spec(model.cfg, fdt), IcmContentGraph(model)),
                         (icm_relation_spec(model.cfg, fdt), IcmRelationGraph(model))):
        feeds = cast_feeds(spec, sample_inputs(spec, model.cfg, variant=1))
        want = run_torch(module, spec, feeds)[next(iter(spec.outputs))]
        sess = ort.InferenceSession(str(pack.file(spec.role)), providers=["CPUExecutionProvider"])
        got = sess.run(None, feeds)[0].astype(np.float32)
        tol = 2e-2 if fdt == "float16" else 1e-4
        if not np.abs(got - want).max() <= tol * max(1.0, float(np.abs(want).max())):
            raise InputError(f"--icm-plugin {checkpoint}: its ICM does not reproduce {spec.filename} of "
                             f"{pack.path}; expected the checkpoint the pack was exported from")
    return export_icm_plugin_graphs(model, out_dir)


def _merge(pack: Pack, role: str) -> int:
    """Patches per merged token of the tower `role` belongs to: a separate embedder's may differ from the
    reranker's (its config is the manifest's `extra.embedder.model`)."""
    if role.startswith("embedder"):
        from retrv.runtime.config import ModelConfig

        return ModelConfig.from_dict(pack.manifest.extra["embedder"]["model"]).vision.spatial_merge_size ** 2
    return pack.model_config.vision.spatial_merge_size ** 2


# -------------------------------------------------------------------------------------------------- entry point
def build_engines(pack_dir: str | Path, fp16: bool = False, int8: bool = False, icm_plugin: str | Path | None = None,
                  shapes: EngineShapes | None = None, *, fingerprint: dict | None = None,
                  builder_factory: Callable[[bytes, int], TrtBuilder] | None = None) -> Pack:
    """Build every engine of the pack and publish them in a new manifest; returns the reopened pack.
    `fingerprint` / `builder_factory` replace the device query and TensorRT (tests without a GPU)."""
    shapes = shapes or EngineShapes()
    fp = fingerprint or device_fingerprint()  # no GPU -> one-line NoGpuError, before anything is read or written
    pack = Pack.open(pack_dir)
    plan = plan_graphs(pack, fp16, int8)
    old = pack.manifest.extra.get("tensorrt") or {}
    cache_path = pack.path / TIMING_CACHE
    same_device = isinstance(old, dict) and fingerprint_mismatch(old.get("fingerprint"), fp) is None
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() and same_device else b""
    builder = (builder_factory or TrtBuilder)(cache_bytes, shapes.workspace_mb)
    files = {n: e for n, e in pack.manifest.files.items() if not (e.role.startswith("trt_"))}
    engines = {}
    with tempfile.TemporaryDirectory(dir=pack.path, prefix=".icm-plugin-") as tmp:
        plugin_graphs = _icm_plugin_graphs(pack, Path(icm_plugin), Path(tmp)) if icm_plugin else {}
        for role, onnx_name in plan:
            entry = pack.manifest.files[onnx_name]
            profiles = profiles_for(role, entry.inputs, shapes, _merge(pack, role))
            source = plugin_graphs.get(role, pack.path / onnx_name)
            log.info("building %s engine from %s (%d profiles)", role, source.name, len(profiles))
            plan_bytes = builder.build(source, profiles, plugins=role in plugin_graphs)
            engine_name = f"{role}.plan"
            atomic_write_bytes(pack.path / engine_name, plan_bytes)
            files[engine_name] = describe_file(pack.path, engine_name, ENGINE_ROLES[role], precision=entry.precision,
                                               inputs=entry.inputs, outputs=entry.outputs)
            engines[role] = {"file": engine_name, "source": onnx_name, "source_sha256": entry.sha256,
                             "precision": entry.precision, "profiles": profiles, "icm_plugin": role in plugin_graphs}
    atomic_write_bytes(cache_path, builder.timing_cache())
    files[TIMING_CACHE] = describe_file(pack.path, TIMING_CACHE, TIMING_ROLE)
    extra = {**pack.manifest.extra, "tensorrt": {"fingerprint": fp, "shapes": asdict(shapes), "engines": engines,
                                                  "timing_cache": TIMING_CACHE}}
    write_manifest(pack.path, Manifest(**{**pack.manifest.__dict__, "files": files, "extra": extra}))
    return Pack.open(pack.path)


def _cmd_build_engine(args: argparse.Namespace) -> int:
    shape_args = {f.name: getattr(args, f.name) for f in fields(EngineShapes)
                  if getattr(args, f.name, None) is not None}
    pack = build_engines(args.pack, fp16=args.fp16, int8=args.int8, icm_plugin=args.icm_plugin,
                         shapes=EngineShapes(**shape_args))
    rec = pack.manifest.extra["tensorrt"]
    fp = rec["fingerprint"]
    print(f"built {len(rec['engines'])} engines in {pack.path} ({', '.join(rec['engines'])}) with TensorRT "
          f"{fp['tensorrt']} on {fp['gpu']} (compute {fp['compute_capability']})")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `build-engine` to the `retrv` command line."""
    p = subparsers.add_parser("build-engine", help="build TensorRT engines for a pack on this GPU",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("pack", help="pack directory (engines and the new manifest are written into it)")
    p.add_argument("--fp16", action="store_true", help="expect an fp16 pack (precision comes from the graphs)")
    p.add_argument("--int8", action="store_true", help="build the pack's QDQ INT8 graphs (explicit quantization)")
    p.add_argument("--icm-plugin", metavar="CKPT", default=None,
                   help="build the ICM engines from plugin graphs exported from this checkpoint (needs torch)")
    defaults = EngineShapes()
    for f in fields(EngineShapes):
        what = "TensorRT builder workspace, MB" if f.name == "workspace_mb" else "engine shape limit"
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=int, default=None, metavar="N",
                       help=f"{what} (default {getattr(defaults, f.name)})")
    p.set_defaults(func=_cmd_build_engine)
    return p
