"""`--verify` for a streamed pack, in the export's memory: no whole model is ever loaded.

1. Every weight of the pack against the checkpoint's bytes (`check_weights`): float weights bit for bit after the
   same cast, INT4 weights dequantized within one quantization step of their block, the embedding table too.
2. Every decoder layer in ONNX Runtime (the pack's own nodes and bytes, cut out of decoder.onnx) against the
   PyTorch layer loaded alone with that layer's weights (`check_layers`).
3. Greedy generation on a truncated copy of the checkpoint (its first layer, the first vision block of each
   attention kind), streamed through the same path, through ONNX Runtime and then PyTorch, one at a time
   (`check_truncated`).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from retrv.export.onnx_export import ExportValidationError
from retrv.export.safetensors_stream import TensorInfo, read_rows
from retrv.export.stream_export import EMBED_FILE, EMBED_PARAM, LM_HEAD, checkpoint_tensors, dequantize_int4
from retrv.runtime.pack import Pack

log = logging.getLogger(__name__)

INT4_STEPS = 2  # how far a stored INT4 weight may sit from the checkpoint's, in its block's steps
LAYER_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int4": 5e-2}  # x the output's scale, as in onnx_export
TRUNCATED_LAYERS = 1  # the greedy check's copy: its fp32 LM head already costs 2.2 GB at 7B; layers are (2)'s job
VERIFY_SESSION_CONFIG = {"session.disable_prepacking": "1"}
ONNX_NP = {1: np.float32, 10: np.float16, 2: np.uint8}


def _initializers(path: Path) -> dict:
    import onnx

    return {i.name: i for i in onnx.load(str(path), load_external_data=False).graph.initializer}


def _stored(pack_dir: Path, tensor) -> np.ndarray:
    """An initializer's bytes from its external data file, into a fresh buffer."""
    info = {e.key: e.value for e in tensor.external_data}
    dtype = ONNX_NP[tensor.data_type]
    count = int(info["length"]) // np.dtype(dtype).itemsize
    arr = np.fromfile(pack_dir / info["location"], dtype=dtype, count=count, offset=int(info["offset"]))
    return arr.reshape(tuple(tensor.dims))


