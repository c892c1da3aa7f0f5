"""Full-depth graphs without the real weights: trace a one-layer template, replicate its layer by graph surgery.

The template is the real model's structure at its real widths (so every shape constant the tracer freezes, heads,
head_dim, the merger's width, is right) with one decoder layer, one vision block of each attention kind (window,
full) and a 64-token LM head: at 7B that is ~1.3 GB of placeholder fp32 weights instead of 33 GB. It is traced once
with the same exporter and checked in ONNX Runtime against PyTorch like any graph (`onnx_export`).

Its initializers are then identified by value: every template parameter holds distinct random numbers, so an
initializer equal to a parameter (as is, transposed: the tracer folds Linear weights into `W^T` for MatMul, or
reshaped: the patch embedding) names the checkpoint tensor it must hold and the transform. A parameter no
initializer matches is an error (a folded constant we could not trace back would otherwise keep placeholder values).

Replication renames the template layer's nodes and values per layer (`/layers.0/` -> `/layers.i/`), chains the
residual stream (layer i reads layer i-1's output), gives layer i its own `past_*_i` / `present_*_i`, and points
every weight initializer at the tensor of layer i. The result is equal to a directly traced graph of the full model:
tests/export/test_stream_export.py runs both in ONNX Runtime on the same weights.
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from retrv.export.graphs import FLOAT_NAMES, DecoderGraph, GraphSpec, SubModel, VisionGraph, decoder_spec, vision_spec
from retrv.export.onnx_export import ExportError, export_onnx, validate_onnx
from retrv.model.config import ModelConfig
from retrv.model.decoder import TextModel
from retrv.model.vision import VisionTower

log = logging.getLogger(__name__)

TEMPLATE_VOCAB = 64  # the LM head's rows only size one MatMul; 64 keeps the template small at any vocabulary
# Widths that appear in weight shapes only, never in a traced constant (the MLPs' hidden width, the merger's
# hidden width): the template uses 16 and the replicated initializers take the real shapes. Heads, head_dim and
# the hidden size stay real: reshapes freeze them. At 7B this makes the template ~50M parameters instead of 330M.
TEMPLATE_WIDTH = 16
TRANSFORMS = ("identity", "transpose", "reshape")  # how a graph initializer is derived from its checkpoint tensor


@dataclass(frozen=True)
class WeightRef:
    """One weight initializer of a full-depth graph: which module parameter (the model's own name) fills it, how,
    and at which shape and dtype it is stored."""

    graph: str  # file name, e.g. decoder.onnx
    init: str  # initializer name in that graph
    param: str  # module parameter name, e.g. language_model.layers.3.mlp.down_proj.weight
    transform: str  # one of TRANSFORMS
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"graph": self.graph, "init": self.init, "param": self.param, "transform": self.transform,
                "shape": list(self.shape)}


class _Template(nn.Module):
    """What `VisionGraph`/`DecoderGraph` read from a model: `visual`, `language_model`, `lm_head`."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        v = cfg.vision
        full = set(v.fullatt_block_indexes)
        self.kinds = [k for k in ("window", "full") if any((i in full) == (k == "full") for i in range(v.depth))]
        vt = replace(v, depth=len(self.kinds), intermediate_size=TEMPLATE_WIDTH, fullatt_block_indexes=tuple(
            j for j, k in enumerate(self.kinds) if k == "full"))
        tt = replace(cfg.text, num_hidden_layers=1, vocab_size=TEMPLATE_VOCAB, intermediate_size=TEMPLATE_WIDTH)
        self.cfg = SimpleNamespace(vision=vt, text=tt, icm=None)
        self.visual = VisionTower(vt)
        merged = self.visual.merger.merged
        self.visual.merger.mlp = nn.Sequential(nn.Linear(merged, TEMPLATE_WIDTH), nn.GELU(),
                                               nn.Linear(TEMPLATE_WIDTH, vt.out_hidden_size))
        with torch.device("meta"):  # the embedding table is not part of any graph: never allocated
            self.language_model = TextModel(tt)
        self.language_model.embed_tokens = nn.Embedding(1, tt.hidden_size)
        self.language_model.to_empty(device="cpu")
        self.lm_head = nn.Linear(tt.hidden_size, TEMPLATE_VOCAB, bias=False)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # distinct values per parameter: initializers are identified by value
            for _, p in sorted(self.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.ndim == 1 else 0.0))
        self.to(dtype).eval()


