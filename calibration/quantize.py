"""`retrv quantize`: an fp32 pack in, an INT8 or INT4 pack out, gated on accuracy, written atomically.

One entry point, one frozen config per mode, one handler registered per config type (torchao's shape; the
handlers are calibration/handlers.py):

    quantize_pack("pack/", "pack-int4/", Int4WeightOnlyConfig(block_size=32, algo="rtn"))

| config | ONNX Runtime tool | graphs | format |
| --- | --- | --- | --- |
| `Int8DynamicConfig` | `quantize_dynamic` (+ `calibration.matrix` for `--blockwise`) | all | MatMulInteger, u8 per-channel weights; the decoder's down_proj 8-bit MatMulNBits |
| `Int8WeightOnlyConfig` | none (`calibration.matrix`, round to nearest) | all | MatMulNBits, bits=8 |
| `Int8StaticConfig` | `quantize_static`, `QuantFormat.QDQ`, `CalibrationMethod` | all | ONNX QDQ (TensorRT's form) |
| `Int4WeightOnlyConfig` | none for mse / rtn (`calibration.matrix`); `MatMulNBitsQuantizer` for HQQ | decoder | MatMulNBits |

(GPTQ: onnxruntime's `gptq_quantize` is wired, but refused while `ort_gptq_propagates_error()` is false.)

INT4 touches the decoder only: it is what decode reads per token (bandwidth-bound). The vision tower runs once
per image, compute-bound, mostly at index time; the ICM is small and carries all the reranker knows of each
candidate; both stay fp32 in an INT4 pack (weight-only INT4 would save them bytes, not time).

What stays in float inside a quantized graph is `rules.plan_graph`'s rule. The LM head is never the mode's
quantizer's: `config.lm_head` makes it fp32 or 8-/4-bit MatMulNBits (blocks of 32, `quantize_head`), whatever the
mode. Its error lands on the logits undiluted by later layers (GPTQ/AWQ practice keeps it in 16 bits), but on a
small model with a large vocabulary it is most of the bytes a decoded token reads (SmolLM2-135M: 28M of 135M
parameters); int4, int8-weight and int8-dynamic default to an INT8 head, measured on the real-weights graft within
the perplexity goals and the mode's gate (docs/BENCHMARKS.md), int8-static keeps it fp32. A head tied to the
embedding is stored once (`share_head`): its quantized bytes go to `embed_tokens.nbits`, which the decoder reads as
external data and the runtime's embedding lookup dequantizes row by row (runtime/inputs/table.py), and
`embed_tokens.npy` is dropped. An untied embedding stays the fp32 `.npy`: only the rows of a prompt are read from it
(memory-mapped), so quantizing it would save disk, not decode time.

Fp16 packs come from `retrv export --precision fp16` (norms, rotary and softmax stay fp32 by construction); this
module starts from an fp32 pack only.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from retrv.calibration import gates, readers
from retrv.calibration.head import quantize_head, share_head
from retrv.calibration.config import (  # noqa: F401 - re-exported: the public API is quantize.*
    ALGOS,
    DEFAULT_LIMIT,
    CONFIGS,
    LM_HEAD_BLOCK,
    METHODS,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
)
from retrv.calibration.handlers import HANDLERS, Job, blockwise_graph, ort_gptq_propagates_error
from retrv.calibration.rules import plan_graph
from retrv.runtime.errors import InputError, RetrvError, require
from retrv.runtime.fsutil import atomic_dir
from retrv.runtime.inputs.table import NBITS_FILE, NBITS_ROLE
from retrv.runtime.outputs import check_output
from retrv.runtime.pack import EXTERNAL_DATA, Manifest, Pack, describe_file, write_manifest

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- entry point
@dataclass(frozen=True)
class QuantizeReport:
    out: Path
    config: dict
    sizes: dict[str, tuple[int, int]]  # graph file -> (fp32 bytes, quantized bytes), external data included
    gate: dict

    @property
    def total(self) -> tuple[int, int]:
        return sum(b for b, _ in self.sizes.values()), sum(a for _, a in self.sizes.values())


def count_matmuls(model) -> dict:
    """MatMuls quantized vs kept in float in a written graph (what was done, not what was planned)."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    # the int4 "offset" form's side products (calibration.matrix.offset_nodes) belong to their MatMulNBits
    ops = [n.op_type for n in model.graph.node
           if not (n.op_type == "MatMul" and n.name.endswith(("_blocksum", "_offset")))]
    qdq = sum(1 for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
              and producer.get(n.input[1]) == "DequantizeLinear")
    quantized = qdq + sum(ops.count(t) for t in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"))
    return {"matmuls_quantized": quantized, "matmuls_kept": ops.count("MatMul") - qdq}


def qdq_form(model) -> dict:
    """Check that a static graph is plain ONNX QDQ as TensorRT's explicit quantization consumes it: Quantize/
    DequantizeLinear in the ONNX domain, int8, every zero point 0."""
    from onnx import TensorProto, numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    zps = [consts[n.input[2]] for n in nodes if len(n.input) > 2 and n.input[2] in consts]
    return {
        "qdq_nodes": len(nodes),
        "domains": sorted({n.domain or "ai.onnx" for n in nodes}),
        "int8": all(z.data_type == TensorProto.INT8 for z in zps),
        "zero_points_all_zero": all(not numpy_helper.to_array(z).any() for z in zps),
        "per_channel_weights": sum(1 for n in nodes if any(a.name == "axis" for a in n.attribute)
                                   and n.input[0] in consts),
    }


def _graph_bytes(files: dict, name: str) -> int:
    return sum(e.bytes for n, e in files.items() if n == name or e.data_of == name)


def _check_source(src: Pack) -> None:
    for name, entry in src.manifest.files.items():
        if name.endswith(".onnx") and entry.precision != "fp32":
            raise InputError(f"{src.path}: {name} has precision {entry.precision!r}; expected an fp32 pack "
                             f"(quantization starts from fp32 weights; fp16 packs come from `retrv export "
                             f"--precision fp16`)")


def _synthetic_gate_items(folder: Path) -> list[readers.CalibItem]:
    """Without a corpus: the built-in texts plus two drawn images, so the vision graph is gated too."""
    from PIL import Image, ImageDraw

    items = gates.builtin_items()
    for k, (size, colour) in enumerate((((224, 168), (200, 40, 40)), ((168, 224), (30, 90, 200)))):
        im = Image.new("RGB", size, (235, 230, 220))
        draw = ImageDraw.Draw(im)
        draw.ellipse((20, 30, size[0] // 2 + 40, size[1] - 30), fill=colour)
        draw.rectangle((size[0] // 2, 10, size[0] - 15, size[1] // 2), fill=(40, 160, 60))
        path = folder / f"gate-{k}.png"
        im.save(path)
        items.append(readers.CalibItem(text=items[k].text, image=str(path)))
    return items


def _quantize_file(config: QuantConfig, src: Pack, name: str, tmp: Path, work: Path,
                   reader: Callable[[], readers.FeedReader]) -> dict:
    """One graph: canonicalise (Gemm -> MatMul + Add, the fused decoder's conv-form projections -> MatMul), plan the
    exclusions, quantize with the config's handler, describe what was written. Returns the manifest entries (the
    graph and its external data, if any)."""
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    from retrv.export.fused_decoder import matmul_projections

    entry = src.manifest.files[name]
    log.info("quantizing %s (%s)", name, config.mode)
    external = any(e.data_of == name for e in src.manifest.files.values())
    model = onnx.load(str(src.path / name))
    ONNXModel(model).replace_gemm_with_matmul()  # MatMulNBits and MatMulInteger take MatMul only
    if entry.role == "decoder":
        matmul_projections(model)  # the fp32 fused decoder's 1x1 Convs, the same weights as MatMuls
    plan = plan_graph(model, entry.role, getattr(config, "keep_matmuls", ()))
    head = blockwise = None
    if entry.role == "decoder":
        import numpy as np

        table = np.load(src.file("embed_tokens"), mmap_mode="r", allow_pickle=False) if src.has("embed_tokens") \
            else None
        head = quantize_head(model, config, table)
        blockwise = blockwise_graph(model, plan, config)
    canon = work / name
    onnx.save_model(model, str(canon), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=name + ".data")
    del model
    info = HANDLERS[type(config)](config, Job(entry.role, canon, tmp / name, external, plan, reader))
    table_record = None
    if head is not None and head["tied_to_embedding"]:
        table_record = share_head(tmp / name, head, external)
        head["stored_with_embedding"] = True
    written = onnx.load(str(tmp / name), load_external_data=False)
    record = {"mode": config.mode, **info, **({"blockwise": blockwise} if blockwise else {}), **plan.to_dict(),
              **count_matmuls(written), "lm_head": head or {"format": "fp32"}}
    if isinstance(config, Int8StaticConfig):
        record["qdq_check"] = form = qdq_form(written)
        trt = config.activations == "int8"
        if form["domains"] != ["ai.onnx"] or (trt and not (form["zero_points_all_zero"] and form["int8"])):
            raise RetrvError(f"{name}: static quantization produced non-standard QDQ {form}; expected ONNX-domain "
                             f"Q/DQ{', int8, zero points 0' if trt else ''}")
    files = {name: describe_file(tmp, name, entry.role, precision=config.precision, quantization=record,
                                 inputs=entry.inputs, outputs=entry.outputs)}
    if (tmp / (name + ".data")).exists():
        files[name + ".data"] = describe_file(tmp, name + ".data", EXTERNAL_DATA, data_of=name)
    if table_record is not None:
        files[NBITS_FILE] = describe_file(tmp, NBITS_FILE, NBITS_ROLE, precision=config.lm_head,
                                          quantization=table_record)
    return files


def quantize_pack(pack_dir: str | Path, out_dir: str | Path, config: QuantConfig, *,
                  answer_agreement: gates.AnswerFn | None = None) -> QuantizeReport:
    """Quantize the fp32 pack at `pack_dir` into a new pack at `out_dir` (written atomically: a failure, the
    gate's included, leaves nothing new there). Raises InputError for bad inputs, GateError over `max_drop`."""
    require("onnx", "export")
    if type(config) not in HANDLERS:
        raise InputError(f"config: got {type(config).__name__}; expected one of "
                         f"{[t.__name__ for t in HANDLERS]}")
    if isinstance(config, Int4WeightOnlyConfig) and config.algo == "gptq" and not ort_gptq_propagates_error():
        raise InputError(f"--algo gptq: onnxruntime {_version('onnxruntime')}'s GPTQ returns round-to-nearest "
                         f"weights (its error propagation reads the zero half of the triangular inverse Hessian); "
                         f"expected --algo rtn (the same weights, in seconds) or --algo hqq")
    out = check_output(out_dir, "pack", {"the pack being quantized": pack_dir, "the --calib corpus": config.calib})
    src = Pack.open(pack_dir)
    _check_source(src)
    calib_items, held = [], []
    if config.calib is not None:
        items = readers.load_items(config.calib, limit=config.num_calib + config.num_heldout)
        calib_items, held = readers.split_items(items, config.num_heldout)
    shared: list[readers.PackFeeds] = []  # built once, on the first reader that needs it

    def reader_for(role: str) -> Callable[[], readers.FeedReader]:
        def make() -> readers.FeedReader:
            if not shared:
                shared.append(readers.PackFeeds(src.path))
            return readers.make_reader(role, shared[0], calib_items, getattr(config, "decode_steps", 3))
        return make

    entries = src.manifest.files
    targets = [n for n, e in entries.items() if e.role in config.roles and n.endswith(".onnx")]
    with tempfile.TemporaryDirectory(prefix="retrv-quantize-") as work, atomic_dir(out) as tmp:
        files = {}
        for name, entry in entries.items():
            if name in targets:
                files.update(_quantize_file(config, src, name, tmp, Path(work), reader_for(entry.role)))
            elif entry.data_of not in targets:  # (the fp32 weights of a quantized graph are not copied)
                shutil.copyfile(src.path / name, tmp / name)
                files[name] = describe_file(tmp, name, entry.role, precision=entry.precision,
                                            quantization=entry.quantization, inputs=entry.inputs,
                                            outputs=entry.outputs, data_of=entry.data_of)
        if NBITS_FILE in files:  # the tied head's bytes are the table now: the .npy goes
            for table in [n for n, e in files.items() if e.role == "embed_tokens"]:
                (tmp / table).unlink()
                del files[table]
        sizes = {name: (_graph_bytes(entries, name), _graph_bytes(files, name)) for name in targets}

        m = src.manifest
        quantized_roles = {entries[n].role for n in targets}
        kept_validation = {k: v for k, v in m.validation.items() if k not in quantized_roles and k != "generation"}
        extra = {**m.extra, "quantization": {
            **{k: v for k, v in config.to_dict().items() if k != "calib"},
            "calib": Path(config.calib).name if config.calib else None,
            "calibration_items": len(calib_items) if config.needs_calib else 0,
            "heldout_items": len(held),
            "source_pack_sha256": src.sha256,
            "quantized_by": {d: _version(d) for d in ("onnxruntime", "onnx")},
        }}
        if "decoder" in quantized_roles and "decoder_projections" in extra:
            extra["decoder_projections"] = "matmul"  # the conv form was folded back before quantizing
        manifest = Manifest(**{**m.__dict__, "files": files, "validation": kept_validation, "extra": extra})
        write_manifest(tmp, manifest)

        inputs = f"held-out from {Path(config.calib).name}" if held else "built-in (no held-out corpus items)"
        gate_items = held or _synthetic_gate_items(Path(work))
        if answer_agreement is None:  # default: the runtime's reranker on a query set made of the gate items
            from retrv.calibration.answers import reranker_answers

            answer_agreement = reranker_answers(gate_items)
        result = gates.run_gate(src.path, tmp, gate_items,
                                new_tokens=config.gate_tokens, inputs=inputs, answer_agreement=answer_agreement)
        limit, limit_source = gate_limit(config, src)
        gate = {**result.to_dict(), "max_drop": limit, "limit": limit_source,
                "drop_definition": "1 - top-1 agreement (teacher-forced on the fp32 greedy tokens)"}
        gates.check_gate(result, limit)
        manifest = Manifest(**{**manifest.__dict__, "validation": {**kept_validation, "gate": gate}})
        write_manifest(tmp, manifest)
        Pack.open(tmp)  # the finished pack passes the same checks a device will run
    log.info("wrote quantized pack %s", out)
    return QuantizeReport(out=out, config=config.to_dict(), sizes=sizes, gate=gate)


def gate_limit(config: QuantConfig, src: Pack) -> tuple[float | None, str]:
    """The gate's max drop and where it came from: --max-drop, the mode's default (calibrated on real weights), or
    report-only (asked for, or a random-weight source pack: the gate still runs and is recorded)."""
    if config.max_drop != DEFAULT_LIMIT:
        return config.max_drop, "report only (asked)" if config.max_drop is None else "--max-drop"
    if src.manifest.extra.get("random_weights"):
        return None, "report only: the source checkpoint declares random weights (stress test)"
    return type(config).default_max_drop, f"default for {config.describe()} (calibrated on real weights)"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
