"""The LM head of a decoder graph in a quantized pack: fp32, or 8-/4-bit MatMulNBits whatever the mode
(`quantize_head`), and a head tied to the embedding stored once (`share_head`): its quantized bytes go to
`embed_tokens.nbits`, read by the decoder as ONNX external data and by the runtime's embedding lookup row by row
(runtime/inputs/table.py). Used by calibration.quantize; why the head is treated apart: that module's doc."""

from __future__ import annotations

from pathlib import Path

from retrv.calibration.config import LM_HEAD_BLOCK, QuantConfig
from retrv.runtime.errors import InputError, RetrvError
from retrv.runtime.inputs.table import NBITS_FILE, PARTS, QuantizedTable

ALIGN = 4096  # each part of embed_tokens.nbits starts on a page, so ONNX Runtime can map it


def _head_node(model):
    """The decoder's LM head: the MatMul named */lm_head/* with a constant 2-D B, or None."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and "/lm_head/" in node.name and len(node.input) == 2 \
                and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            return node, inits[node.input[1]]
    return None, None


def quantize_head(model, config: QuantConfig, table) -> dict | None:
    """Replace the LM head MatMul of a decoder graph (onnx.ModelProto, in place) by MatMulNBits per
    `config.lm_head`; `table` is the pack's (vocab, hidden) embedding, to tell a tied head. -> what was done (None
    for an fp32 head)."""
    import numpy as np
    from onnx import numpy_helper

    from retrv.calibration.matrix import nbits_graph

    if config.lm_head == "fp32":
        return None
    node, init = _head_node(model)
    if node is None:
        raise InputError(f"--lm-head {config.lm_head}: the decoder graph has no LM head MatMul (*/lm_head/* with a "
                         f"constant weight); expected a pack from `retrv export`")
    w = numpy_helper.to_array(init)  # (K=hidden, N=vocab)
    tied = table is not None and tuple(table.shape) == w.shape[::-1] and bool(np.array_equal(w.T, table))
    bits = 8 if config.lm_head == "int8" else 4
    # Integer zeros: ORT's packed (fast) CPU kernels take uint8 zero points only, and the runtime's row lookup of a
    # tied head (runtime.inputs.table) reads this form; 4 bits are fitted by the least-squares search.
    zero_point, fit = "int", ("rtn" if bits == 8 else "mse")
    level = getattr(config, "accuracy_level", 4)
    nbits_graph(model, (node.name,), LM_HEAD_BLOCK, zero_point, level, bits=bits, fit=fit)
    return {"format": "com.microsoft MatMulNBits", "bits": bits, "block_size": LM_HEAD_BLOCK,
            "zero_point": zero_point, "accuracy_level": level, "node": f"{node.name}_Q{bits}",
            "tied_to_embedding": tied, "stored_with_embedding": False}


def share_head(graph: Path, head: dict, external: bool) -> dict:
    """Move the quantized head's initializers of the written decoder `graph` into `embed_tokens.nbits` (beside it)
    as ONNX external data; -> the table file's layout record (runtime/inputs/table.py reads it)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))  # external data loaded: the whole graph is written again below
    node = next((n for n in model.graph.node if n.name == head["node"]), None)
    if node is None:
        raise RetrvError(f"{graph.name}: the quantized LM head {head['node']!r} is missing after quantization; "
                         f"expected the node quantize_head wrote")
    inits = {t.name: t for t in model.graph.initializer}
    record = {k: head[k] for k in ("bits", "block_size", "zero_point")}
    shapes = {}
    with open(graph.parent / NBITS_FILE, "wb") as f:
        for part, name in zip(PARTS, node.input[1:]):
            t = inits[name]
            arr = numpy_helper.to_array(t)
            shapes[part] = arr.shape
            f.write(b"\0" * ((-f.tell()) % ALIGN))
            offset = f.tell()
            f.write(arr.tobytes())
            record[part] = {"offset": offset, "bytes": arr.nbytes}
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", NBITS_FILE), ("offset", str(offset)), ("length", str(arr.nbytes))):
                t.external_data.add(key=key, value=value)
    if "zero_points" not in record:
        record["zero_points"] = None
    attrs = {a.name: a.i for a in node.attribute}
    record.update(rows=attrs["N"], cols=attrs["K"], head=graph.name)
    data = graph.with_name(graph.name + ".data")
    if data.exists():
        data.unlink()  # written anew: onnx appends to an existing file
    onnx.save_model(model, str(graph), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name)
    QuantizedTable(graph.parent / NBITS_FILE, record)  # the record fits the file it describes
    return record