def _match(arr: np.ndarray, params: dict[str, np.ndarray]) -> tuple[str, str] | None:
    for name, p in params.items():
        if p.size != arr.size:
            continue
        if p.shape == arr.shape and np.array_equal(p, arr):
            return name, "identity"
        if arr.ndim == 2 and np.array_equal(p.reshape(arr.shape[1], arr.shape[0]).T, arr):
            return name, "transpose"
        if np.array_equal(p.reshape(arr.shape), arr):
            return name, "reshape"
    return None


def _identify(model, prefixes: tuple[str, ...], graph_file: str, template: nn.Module) -> dict[str, tuple[str, str]]:
    """Initializer name -> (template parameter, transform) for every weight initializer of a traced graph."""
    from onnx import numpy_helper

    params = {n: p.detach().float().numpy() for n, p in template.named_parameters()
              if n.startswith(prefixes) and not n.endswith("embed_tokens.weight")}  # the table is not in a graph
    found = {}
    for init in model.graph.initializer:
        hit = _match(numpy_helper.to_array(init).astype(np.float32), params)
        if hit is not None:
            found[init.name] = hit
    missing = sorted(set(params) - {p for p, _ in found.values()})
    if missing:
        raise ExportError(f"{graph_file}: template parameter '{missing[0]}' matches no initializer of the traced "
                          f"graph ({len(missing)} unmatched); expected each weight as is, transposed or reshaped")
    return found


# ------------------------------------------------------------------------------------------------ graph surgery
def _members(nodes, prefix: str) -> list:
    return [n for n in nodes if n.name.startswith(prefix)]


def _residual_input(block_nodes, norm_prefix: str, produced: set[str], weights: set[str],
                    constants: set[str]) -> str:
    """The residual stream entering a block: the one value its first RMSNorm reads from outside the block."""
    outside = {i for n in block_nodes if n.name.startswith(norm_prefix) for i in n.input
               if i and i not in produced and i not in weights}
    outside -= constants
    if len(outside) != 1:
        raise ExportError(f"template block {norm_prefix!r}: expected one residual input, found {sorted(outside)}")
    return outside.pop()


def _block_output(block_nodes, others, graph_outputs: set[str]) -> str:
    produced = {o for n in block_nodes for o in n.output}
    used = {i for n in others for i in n.input if i in produced} - graph_outputs
    if len(used) != 1:
        raise ExportError(f"template block: expected one output read by the rest of the graph, found {sorted(used)}")
    return used.pop()


def _copy_block(nodes, src: str, dst: str, rename_extra: dict[str, str], weight_names: dict[str, str]):
    """Copies of `nodes` for another block: `src` -> `dst` in node and value names; `rename_extra` rewires
    inputs/outputs by exact name (residual in, past/present); `weight_names` maps template initializers."""
    import onnx

    produced = {o for n in nodes for o in n.output}

    def value(v: str) -> str:
        if v in rename_extra:
            return rename_extra[v]
        if v in weight_names:
            return weight_names[v]
        if v in produced:
            return v.replace(src, dst) if src in v else f"{v}{dst}"
        return v  # shared: cos/sin/bias, constants outside the block

    out = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = n.name.replace(src, dst)
        c.input[:] = [value(i) if i else i for i in n.input]
        c.output[:] = [value(o) for o in n.output]
        out.append(c)
    return out


