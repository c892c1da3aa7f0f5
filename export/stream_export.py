"""Streaming export: a checkpoint of any size to a pack in one pass, tensor by tensor, in bounded memory.

The graphs come from `stream_graphs` (a traced one-layer template replicated to depth: no real weight is in
memory while they are built). The checkpoint is then read one tensor at a time into a fresh buffer
(`safetensors_stream`, no memory map), cast to the pack's precision or quantized (INT4 blockwise as
`com.microsoft::MatMulNBits`, through calibration.matrix, one matrix at a time), and appended
to the graph's external data file; the buffer is dropped before the next tensor. Peak memory is the template plus
the largest tensor being converted (large tables are converted in row chunks), not the model.

A tied embedding (3B) is written once, as embed_tokens.npy; the decoder's LM head is a Gemm(transB=1) whose
external data points into that same file, after its .npy header.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrv.export.safetensors_stream import TensorInfo, read_header, read_rows
from retrv.export.stream_graphs import StreamGraphs, WeightRef
from retrv.model.config import ModelConfig
from retrv.model.files import weight_files
from retrv.model.loading import hf_to_module_name
from retrv.runtime.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # row chunks of a large identity-layout tensor (embeddings, LM head): bounded fp32 buffers
ALIGN = 4096  # each tensor starts on a page in the data file, so ONNX Runtime can map it
EMBED_FILE = "embed_tokens.npy"
EMBED_PARAM = "language_model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# Decoder layer projections: the MatMuls INT4 quantizes (the LM head only with --lm-head int4).
LAYER_MATMUL = re.compile(r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
NP_DTYPE = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class Slot:
    """Where one checkpoint tensor goes: a graph initializer (possibly quantized) or the embedding table."""

    ref: WeightRef | None  # None: embed_tokens.npy
    quant: str | None = None  # "int4"
    written: dict = field(default_factory=dict)  # name -> (file, offset, length, dims, onnx dtype)


def checkpoint_tensors(ckpt: Path) -> dict[str, TensorInfo]:
    """Module parameter name -> where its tensor lies, for every shard (one header read each, no data)."""
    out = {}
    for file in weight_files(ckpt):
        for info in read_header(file):
            mapped = hf_to_module_name(info.name)
            out[mapped if mapped is not None else info.name] = info
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    import torch

    from retrv.model.qwen import Qwen2_5_VL

    with torch.device("meta"):
        model = Qwen2_5_VL(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("icm.")}


def plan_slots(cfg: ModelConfig, graphs: StreamGraphs, tensors: dict[str, TensorInfo], quant,
               ckpt: Path) -> tuple[dict[str, list[Slot]], bool]:
    """Checkpoint tensor (module name) -> its destinations; and whether the LM head shares the embedding."""
    shapes = expected_shapes(cfg)
    tied = LM_HEAD not in tensors and cfg.text.tie_word_embeddings
    for name, want in shapes.items():
        src = EMBED_PARAM if (name == LM_HEAD and tied) else name
        if src not in tensors:
            raise CheckpointError(f"{ckpt}: tensor '{src}' is missing (needed for {name})")
        if tensors[src].shape != want:
            raise CheckpointError(f"{tensors[src].file}: tensor '{tensors[src].name}' has shape "
                                  f"{tensors[src].shape}; expected {want}")
    slots: dict[str, list[Slot]] = {EMBED_PARAM: [Slot(None)]}
    # This path quantizes the head only to INT4 (ORT's 4-bit kernel, row chunks); an INT8 head (the int4 default on
    # the traced path) stays fp32 here, shared with the embedding, and the manifest says so (`check_quant`).
    keep_head = True if quant is None else quant.lm_head != "int4"
    for ref in graphs.weights:
        q = None
        if quant is not None and ref.graph == "decoder.onnx" and (
                (LAYER_MATMUL.match(ref.param) and ref.transform == "transpose")
                or (ref.param == LM_HEAD and not keep_head)):
            q = "int4"
        src = EMBED_PARAM if (ref.param == LM_HEAD and tied) else ref.param
        slots.setdefault(src, []).append(Slot(ref, q))
    shared = tied and all(s.quant is None for s in slots[EMBED_PARAM])
    return slots, shared


class DataWriter:
    """Append-only external data files, one per graph; every tensor starts on an ALIGN boundary."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.files = folder, {}
        self.bytes = 0

    def _file(self, name: str):
        if name not in self.files:
            self.files[name] = open(self.folder / name, "wb")
        return self.files[name]

    def write(self, name: str, arrays) -> tuple[int, int]:
        """Write `arrays` (an iterable of contiguous chunks) back to back; -> (offset, length)."""
        f = self._file(name)
        pad = (-f.tell()) % ALIGN
        if pad:
            f.write(b"\0" * pad)
        offset = f.tell()
        for a in arrays:
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
        self.bytes += f.tell() - offset
        return offset, f.tell() - offset

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            f.close()
        self.files = {}


