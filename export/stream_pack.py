"""The streaming export's driver: graphs from the template, weights in one pass, the manifest last, `--verify`
within the same memory (layer by layer, every weight against the checkpoint, greedy on a truncated copy)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from retrv.export.onnx_export import OPSET
from retrv.export.stream_export import (EMBED_FILE, EMBED_PARAM, DataWriter, check_quant, checkpoint_tensors,
                                        convert, finalize_graph, plan_slots, write_embedding)
from retrv.export.stream_graphs import build_graphs
from retrv.model.config import read_config, source_record
from retrv.model.files import source_fingerprint
from retrv.runtime.fsutil import atomic_dir
from retrv.runtime.inputs.prompt import ChatTemplate
from retrv.runtime.pack import EXTERNAL_DATA, PACK_FORMAT_VERSION, Manifest, describe_file, write_manifest
from retrv.runtime.rerank.formats import ListwiseFormat

log = logging.getLogger(__name__)


def _progress(total: int):
    """Tensors written, with the bytes so far beside them; shown when retrv logs progress (`retrv -v`)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="tensor", desc="streaming weights",
                disable=not logging.getLogger("retrv").isEnabledFor(logging.INFO))


def export_streaming(ckpt: Path, out: Path, precision: str, quant, verify: bool) -> Path:
    from retrv.export.pack_export import export_icm_graphs, tokenizer_and_processor, versions

    check_quant(quant)
    tokenizer, processor = tokenizer_and_processor(ckpt)
    cfg = read_config(ckpt)
    tensors = checkpoint_tensors(ckpt)
    graphs = build_graphs(cfg, precision)  # before any weight is read: the template is its only memory
    slots, shared = plan_slots(cfg, graphs, tensors, quant, ckpt)
    with atomic_dir(out) as tmp:
        jobs = [(name, slot) for name in sorted(slots, key=lambda n: (str(tensors[n].file), tensors[n].start))
                for slot in slots[name]  # file order: each shard is read front to back once
                if slot.ref is not None and not (slot.ref.param == "lm_head.weight" and shared)]
        with _progress(len(jobs) + 1) as bar:
            embed_offset = write_embedding(tensors[EMBED_PARAM], tmp, precision)
            embed_bytes = (tmp / EMBED_FILE).stat().st_size - embed_offset
            bar.update(1)
            writer = DataWriter(tmp)
            try:
                for name, slot in jobs:
                    convert(tensors[name], slot, precision, quant, writer)
                    bar.update(1)
                    bar.set_postfix_str(f"{(writer.bytes + embed_bytes) / 2**30:.2f} GiB written", refresh=False)
            finally:
                writer.close()
        files, validation = {}, dict(graphs.validation)
        quantized = quant is not None
        for fname, model in graphs.models.items():
            mine = [s for ss in slots.values() for s in ss if s.ref is not None and s.ref.graph == fname]
            finalize_graph(model, mine, quant, embed_offset, shared, embed_bytes)
            (tmp / fname).write_bytes(model.SerializeToString())
            spec = graphs.specs[fname]
            q = quantized and fname == "decoder.onnx"
            record = None
            if q:
                record = {"mode": quant.mode, "streamed": True, **quant.to_dict(),
                          # what this path did with the head: INT4 when asked, else fp32 (no INT8 head here)
                          "lm_head": "int4" if quant.lm_head == "int4" else "fp32",
                          "quantized_matmuls": sum(1 for s in mine if s.quant)}
            files[fname] = describe_file(
                tmp, fname, spec.role, precision=quant.precision if q else precision, quantization=record,
                inputs={k: v.to_dict() for k, v in spec.inputs.items()},
                outputs={k: v.to_dict() for k, v in spec.outputs.items()})
            if (tmp / (fname + ".data")).exists():
                files[fname + ".data"] = describe_file(tmp, fname + ".data", EXTERNAL_DATA, data_of=fname)
        if cfg.icm is not None:
            export_icm_graphs(ckpt, cfg, tmp, precision, files, validation)
        files[EMBED_FILE] = describe_file(tmp, EMBED_FILE, "embed_tokens", precision=precision)
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        files["tokenizer.json"] = describe_file(tmp, "tokenizer.json", "tokenizer")
        extra = {"source_checkpoint": ckpt.name, "source_fingerprint": source_fingerprint(ckpt), **source_record(ckpt),
                 "decoder_layout": "traced",  # the streamed decoder is traced layer by layer (stream_graphs.py)
                 "streaming": {"tied_embedding_shared": shared,
                               "weights": [{**s.ref.to_dict(), "source": tensors[n].name, "quant": s.quant}
                                           for n, ss in slots.items() for s in ss if s.ref is not None]}}
        if cfg.icm is None:
            extra["rerank"] = ListwiseFormat().to_dict()
        manifest = Manifest(
            format_version=PACK_FORMAT_VERSION, model=cfg.to_dict(),
            method="retrv-r1" if cfg.icm is not None else "listwise", preprocessor=processor.to_dict(),
            prompt_template=asdict(ChatTemplate()), opset=OPSET, created_by=versions(), files=files,
            validation=validation, extra=extra)
        write_manifest(tmp, manifest)
        if verify:
            from retrv.export.stream_verify import verify_streamed_pack

            report = verify_streamed_pack(tmp, ckpt)
            manifest = Manifest(**{**manifest.__dict__, "validation": {**validation, "streaming": report}})
            write_manifest(tmp, manifest)
    log.info("wrote pack %s (streamed)", out)
    return out