def _toposort(nodes, graph_inputs: set[str], init_names: set[str]):
    producers = {o: k for k, n in enumerate(nodes) for o in n.output}
    deps = [{producers[i] for i in n.input if i in producers} for n in nodes]
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for p in d:
            users.setdefault(p, []).append(k)
    indeg = [len(d) for d in deps]
    ready = deque(k for k, d in enumerate(indeg) if d == 0)
    order = []
    while ready:
        k = ready.popleft()
        order.append(k)
        for u in users.get(k, []):
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise ExportError("replicated graph has a cycle; expected a DAG (template surgery failed)")
    known = graph_inputs | init_names | set(producers)
    dangling = [i for n in nodes for i in n.input if i and i not in known]
    if dangling:
        raise ExportError(f"replicated graph reads undefined value {dangling[0]!r}")
    out = []
    for k in order:  # detached copies: the originals live in the repeated field about to be cleared
        c = type(nodes[k])()
        c.CopyFrom(nodes[k])
        out.append(c)
    return out


def _set_io(graph, spec: GraphSpec, elem: dict[str, int]) -> None:
    from onnx import helper

    def info(name, ts):
        return helper.make_tensor_value_info(name, elem[ts.dtype], [d for d in ts.shape])

    del graph.input[:]
    graph.input.extend(info(k, v) for k, v in spec.inputs.items())
    del graph.output[:]
    graph.output.extend(info(k, v) for k, v in spec.outputs.items())
    del graph.value_info[:]


def _weights_named(found, prefix_of_block: str | None, to_block: str | None) -> dict[str, str]:
    out = {}
    for init, (param, transform) in found.items():
        if prefix_of_block is not None and not param.startswith(prefix_of_block):
            continue
        name = param if to_block is None else param.replace(prefix_of_block, to_block, 1)
        out[init] = name if transform == "identity" else f"{name}.{'T' if transform == 'transpose' else 'flat'}"
    return out


def _real_shape(template_shape: tuple, param_shape: tuple, transform: str) -> tuple[int, ...]:
    """An initializer's shape in the full graph, from its parameter's real shape and how it was folded."""
    if transform == "identity":
        return tuple(param_shape)
    if transform == "transpose":
        return (int(np.prod(param_shape[1:])), param_shape[0])
    if int(np.prod(template_shape)) != int(np.prod(param_shape)):
        raise ExportError(f"template initializer of shape {template_shape} reshapes a parameter of shape "
                          f"{param_shape}; expected only unshrunk widths to be reshaped")
    return tuple(template_shape)


def _finish(model, graph_file: str, nodes, found, renamed: dict[str, tuple[str, str, str]], spec,
            real: dict[str, tuple]) -> list[WeightRef]:
    """Replace nodes and initializers; weight initializers become data-less placeholders (filled by the writer)
    at the real model's shapes (`real`: parameter name -> shape)."""
    import onnx
    from onnx import TensorProto

    g = model.graph
    shapes = {i.name: tuple(i.dims) for i in g.initializer}
    dtypes = {i.name: i.data_type for i in g.initializer}
    keep = [i for i in g.initializer if i.name not in found]
    refs, inits = [], []
    for new, (tmpl, param, transform) in renamed.items():
        shape = _real_shape(shapes[tmpl], real[param], transform)
        t = TensorProto(name=new, data_type=dtypes[tmpl], dims=shape)
        inits.append(t)
        refs.append(WeightRef(graph_file, new, param, transform, shape))
    del g.initializer[:]
    g.initializer.extend(keep + inits)
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}
    _set_io(g, spec, elem)
    ordered = _toposort(nodes, set(spec.inputs), {i.name for i in g.initializer})
    del g.node[:]
    g.node.extend(ordered)
    return refs