def int4_weight(pack_dir: Path, inits: dict, init: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A MatMulNBits weight of the pack, dequantized to (N, K) float32; and its (N, blocks) scales."""
    packed = _stored(pack_dir, inits[f"{init}_Q4"])
    scales = _stored(pack_dir, inits[f"{init}_scales"]).astype(np.float32).reshape(packed.shape[0], -1)
    zp_name = f"{init}_zero_points"
    zp = _stored(pack_dir, inits[zp_name]).reshape(packed.shape[0], -1) if zp_name in inits else None
    off_name = f"{init}_offsets"
    offsets = _stored(pack_dir, inits[off_name]) if off_name in inits else None
    return dequantize_int4(packed, scales, zp, k, offsets), scales


def _expected(info: TensorInfo, ref: dict) -> np.ndarray:
    w = read_rows(info)
    shape = tuple(ref["shape"])
    if ref["transform"] == "transpose":
        return np.ascontiguousarray(w.reshape(shape[1], shape[0]).T)
    return w.reshape(shape) if ref["transform"] == "reshape" else w


def _index(flat: int, shape) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _first_bad(got: np.ndarray, want: np.ndarray, tol) -> int | None:
    bad = np.flatnonzero(~(np.abs(got.astype(np.float32) - want) <= tol))
    return int(bad[0]) if bad.size else None


def _check_rows(pack_dir: Path, tensor, info: TensorInfo, where: str) -> None:
    """A float weight stored in the checkpoint's own layout, compared bit for bit in row chunks."""
    loc = {e.key: e.value for e in tensor.external_data}
    dtype = np.dtype(ONNX_NP[tensor.data_type])
    rows = info.shape[0] if info.shape else 1
    per_row = int(np.prod(info.shape[1:], dtype=np.int64)) if len(info.shape) > 1 else 1
    if int(loc["length"]) != rows * per_row * dtype.itemsize:
        raise ExportValidationError(f"{where}: stored {loc['length']} bytes; expected {rows * per_row * dtype.itemsize}")
    step = max(1, (32 << 20) // (per_row * 4))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        got = np.fromfile(pack_dir / loc["location"], dtype=dtype, count=n * per_row,
                          offset=int(loc["offset"]) + r * per_row * dtype.itemsize)
        want = read_rows(info, r, n).reshape(-1).astype(dtype)
        if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            bad = _first_bad(got, want.astype(np.float32), 0.0) or 0
            raise ExportValidationError(f"{where} differs at flat element {r * per_row + bad}: pack {got[bad]!r}, "
                                        f"checkpoint {want[bad]!r}")


def check_weights(pack_dir: str | Path, ckpt: str | Path) -> dict:
    """Every weight of a streamed pack against the checkpoint; raise `ExportValidationError` naming the first
    weight that differs (graph, initializer, checkpoint tensor, element, values)."""
    pack_dir, ckpt = Path(pack_dir), Path(ckpt)
    pack = Pack.open(pack_dir, verify="size")  # just written; (1) reads the bytes anyway
    weights = pack.manifest.extra.get("streaming", {}).get("weights")
    if not weights:
        raise ExportValidationError(f"{pack_dir}: no streaming weight map in the manifest; expected a pack from "
                                    f"the streaming export")
    tensors = checkpoint_tensors(ckpt)
    by_source = {t.name: t for t in tensors.values()}
    graphs: dict[str, dict] = {}
    checked = 0
    quant = (pack.manifest.files.get("decoder.onnx").quantization or {})
    for ref in weights:
        inits = graphs.setdefault(ref["graph"], _initializers(pack_dir / ref["graph"]))
        info = by_source[ref["source"]]
        where = f"{ref['graph']}: weight '{ref['init']}' (checkpoint tensor '{info.name}' in {info.file.name})"
        if ref["quant"] is None and ref["transform"] != "transpose":  # tables: compared in row chunks
            _check_rows(pack_dir, inits[ref["init"]], info, where)
            checked += 1
            continue
        want = _expected(info, ref)
        if ref["quant"] == "int4":
            w = want.T if ref["transform"] == "transpose" else want  # (N, K)
            got, scales = int4_weight(pack_dir, inits, ref["init"], w.shape[1])
            step = np.repeat(np.abs(scales), quant.get("block_size", 32), axis=1)[:, :w.shape[1]]
            # rtn: within one step of its block; the mse fit may clip a block's extremes a little further
            # (measured at most 1.34 steps on Gaussian, Student-t and uniform 1536x576 matrices): two steps
            bad = _first_bad(got, w, INT4_STEPS * step * 1.001 + 1e-6)
            if bad is not None:
                raise ExportValidationError(f"{where} differs at element {_index(bad, w.shape)}: pack "
                                            f"{got.flat[bad]:.6g}, checkpoint {w.flat[bad]:.6g} (beyond "
                                            f"{INT4_STEPS} INT4 steps of {step.flat[bad]:.3g})")
        else:
            got = _stored(pack_dir, inits[ref["init"]])
            cast = want.astype(got.dtype)
            if got.shape != cast.shape or not np.array_equal(got.view(np.uint8), cast.view(np.uint8)):
                bad = _first_bad(got, cast.astype(np.float32), 0.0) if got.shape == cast.shape else 0
                raise ExportValidationError(f"{where} differs at element {_index(bad or 0, cast.shape)}: "
                                            f"pack {got.flat[bad or 0]!r}, checkpoint {cast.flat[bad or 0]!r}")
        checked += 1
        del want, got
    table = np.load(pack_dir / EMBED_FILE, mmap_mode="r", allow_pickle=False)
    info = tensors[EMBED_PARAM]
    step = max(1, (64 << 20) // (table.shape[1] * 4))
    for r in range(0, table.shape[0], step):
        got = np.array(table[r:r + step])
        want = read_rows(info, r, got.shape[0]).astype(got.dtype)
        if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            bad = _first_bad(got, want.astype(np.float32), 0.0) or 0
            raise ExportValidationError(f"{EMBED_FILE}: row {r + bad // table.shape[1]} differs from checkpoint "
                                        f"tensor '{info.name}'")
    del table
    return {"weights_checked": checked + 1, "embedding_rows": int(info.shape[0])}


# ----------------------------------------------------------------------------------------------- layer by layer
def layer_graph(decoder, index: int, pack_dir: Path):
    """decoder.onnx cut down to layer `index`: inputs_embeds feeds the layer's residual stream; its outputs are
    the layer's hidden state (`hidden`) and present_key/value_<index>. Weights are loaded into the proto (this
    layer's only), so the session holds one layer."""
    import onnx
    from onnx import helper, numpy_helper

    from retrv.export.stream_graphs import _block_output, _residual_input  # noqa: PLC2701 (the same surgery)

    g = decoder.graph
    prefix = f"/language_model/layers.{index}/"
    layer = [n for n in g.node if n.name.startswith(prefix)]
    produced = {o for n in layer for o in n.output}
    inits = {i.name for i in g.initializer}
    consts = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    x_in = _residual_input(layer, prefix + "input_layernorm/", produced, inits, consts)
    presents = {f"present_key_{index}", f"present_value_{index}"}
    x_out = _block_output(layer, [n for n in g.node if not n.name.startswith(prefix)], presents)
    wanted = [x_out, *sorted(presents)]
    producer = {o: n for n in g.node for o in n.output}
    keep, stack, seen = [], list(wanted), set()
    while stack:  # backward from the outputs, cut at the residual input
        v = stack.pop()
        if v in seen or v == x_in or v not in producer:
            continue
        seen.add(v)
        n = producer[v]
        if id(n) not in {id(k) for k in keep}:
            keep.append(n)
            stack.extend(i for i in n.input if i)
    order = {id(n): k for k, n in enumerate(g.node)}
    keep.sort(key=lambda n: order[id(n)])
    nodes = []
    for n in keep:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.input[:] = ["inputs_embeds" if i == x_in else i for i in n.input]
        c.output[:] = ["hidden" if o == x_out else o for o in n.output]
        nodes.append(c)
    used = {i for n in nodes for i in n.input}
    tensors = []
    for t in g.initializer:
        if t.name in used:
            arr = _stored(pack_dir, t) if t.data_location == onnx.TensorProto.EXTERNAL else numpy_helper.to_array(t)
            tensors.append(numpy_helper.from_array(np.asarray(arr), t.name))
    io = {i.name: i for i in [*g.input, *g.output]}
    x_info = io["inputs_embeds"]
    ins = [io[n] for n in ("inputs_embeds", "position_ids", "attention_mask", f"past_key_{index}",
                           f"past_value_{index}") if n in used]
    hidden = helper.make_tensor_value_info("hidden", x_info.type.tensor_type.elem_type, None)
    outs = [hidden, io[f"present_key_{index}"], io[f"present_value_{index}"]]
    graph = helper.make_graph(nodes, f"layer{index}", ins, outs, tensors)
    return helper.make_model(graph, opset_imports=list(decoder.opset_import), ir_version=decoder.ir_version)


def _torch_layer(cfg, tensors: dict[str, TensorInfo], index: int, quantized: dict[str, tuple]):
    """The PyTorch layer with the checkpoint's weights; a weight the pack quantized takes the pack's dequantized
    values instead (the numerics check then tests the graph; `check_weights` bounds the quantization error)."""
    import torch

    from retrv.model.decoder import DecoderLayer

    prefix = f"language_model.layers.{index}."
    layer = DecoderLayer(cfg.text)
    state = {}
    for k in layer.state_dict():
        if prefix + k in quantized:
            state[k] = torch.from_numpy(int4_weight(*quantized[prefix + k])[0].copy())
        else:
            state[k] = torch.from_numpy(read_rows(tensors[prefix + k]))
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def check_layers(pack_dir: str | Path, ckpt: str | Path, layers: list[int] | None = None) -> dict:
    """Each decoder layer of the pack (ONNX Runtime) against the PyTorch layer loaded alone from the checkpoint,
    on two input shapes (left padding, empty and non-empty past); raise `ExportValidationError` naming the layer,
    output and difference."""
    import onnx
    import onnxruntime as ort
    import torch

    from retrv.export.graphs import decoder_spec, sample_inputs
    from retrv.model.decoder import causal_bias, mrope_cos_sin

    pack_dir, ckpt = Path(pack_dir), Path(ckpt)
    pack = Pack.open(pack_dir, verify="size")  # just written; (1) reads the bytes anyway
    cfg = pack.model_config
    entry = pack.manifest.files["decoder.onnx"]
    precision = entry.precision
    fdt = np.float16 if entry.inputs["inputs_embeds"]["dtype"] == "float16" else np.float32
    decoder = onnx.load(str(pack_dir / "decoder.onnx"), load_external_data=False)
    tensors = checkpoint_tensors(ckpt)
    weights = pack.manifest.extra.get("streaming", {}).get("weights", [])
    tol = LAYER_TOLERANCE.get(precision, LAYER_TOLERANCE["int4"])
    worst = 0.0
    indices = range(cfg.text.num_hidden_layers) if layers is None else layers
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for i in indices:
        sess = ort.InferenceSession(layer_graph(decoder, i, pack_dir).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        inits = {t.name: t for t in decoder.graph.initializer}
        quantized = {r["param"]: (pack_dir, inits, r["init"], tensors[r["param"]].shape[1]) for r in weights
                     if r["quant"] == "int4" and r["param"].startswith(f"language_model.layers.{i}.")}
        layer = _torch_layer(cfg, tensors, i, quantized)
        names = {x.name for x in sess.get_inputs()}
        for variant in (1, 2):
            feeds = sample_inputs(decoder_spec(cfg), cfg, variant)
            x = torch.from_numpy(feeds["inputs_embeds"])
            pos, mask = torch.from_numpy(feeds["position_ids"]), torch.from_numpy(feeds["attention_mask"])
            pk, pv = (torch.from_numpy(feeds[f"past_{t}_{i}"]) for t in ("key", "value"))
            cos, sin = mrope_cos_sin(pos, cfg.text)
            with torch.no_grad():
                want = [t.numpy() for t in layer(x, cos, sin, causal_bias(mask, x.shape[1]), pk, pv)]
            ort_feeds = {"inputs_embeds": feeds["inputs_embeds"].astype(fdt), "position_ids": feeds["position_ids"],
                         "attention_mask": feeds["attention_mask"], f"past_key_{i}": feeds[f"past_key_{i}"].astype(fdt),
                         f"past_value_{i}": feeds[f"past_value_{i}"].astype(fdt)}
            got = sess.run(None, {k: v for k, v in ort_feeds.items() if k in names})
            for name, g_, w_ in zip(("hidden", f"present_key_{i}", f"present_value_{i}"), got, want):
                diff = float(np.abs(g_.astype(np.float32) - w_).max()) if w_.size else 0.0
                limit = tol * max(1.0, float(np.abs(w_).max()) if w_.size else 1.0)
                if not diff <= limit:
                    raise ExportValidationError(f"decoder.onnx layer {i} output '{name}': max abs diff {diff:.3g} "
                                                f"against the PyTorch layer exceeds {limit:.3g} ({precision})")
                worst = max(worst, diff)
        del sess, layer
        gc.collect()
    return {"layers_checked": len(indices), "max_abs_diff": worst, "tolerance": tol}


# ------------------------------------------------------------------------------------------- truncated greedy
def write_safetensors(infos: list[tuple[str, TensorInfo]], path: Path) -> None:
    """A safetensors file of the given tensors (new name, source), bytes copied in chunks: no tensor in memory."""
    header, offset = {}, 0
    for name, info in infos:
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as out:
        out.write(len(blob).to_bytes(8, "little") + blob)
        for _, info in infos:
            with open(info.file, "rb") as f:
                f.seek(info.start)
                left = info.nbytes
                while left:
                    chunk = f.read(min(left, 64 << 20))
                    out.write(chunk)
                    left -= len(chunk)


def truncated_copy(ckpt: Path, out: Path, layers: int = TRUNCATED_LAYERS) -> Path:
    """The checkpoint's first `layers` decoder layers and two of its vision blocks, the first of each attention
    kind (window, full), renumbered 0 and 1 in their order; everything else whole (embedding, head, norms,
    merger, tokenizer)."""
    from retrv.model.config import read_config

    cfg = read_config(ckpt)
    full = sorted(cfg.vision.fullatt_block_indexes)
    window = [i for i in range(cfg.vision.depth) if i not in full]
    chosen = sorted(kind[0] for kind in (full, window) if kind)  # the first block of each attention kind
    renumber = {old: new for new, old in enumerate(chosen)}
    layers = min(layers, cfg.text.num_hidden_layers)
    out.mkdir(parents=True)
    keep = []
    for info in sorted({t.name: t for t in checkpoint_tensors(ckpt).values()}.values(),
                       key=lambda t: (str(t.file), t.start)):
        parts = info.name.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) >= layers:
            continue
        name = info.name
        if "blocks" in parts:
            at = parts.index("blocks") + 1
            if int(parts[at]) not in renumber:
                continue
            parts[at] = str(renumber[int(parts[at])])
            name = ".".join(parts)
        keep.append((name, info))
    write_safetensors(keep, out / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    text = config.get("text_config", config) if "num_hidden_layers" not in config else config
    text["num_hidden_layers"] = layers
    config["vision_config"]["depth"] = len(chosen)
    config["vision_config"]["fullatt_block_indexes"] = [renumber[i] for i in full if i in renumber]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json",
                 "retrv_config.json", "icm.safetensors", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "chat_template.json", "added_tokens.json"):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
    return out


def check_truncated(ckpt: Path, precision: str, quant) -> dict:
    """Stream a truncated copy into a pack, then greedy tokens through ONNX Runtime and, after that session is
    gone, through the PyTorch model of the same copy: the prompts and images of `verify_pack`; identical tokens."""
    import torch

    from retrv.export.stream_pack import export_streaming
    from retrv.export.torch_backend import TorchBackend
    from retrv.export.verify import MAX_NEW_TOKENS, verification_images
    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.generate import Generator

    cases = {"text": ("Describe a red bicycle leaning on a wall.", []),
             "two_images": ("Which picture shows more circles?", verification_images())}
    with tempfile.TemporaryDirectory(prefix="retrv-truncated-") as work:
        small = truncated_copy(ckpt, Path(work) / "ckpt")
        # fp32 even for an fp16 pack: ONNX Runtime's CPU provider keeps an fp16 graph's weights twice (fp16 and
        # their fp32 casts); the fp16 numerics are (2)'s check, layer by layer
        precision = "fp32" if quant is None else precision
        if quant is not None:  # MatMulNBits computing in fp32 (level 0): the same dequantized weights as the
            # PyTorch side, so tokens must be equal; level 4 quantizes activations per block, and on random
            # weights that flips near-ties. What the pack's own level does to quality is the gate's question.
            from dataclasses import replace as _replace

            quant = _replace(quant, accuracy_level=0)
        pack = Pack.open(export_streaming(small, Path(work) / "pack", precision, quant, verify=False))
        # one copy of each weight: no prepacked duplicates, no arena holding the largest transients
        backend = OrtBackend(pack, provider="cpu", cache_dir=None, session_config=VERIFY_SESSION_CONFIG,
                             cpu_arena=False)
        gen = Generator.from_pack(pack, backend)
        ort_tokens = {k: gen.generate(p, im, MAX_NEW_TOKENS).token_ids for k, (p, im) in cases.items()}
        backend.close()
        del gen, backend
        gc.collect()
        model = load_unmapped(small)
        if quant is not None:  # compare with the weights the pack holds: dequantized INT4 projections
            _load_dequantized(model, pack)
        gen = Generator.from_pack(pack, TorchBackend(model))
        report = {}
        for name, (prompt, images) in cases.items():
            want = gen.generate(prompt, images, MAX_NEW_TOKENS).token_ids
            got = ort_tokens[name]
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                raise ExportValidationError(f"truncated copy ({small.name}, {pack.model_config.text.num_hidden_layers} "
                                            f"layers): greedy tokens for the {name} prompt differ from PyTorch's at "
                                            f"position {at}")
            report[name] = {"tokens": len(got), "matches_torch": True}
        del gen, model
        gc.collect()
    return report


def load_unmapped(ckpt: Path):
    """`load_checkpoint` in fp32 without memory-mapping the shards (their pages would count on top of the model):
    each tensor is read into its own buffer and assigned."""
    import torch

    from retrv.model.config import read_config
    from retrv.model.files import ICM_NAME, checkpoint_file
    from retrv.model.loading import read_tensors
    from retrv.model.qwen import Qwen2_5_VL

    cfg = read_config(ckpt)
    with torch.device("meta"):
        model = Qwen2_5_VL(cfg)
    tensors = checkpoint_tensors(ckpt)
    state = {}
    for name, _ in model.named_parameters():
        if name.startswith("icm."):
            continue
        if name == EMBED_PARAM:  # unused by TorchBackend (the generator embeds with the pack's table): 1 row
            state[name] = torch.zeros(1, cfg.text.hidden_size)
            continue
        src = EMBED_PARAM if name == LM_HEAD and LM_HEAD not in tensors else name
        state[name] = torch.from_numpy(read_rows(tensors[src]))
    if model.icm is not None:
        state.update({f"icm.{k}": v for k, v in read_tensors(checkpoint_file(ckpt, ICM_NAME), torch.float32).items()})
    model.language_model.embed_tokens = torch.nn.Embedding(1, cfg.text.hidden_size, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load_dequantized(model, pack: Pack) -> None:
    import onnx
    import torch

    inits = {t.name: t for t in onnx.load(str(pack.path / "decoder.onnx"), load_external_data=False).graph.initializer}
    params = dict(model.named_parameters())
    for ref in pack.manifest.extra["streaming"]["weights"]:
        if ref["quant"] == "int4":
            p = params[ref["param"]]
            w, _ = int4_weight(pack.path, inits, ref["init"], p.shape[1])
            with torch.no_grad():
                p.copy_(torch.from_numpy(w))


def verify_streamed_pack(pack_dir: Path, ckpt: Path) -> dict:
    pack = Pack.open(pack_dir, verify="size")  # just written; (1) reads the bytes anyway
    entry = pack.manifest.files["decoder.onnx"]
    quant = None
    if entry.quantization:
        from retrv.calibration.config import CONFIGS

        q = dict(entry.quantization)
        cls = CONFIGS[q.pop("mode")]
        quant = cls(**{k: v for k, v in q.items() if k in cls.__dataclass_fields__})
    precision = pack.manifest.files["vision.onnx"].precision
    report = {"weights": check_weights(pack_dir, ckpt), "layers": check_layers(pack_dir, ckpt),
              "truncated_greedy": check_truncated(Path(ckpt), precision, quant)}
    log.info("verified %s: %s", pack_dir, report)
    return report
