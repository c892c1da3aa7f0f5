"""`retrv export CKPT PACK`: a checkpoint in, a verified pack out.

Everything is written into a temporary sibling directory, every graph is validated against the PyTorch model,
`--verify` runs generation through the finished pack before it is published, and only then is the directory
renamed into place: a failed export leaves no pack and never replaces a good one.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from retrv.export.graphs import embedder_sub_models, sub_models
from retrv.export.onnx_export import OPSET, export_onnx, validate_onnx
from retrv.export.optimum_embedder import export_optimum_embedder, is_optimum_folder
from retrv.model.config import source_record
from retrv.model.files import checkpoint_file, source_fingerprint, weight_files
from retrv.model.loading import load_checkpoint
from retrv.runtime.errors import CheckpointError, InputError
from retrv.runtime.fsutil import atomic_dir
from retrv.runtime.outputs import check_output
from retrv.runtime.pack import PACK_FORMAT_VERSION, Manifest, describe_file, write_manifest
from retrv.runtime.inputs.preprocess import ImageProcessorConfig
from retrv.runtime.inputs.prompt import ChatTemplate
from retrv.runtime.rerank.formats import ListwiseFormat

log = logging.getLogger(__name__)

STREAM_ABOVE = 1 << 30  # checkpoints this size or larger stream (the traced path holds ~4x their fp32 bytes)
DECODERS = ("fused", "traced")  # export/fused_decoder.py; graphs.DecoderGraph (standard ops: TensorRT, other tools)
PROJECTIONS = ("conv", "matmul")  # the fused fp32 decoder's projections (export/fused_decoder.py, the conv form)
PRECISIONS = ("fp32", "fp16")  # fp16: weights, activations and KV in fp16; norms, rotary, softmax in fp32 inside


def versions() -> dict[str, str | None]:
    out = {}
    for dist in ("retrv-edge", "torch", "onnx", "onnxruntime", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _export_sub(sub, oracle, cfg, tmp: Path, precision: str, files: dict, validation: dict) -> None:
    written = export_onnx(sub, cfg, tmp / sub.spec.filename)
    validation[sub.spec.role] = validate_onnx(sub, cfg, written[0], precision, oracle=oracle)
    files[written[0].name] = describe_file(
        tmp, written[0].name, sub.spec.role, precision=precision,
        inputs={k: v.to_dict() for k, v in sub.spec.inputs.items()},
        outputs={k: v.to_dict() for k, v in sub.spec.outputs.items()},
    )
    for extra in written[1:]:
        files[extra.name] = describe_file(tmp, extra.name, "external_data", data_of=written[0].name)


def _export_fused_decoder(model, oracle, tmp: Path, precision: str, files: dict, validation: dict,
                          projections: str | None = None) -> None:
    """The fused-layout decoder (ORT contrib ops, shared KV buffer), built from the model's weights and validated
    call by call against the fp32 PyTorch decoder."""
    from retrv.export.fused_decoder import build_fused_decoder, fused_decoder_spec, module_weights, \
        save_fused_decoder, validate_fused
    from retrv.export.graphs import FLOAT_NAMES, DecoderGraph

    cfg = model.cfg
    spec = fused_decoder_spec(cfg, FLOAT_NAMES[model.dtype])
    conv = None if projections is None else projections == "conv"
    written = save_fused_decoder(build_fused_decoder(cfg, module_weights(model), spec.inputs["inputs_embeds"].dtype,
                                                     conv=conv), tmp / spec.filename)
    validation[spec.role] = validate_fused(written[0], cfg, DecoderGraph(oracle), precision)
    files[written[0].name] = describe_file(
        tmp, written[0].name, spec.role, precision=precision,
        inputs={k: v.to_dict() for k, v in spec.inputs.items()},
        outputs={k: v.to_dict() for k, v in spec.outputs.items()},
    )
    for extra in written[1:]:
        files[extra.name] = describe_file(tmp, extra.name, "external_data", data_of=written[0].name)


def _export_embedder(ckpt: Path, tmp: Path, precision: str, files: dict, validation: dict) -> dict:
    """A separate coarse-stage embedder (a LamRA-style Qwen2.5-VL checkpoint): its vision tower, pooled-embedding
    graph, embedding table and tokenizer, beside the reranker's. Other families (Qwen2-VL) are refused by the
    checkpoint reader with the model_type it found; CLIP/SigLIP come as optimum exports (optimum_embedder.py)."""
    tokenizer, processor = tokenizer_and_processor(ckpt, "--embedder ")
    oracle = load_checkpoint(ckpt, dtype=torch.float32)
    model = copy.deepcopy(oracle).half() if precision == "fp16" else oracle
    oracles = {s.spec.role: s for s in embedder_sub_models(oracle)}
    for sub in embedder_sub_models(model):
        _export_sub(sub, oracles[sub.spec.role], model.cfg, tmp, precision, files, validation)
    np.save(tmp / "embedder_embed_tokens.npy", np.ascontiguousarray(model.language_model.embed_tokens.weight.detach()
                                                                    .numpy()), allow_pickle=False)
    files["embedder_embed_tokens.npy"] = describe_file(tmp, "embedder_embed_tokens.npy", "embedder_embed_tokens",
                                                       precision=precision)
    shutil.copyfile(tokenizer, tmp / "embedder_tokenizer.json")
    files["embedder_tokenizer.json"] = describe_file(tmp, "embedder_tokenizer.json", "embedder_tokenizer")
    return {"model": model.cfg.to_dict(), "preprocessor": processor.to_dict(), "source_checkpoint": ckpt.name}


def tokenizer_and_processor(ckpt: Path, flag: str = "") -> tuple[Path, ImageProcessorConfig]:
    """The checkpoint's tokenizer.json path and image processor; both must be regular files inside `ckpt` (a
    symlink out of it is refused, never copied into the pack)."""
    for name in ("tokenizer.json", "preprocessor_config.json"):
        if not os.path.lexists(ckpt / name):
            raise CheckpointError(f"{flag}{ckpt}: {name} is missing; expected it beside config.json")
    tokenizer = checkpoint_file(ckpt, "tokenizer.json")
    try:
        processor = ImageProcessorConfig.from_file(checkpoint_file(ckpt, "preprocessor_config.json"))
    except InputError as e:
        raise CheckpointError(f"{flag}{ckpt}: {e}") from None
    return tokenizer, processor


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(ckpt))


def export_pack(checkpoint: str | Path, out: str | Path, precision: str = "fp32", embedder: str | Path | None = None,
                verify: bool = False, quantize=None, stream: bool | None = None, decoder: str | None = None,
                projections: str | None = None) -> Path:
    """`quantize`: a calibration config (`retrv quantize`'s modes); `stream`: True/False forces the path, None
    streams checkpoints of STREAM_ABOVE bytes or more (see docs/ARCHITECTURE.md, "Streaming export").
    `decoder`: the decoder layout, "fused" (ONNX Runtime contrib ops; the default) or "traced" (standard ops, for
    TensorRT); the streaming export writes the traced layout (None there means traced). `projections`: the fused
    fp32 decoder's projections, "conv" (1x1 convolutions: faster decode on ONNX Runtime's CPU kernels; the default)
    or "matmul" (MatMul: up to a tenth faster prefill at two threads; docs/ARCHITECTURE.md, "fp32 projections as 1x1
    convolutions"); fp16 graphs are MatMul only."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision: got {precision!r}; expected one of {list(PRECISIONS)}")
    if decoder is not None and decoder not in DECODERS:
        raise InputError(f"--decoder: got {decoder!r}; expected one of {list(DECODERS)}")
    if projections is not None:
        if projections not in PROJECTIONS:
            raise InputError(f"--projections: got {projections!r}; expected one of {list(PROJECTIONS)}")
        if decoder == "traced":
            raise InputError(f"--projections {projections}: applies to the fused decoder; got --decoder traced "
                             f"(expected --decoder fused, or no --projections)")
        if precision != "fp32" and projections == "conv":
            raise InputError(f"--projections conv: fp32 graphs only (ONNX Runtime's NCHWc kernels); got --precision "
                             f"{precision} (expected --projections matmul, or none)")
    out = check_output(out, "pack", {"the checkpoint being exported": checkpoint,
                                     "the --embedder checkpoint": embedder})
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory; expected a Hugging Face checkpoint directory")
    if stream is None:
        stream = checkpoint_bytes(ckpt) >= STREAM_ABOVE
    if stream:
        if projections is not None:
            raise InputError(f"--projections {projections}: applies to the fused decoder; the streaming export "
                             f"writes the traced one (expected --stream off for a checkpoint that fits in memory)")
        if decoder == "fused":
            raise InputError("--decoder fused: the streaming export writes the traced decoder only; expected "
                             "--decoder traced, or --stream off for a checkpoint that fits in memory")
        if embedder is not None:
            raise InputError("--embedder: not supported by the streaming export (checkpoints of "
                             f"{STREAM_ABOVE / 2**30:.0f} GiB or more); expected no --embedder")
        from retrv.export.stream_pack import export_streaming

        return export_streaming(ckpt, out, precision, quantize, verify)
    if quantize is not None:
        return _export_then_quantize(ckpt, out, precision, embedder, verify, quantize, decoder, projections)
    tokenizer, processor = tokenizer_and_processor(ckpt)
    oracle = load_checkpoint(ckpt, dtype=torch.float32)  # every graph is checked against the fp32 model
    model = copy.deepcopy(oracle).half() if precision == "fp16" else oracle
    oracles = {s.spec.role: s for s in sub_models(oracle, reference=True)}
    cfg = model.cfg
    decoder = decoder or "fused"
    with atomic_dir(out) as tmp:
        files, validation = {}, {}
        for sub in sub_models(model):
            if sub.spec.role == "decoder" and decoder == "fused":
                _export_fused_decoder(model, oracle, tmp, precision, files, validation, projections)
                continue
            _export_sub(sub, oracles[sub.spec.role], cfg, tmp, precision, files, validation)
        # The PyTorch backend compares the fingerprint with its --checkpoint (runtime.backends.open_backend).
        extra = {"source_checkpoint": ckpt.name, "source_fingerprint": source_fingerprint(ckpt), **source_record(ckpt),
                 "decoder_layout": decoder}
        if decoder == "fused":
            extra["decoder_projections"] = projections or ("conv" if precision == "fp32" else "matmul")
        if embedder is not None and is_optimum_folder(embedder):  # CLIP / SigLIP / a text encoder from optimum
            extra["embedder"] = export_optimum_embedder(Path(embedder), tmp, files, validation)
        elif embedder is not None:
            extra["embedder"] = _export_embedder(Path(embedder), tmp, precision, files, validation)
        if cfg.icm is None:  # listwise (V-Retrver): which released prompt, answer format and target_image numbering
            extra["rerank"] = ListwiseFormat().to_dict()
        table = model.language_model.embed_tokens.weight.detach().numpy()  # fp16 in an fp16 pack: half the bytes
        np.save(tmp / "embed_tokens.npy", np.ascontiguousarray(table), allow_pickle=False)
        files["embed_tokens.npy"] = describe_file(tmp, "embed_tokens.npy", "embed_tokens", precision=precision)
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        files["tokenizer.json"] = describe_file(tmp, "tokenizer.json", "tokenizer")
        manifest = Manifest(
            format_version=PACK_FORMAT_VERSION,
            model=cfg.to_dict(),
            method="retrv-r1" if cfg.icm is not None else "listwise",
            preprocessor=processor.to_dict(),
            prompt_template=asdict(ChatTemplate()),
            opset=OPSET,
            created_by=versions(),
            files=files,
            validation=validation,
            extra=extra,
        )
        write_manifest(tmp, manifest)
        if verify:
            from retrv.export.verify import verify_pack

            report = verify_pack(tmp, ckpt, oracle, precision)
            manifest = Manifest(**{**manifest.__dict__, "validation": {**validation, "generation": report}})
            write_manifest(tmp, manifest)
        del model, oracle
    log.info("wrote pack %s", out)
    return out


def _export_then_quantize(ckpt: Path, out: Path, precision: str, embedder, verify: bool, quantize,
                          decoder: str | None = None, projections: str | None = None) -> Path:
    """Small checkpoints: the traced fp32 pack, then `retrv quantize` with the same config, into `out`."""
    import tempfile

    from retrv.calibration.quantize import quantize_pack

    if precision != "fp32":
        raise InputError(f"--precision {precision} with --quantize {quantize.mode}: quantization starts from fp32 "
                         f"weights; expected --precision fp32")
    with tempfile.TemporaryDirectory(prefix="retrv-export-") as work:
        fp32 = export_pack(ckpt, Path(work) / "fp32", "fp32", embedder, verify, stream=False, decoder=decoder,
                           projections=projections)  # quantize folds conv back to MatMul: the same pack either way
        quantize_pack(fp32, out, quantize)
    return out


def export_icm_graphs(ckpt: Path, cfg, tmp: Path, precision: str, files: dict, validation: dict) -> None:
    """The streaming path's ICM graphs: the ICM is loaded alone (its own file; a few percent of the model) and
    traced and validated like any graph."""
    from types import SimpleNamespace

    from retrv.export.graphs import FLOAT_NAMES, IcmContentGraph, IcmRelationGraph, IcmRelationReference, SubModel, \
        icm_content_spec, icm_relation_spec
    from retrv.model.files import ICM_NAME
    from retrv.model.icm import ICM
    from retrv.model.loading import read_tensors

    oracle = ICM(cfg.icm)
    oracle.load_state_dict(read_tensors(checkpoint_file(ckpt, ICM_NAME), torch.float32), strict=True, assign=True)
    oracle.eval()
    icm = copy.deepcopy(oracle).half() if precision == "fp16" else oracle
    fdt = FLOAT_NAMES[torch.float16 if precision == "fp16" else torch.float32]
    shell, ref = SimpleNamespace(icm=icm), SimpleNamespace(icm=oracle)
    for spec_fn, graph, oracle_graph in ((icm_content_spec, IcmContentGraph, IcmContentGraph),
                                         (icm_relation_spec, IcmRelationGraph, IcmRelationReference)):
        sub = SubModel(spec_fn(cfg, fdt), graph(shell))
        _export_sub(sub, SubModel(sub.spec, oracle_graph(ref)), cfg, tmp, precision, files, validation)