def replicate_decoder(model, found, cfg: ModelConfig, spec: GraphSpec, real: dict) -> list[WeightRef]:
    """The one-layer template decoder (traced) -> the full-depth decoder, in place; returns its weight slots."""
    g = model.graph
    layer = _members(g.node, "/language_model/layers.0/")
    others = [n for n in g.node if not n.name.startswith("/language_model/layers.")]
    produced = {o for n in layer for o in n.output}
    weights = set(found)
    consts = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    x_in = _residual_input(layer, "/language_model/layers.0/input_layernorm/", produced, weights, consts)
    x_out = _block_output(layer, others, {"present_key_0", "present_value_0"})
    layer_w = {k: v for k, v in found.items() if v[0].startswith("language_model.layers.0.")}
    nodes, renamed, prev = list(others), {}, x_in
    n_layers = cfg.text.num_hidden_layers
    for i in range(n_layers):
        src, dst = "/layers.0/", f"/layers.{i}/"
        names = _weights_named(layer_w, "language_model.layers.0.", f"language_model.layers.{i}.")
        extra = {x_in: prev, "past_key_0": f"past_key_{i}", "past_value_0": f"past_value_{i}",
                 "present_key_0": f"present_key_{i}", "present_value_0": f"present_value_{i}"}
        copy = _copy_block(layer, src, dst, extra, names)
        nodes += copy
        prev = x_out.replace(src, dst) if src in x_out else f"{x_out}{dst}"
        for tmpl, new in names.items():
            renamed[new] = (tmpl, found[tmpl][0].replace("language_model.layers.0.", f"language_model.layers.{i}.", 1),
                            found[tmpl][1])
    for n in others:  # the final norm reads the last layer's output
        n.input[:] = [prev if v == x_out else v for v in n.input]
    rest = _weights_named({k: v for k, v in found.items() if k not in layer_w}, None, None)
    for tmpl, new in rest.items():
        renamed[new] = (tmpl, found[tmpl][0], found[tmpl][1])
    for n in others:
        n.input[:] = [rest.get(v, v) for v in n.input]
    _lm_head_as_gemm(nodes, renamed)
    return _finish(model, spec.filename, nodes, found, renamed, spec, real)


def _lm_head_as_gemm(nodes, renamed) -> None:
    """The tracer folds the LM head into MatMul(h, W^T). Written as Gemm(h, W, transB=1) it reads the table in
    the checkpoint's (vocab, hidden) layout: streamed in row chunks, never transposed in memory, and for a tied
    embedding the very bytes of embed_tokens.npy (stored once)."""
    from onnx import helper

    head = [k for k, (_, p, _) in renamed.items() if p == "lm_head.weight"]
    if len(head) != 1:
        raise ExportError(f"decoder template: expected one LM head initializer, found {head}")
    old = head[0]
    tmpl, param, transform = renamed.pop(old)
    if transform != "transpose":
        raise ExportError(f"decoder template: LM head folded as {transform}; expected a transposed MatMul weight")
    renamed["lm_head.weight"] = (tmpl, param, "identity")  # (vocab, hidden): the real shape, set by _finish
    for k, n in enumerate(nodes):
        if n.op_type == "MatMul" and n.input[1] == old:
            nodes[k] = helper.make_node("Gemm", [n.input[0], "lm_head.weight"], list(n.output), name=n.name, transB=1)
            return
    raise ExportError("decoder template: no MatMul reads the LM head; expected logits = MatMul(hidden, W^T)")