def _row_chunks(info: TensorInfo, dtype) -> "iter[np.ndarray]":
    rows = info.shape[0] if info.shape else 1
    per_row = max(1, info.numel // max(rows, 1)) * 4
    step = max(1, CHUNK_BYTES // per_row)
    for r in range(0, rows, step):
        yield read_rows(info, r, min(step, rows - r)).astype(dtype, copy=False)


def quantize_int4(w: np.ndarray, quant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A Linear weight (N, K) -> MatMulNBits' (packed (N, blocks, block/2) uint8, scales (N, blocks) fp32,
    zero points (N, ceil(blocks/2)) uint8 or None, offsets (blocks, N) fp32 for the "offset" form or None), by
    the same per-matrix quantizer `retrv quantize` uses (calibration.matrix: the config's algo, mse or rtn), so both
    paths write the same weights."""
    from retrv.calibration.matrix import quantize_matrix

    n, _ = w.shape
    m = quantize_matrix(w.T, 4, quant.block_size, "symmetric" if quant.symmetric else quant.zero_point, quant.algo)
    zp = None if m.zero_points is None else m.zero_points.reshape(n, -1)
    return m.packed, m.scales.reshape(n, m.blocks), zp, m.offsets


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, k: int,
                    offsets: np.ndarray | None = None) -> np.ndarray:
    """The inverse of `quantize_int4`: (N, K) float32 weights as MatMulNBits computes them."""
    n, blocks, half = packed.shape
    q = np.empty((n, blocks, half * 2), dtype=np.float32)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    if zp is None:
        z = np.full((n, blocks), 8.0, dtype=np.float32)
    else:
        z = np.empty((n, zp.shape[1] * 2), dtype=np.float32)
        z[:, 0::2] = zp & 0x0F
        z[:, 1::2] = zp >> 4
        z = z[:, :blocks]
    w = (q - z[..., None]) * scales.reshape(n, blocks)[..., None].astype(np.float32)
    if offsets is not None:  # (blocks, N): the "offset" form's per-block term
        w = w + offsets.astype(np.float32).reshape(blocks, n).T[..., None]
    return w.reshape(n, blocks * half * 2)[:, :k]


def convert(info: TensorInfo, slot: Slot, precision: str, quant, writer: DataWriter) -> None:
    """Read one checkpoint tensor and write it where `slot` says, in the slot's layout and precision."""
    dtype = NP_DTYPE[precision]
    ref = slot.ref
    data = ref.graph + ".data" if ref is not None else None
    if ref is None or ref.transform in ("identity", "reshape") and slot.quant is None:
        if ref is None:
            return  # the embedding table: written by `write_embedding`
        offset, length = writer.write(data, _row_chunks(info, dtype))
        slot.written[ref.init] = (data, offset, length, ref.shape, dtype)
        return
    w = read_rows(info)  # (N, K) float32; the patch embedding's 5-D (N, C, T, P, P) is flattened to it
    if slot.quant is None or ref.transform == "transpose":
        w = w.reshape(ref.shape[1], ref.shape[0]) if ref.transform == "transpose" else w.reshape(ref.shape)
    if slot.quant == "int4":
        packed, scales, zp, offsets = quantize_int4(w, quant)
        del w
        parts = {f"{ref.init}_Q4": packed, f"{ref.init}_scales": scales.reshape(-1).astype(dtype)}
        if zp is not None:
            parts[f"{ref.init}_zero_points"] = zp.reshape(-1)
        if offsets is not None:
            parts[f"{ref.init}_offsets"] = offsets.astype(dtype)
        for name, arr in parts.items():
            offset, length = writer.write(data, [arr])
            slot.written[name] = (data, offset, length, arr.shape, arr.dtype)
        return
    offset, length = writer.write(data, [np.ascontiguousarray(w.T).astype(dtype, copy=False)])
    slot.written[ref.init] = (data, offset, length, ref.shape, dtype)


def write_embedding(info: TensorInfo, folder: Path, precision: str) -> int:
    """embed_tokens.npy written in row chunks; -> the byte offset of its data (after the .npy header)."""
    dtype = np.dtype(NP_DTYPE[precision])
    with open(folder / EMBED_FILE, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": info.shape})
        offset = f.tell()
        for chunk in _row_chunks(info, dtype):
            f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
    return offset


def check_quant(quant) -> None:
    """What the streaming path quantizes on the fly: INT4 mse or rtn (offset or integer zero points). The others
    need activations or the whole graph (calibration, HQQ/GPTQ's solvers, ORT's dynamic INT8 rewrite): refused in
    one line."""
    from retrv.calibration.config import Int4WeightOnlyConfig

    if quant is None:
        return
    if isinstance(quant, Int4WeightOnlyConfig) and quant.algo in ("mse", "rtn") and quant.zero_point == "float":
        raise InputError("--zero-point float: not available in a streaming export (its verification reads uint8 "
                         "zero points or offsets); expected --zero-point offset or int, or export fp32 and run "
                         "`retrv quantize`")
    if isinstance(quant, Int4WeightOnlyConfig) and quant.int_zero:
        raise InputError(f"--int-zero {','.join(quant.int_zero)}: not available in a streaming export; expected no "
                         f"--int-zero, or export fp32 and run `retrv quantize --int-zero`")
    if not isinstance(quant, Int4WeightOnlyConfig) or quant.algo not in ("mse", "rtn"):
        raise InputError(f"--quantize {quant.mode}{' --algo ' + quant.algo if hasattr(quant, 'algo') else ''}: "
                         f"not available in a streaming export; expected --quantize int4 --algo mse or rtn, or export "
                         f"fp32 and run `retrv quantize` (needs the fp32 pack in memory)")


def _external(tensor, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def finalize_graph(model, slots: list[Slot], quant, embed_offset: int | None, shared_head: bool,
                   embed_bytes: int) -> None:
    """Point every weight initializer at its bytes; turn quantized MatMuls into MatMulNBits."""
    from onnx import TensorProto, helper

    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
            np.dtype(np.uint8): TensorProto.UINT8}
    from retrv.calibration.matrix import offset_nodes

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    block_sums: dict = {}  # the "offset" form's block sums, one per MatMul input
    for slot in slots:
        ref = slot.ref
        if ref.param == LM_HEAD and shared_head:
            _external(inits[ref.init], EMBED_FILE, embed_offset, embed_bytes)
            continue
        if slot.quant is None:
            data, offset, length, _, _ = slot.written[ref.init]
            _external(inits[ref.init], data, offset, length)
            continue
        float_type = inits[ref.init].data_type
        g.initializer.remove(inits.pop(ref.init))
        names = []
        for name, (data, offset, length, shape, dtype) in slot.written.items():
            t = TensorProto(name=name, data_type=float_type if name.endswith(("_scales", "_offsets"))
                            else elem[np.dtype(dtype)],
                            dims=list(shape))
            _external(t, data, offset, length)
            g.initializer.append(t)
            names.append(name)
        n_out, k_in = (ref.shape[1], ref.shape[0]) if ref.transform == "transpose" else ref.shape
        for k, node in enumerate(g.node):
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] == ref.init:
                attrs = dict(K=k_in, N=n_out, bits=4, block_size=quant.block_size)
                if quant.accuracy_level:
                    attrs["accuracy_level"] = quant.accuracy_level
                offsets = [n for n in names if n.endswith("_offsets")]
                out = node.output[0] + "_Q4" if offsets else node.output[0]
                new = [helper.make_node("MatMulNBits", [node.input[0], *(n for n in names if n not in offsets)],
                                        [out], name=node.name + "_Q4", domain="com.microsoft", **attrs)]
                if offsets:  # the "offset" form's side product (calibration.matrix)
                    side, e = offset_nodes(node.input[0], out, node.output[0], node.name, k_in, quant.block_size,
                                           offsets[0], block_sums, inits, slot.written[offsets[0]][4])
                    new += side
                    if e is not None:
                        g.initializer.extend(e if isinstance(e, list) else [e])
                g.node.remove(node)
                for j, n in enumerate(new):
                    g.node.insert(k + j, n)
                break
        else:
            raise CheckpointError(f"{ref.graph}: no MatMul reads '{ref.init}'; expected one to quantize")
    if any(s.quant for s in slots) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