def replicate_vision(model, found, cfg: ModelConfig, kinds: list[str], spec: GraphSpec, real: dict) -> list[WeightRef]:
    g = model.graph
    blocks = [_members(g.node, f"/visual/blocks.{j}/") for j in range(len(kinds))]
    others = [n for n in g.node if not n.name.startswith("/visual/blocks.")]
    all_block = [n for b in blocks for n in b]
    weights = set(found)
    consts = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    last_out = _block_output(all_block, others, set())
    outs = []
    for j, b in enumerate(blocks):
        rest = [n for n in g.node if n not in b]
        outs.append(_block_output(b, rest, set()))
    ins = [_residual_input(b, f"/visual/blocks.{j}/norm1/", {o for n in b for o in n.output}, weights, consts)
           for j, b in enumerate(blocks)]
    first_in = ins[0]
    full = set(cfg.vision.fullatt_block_indexes)
    nodes, renamed, prev = list(others), {}, first_in
    for i in range(cfg.vision.depth):
        j = kinds.index("full" if i in full else "window")
        src, dst = f"/blocks.{j}/", f"/blocks.{i}/"
        names = _weights_named({k: v for k, v in found.items() if v[0].startswith(f"visual.blocks.{j}.")},
                               f"visual.blocks.{j}.", f"visual.blocks.{i}.")
        nodes += _copy_block(blocks[j], src, dst, {ins[j]: prev}, names)
        prev = outs[j].replace(src, dst) if src in outs[j] else f"{outs[j]}{dst}"
        for tmpl, new in names.items():
            renamed[new] = (tmpl, found[tmpl][0].replace(f"visual.blocks.{j}.", f"visual.blocks.{i}.", 1),
                            found[tmpl][1])
    for n in others:
        n.input[:] = [prev if v == last_out else v for v in n.input]
    rest = _weights_named({k: v for k, v in found.items() if not v[0].startswith("visual.blocks.")}, None, None)
    for tmpl, new in rest.items():
        renamed[new] = (tmpl, found[tmpl][0], found[tmpl][1])
    for n in others:
        n.input[:] = [rest.get(v, v) for v in n.input]
    return _finish(model, spec.filename, nodes, found, renamed, spec, real)


@dataclass
class StreamGraphs:
    """Full-depth graphs (protos whose weight initializers have no data yet) and their weight slots."""

    models: dict[str, object]  # file name -> onnx.ModelProto
    specs: dict[str, GraphSpec]
    weights: list[WeightRef]
    validation: dict[str, dict]


def build_graphs(cfg: ModelConfig, precision: str, validate: bool = True) -> StreamGraphs:
    """Trace the template once (placeholder weights, real widths), check it in ONNX Runtime, replicate to depth."""
    import onnx

    dtype = torch.float16 if precision == "fp16" else torch.float32
    with torch.device("meta"):  # the real shapes, without their memory
        from retrv.model.qwen import Qwen2_5_VL

        real = {n: tuple(p.shape) for n, p in Qwen2_5_VL(cfg).named_parameters()}
    template = _Template(cfg, dtype)
    fdt = FLOAT_NAMES[dtype]
    subs = [SubModel(vision_spec(template.cfg, fdt), VisionGraph(template)),
            SubModel(decoder_spec(template.cfg, fdt), DecoderGraph(template))]
    oracle = _Template(cfg, torch.float32) if dtype != torch.float32 else template
    oracles = {"vision": VisionGraph(oracle), "decoder": DecoderGraph(oracle)}
    models, specs, weights, validation = {}, {}, [], {}
    with tempfile.TemporaryDirectory(prefix="retrv-template-") as tmp:
        for sub in subs:
            path = Path(tmp) / sub.spec.filename
            export_onnx(sub, template.cfg, path)
            if validate:
                validation[sub.spec.role] = {"template": validate_onnx(
                    sub, template.cfg, path, precision, oracle=SubModel(sub.spec, oracles[sub.spec.role]))}
            model = onnx.load(str(path), load_external_data=True)
            role = sub.spec.role
            real_spec = (vision_spec if role == "vision" else decoder_spec)(cfg, fdt)
            prefixes = ("visual.",) if role == "vision" else ("language_model.", "lm_head.")
            found = _identify(model, prefixes, sub.spec.filename, template)
            if role == "vision":
                refs = replicate_vision(model, found, cfg, template.kinds, real_spec, real)
            else:
                refs = replicate_decoder(model, found, cfg, real_spec, real)
            models[real_spec.filename], specs[real_spec.filename] = model, real_spec
            weights += refs
    del template, oracle
    return StreamGraphs(models, specs, weights, validation)
