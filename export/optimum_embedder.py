"""`retrv export CKPT PACK --embedder DIR` where DIR is what `optimum-cli export onnx` wrote for a CLIP / SigLIP
dual encoder or a (sentence-transformers) text encoder.

optimum writes ONE `model.onnx` for a dual encoder, with both towers: every call would need input_ids AND
pixel_values, and would compute both towers. The pack instead holds two graphs cut out of it by output
(`onnx.utils.Extractor`): `embedder_image.onnx` (pixel_values -> image features) and `embedder_text.onnx`
(text inputs -> text features), so an image-only item runs the image tower only, a text-only item the text tower
only, and the user still exports with optimum's one command. The features are the tensors the graph divides by
their L2 norm to make `image_embeds` / `text_embeds`: transformers' `get_image_features` / `get_text_features`,
which UniIR's score fusion sums before normalising (runtime/inputs/dual_encoder.py).

Every cut graph is run beside the original on sample inputs and must give its normalised outputs (1e-5); a folder
that is not what optimum writes for a supported model is refused with one line naming the file and what was
expected, before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from retrv.model.files import checkpoint_file
from retrv.runtime.errors import CheckpointError, InputError
from retrv.runtime.inputs.clip_preprocess import ClipImageConfig
from retrv.runtime.inputs.dual_encoder import TEXT_INPUTS, OptimumEmbedderConfig, TextInputConfig
from retrv.runtime.pack import describe_file

log = logging.getLogger(__name__)

MODEL_ONNX = "model.onnx"
DUAL_TYPES = ("clip", "siglip")
# Text encoders optimum exports for feature extraction / sentence-transformers whose inputs the runtime feeds.
TEXT_TYPES = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "albert", "electra", "nomic_bert", "e5")
# ONNX Runtime 1.20 (the lowest this project supports) implements opsets up to 21; below 13 predates the
# Split/ReduceSum-with-axes-input forms every optimum exporter of these models emits (its default is 14 or more).
MIN_OPSET, MAX_OPSET = 13, 21
VALIDATION_TOLERANCE = 1e-5  # fp32: the cut graphs run the same nodes as the original
TEXT_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"--embedder {path}: {what}")


def is_optimum_folder(path: str | os.PathLike) -> bool:
    """An optimum export (a `model.onnx` beside config.json), as opposed to a Qwen2.5-VL checkpoint."""
    return (Path(path) / MODEL_ONNX).is_file() or os.path.lexists(Path(path) / MODEL_ONNX)


def _read_json(folder: Path, name: str, what: str) -> dict:
    if not os.path.lexists(folder / name):
        raise _fail(folder / name, f"file not found; expected {what}")
    path = checkpoint_file(folder, name)  # a regular file inside the folder; a symlink out is refused
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"not readable JSON ({type(e).__name__}); expected {what}") from None
    if not isinstance(data, dict):
        raise _fail(path, f"got a JSON {type(data).__name__}; expected {what}")
    return data


def _load_onnx(folder: Path):
    import onnx

    path = checkpoint_file(folder, MODEL_ONNX)
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError; any of them means "not ONNX"
        raise _fail(path, f"not a readable ONNX model ({type(e).__name__}); expected optimum-cli's export") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise _fail(path, f"opset {opset}; expected {MIN_OPSET}..{MAX_OPSET} (re-export with "
                          f"`optimum-cli export onnx --opset 17 ...`)")
    return model, opset


def _tensor_io(model) -> tuple[dict, dict]:
    """The graph's I/O in the manifest's form: {name: {"dtype", "shape"}}, symbolic axes as names."""
    from onnx import helper

    def spec(values) -> dict:
        out = {}
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{v.name}_{i}")
                     for i, d in enumerate(t.shape.dim)]
            out[v.name] = {"dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name, "shape": shape}
        return out

    return spec(model.graph.input), spec(model.graph.output)


def _producers(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def _raw_feature(model, output: str, path: Path) -> str:
    """The tensor `output` is the L2 normalisation of: `output = x / norm(x)` as transformers writes it."""
    node = _producers(model).get(output)
    if node is None or node.op_type != "Div":
        got = "no node" if node is None else f"a {node.op_type} node"
        raise _fail(path, f"output '{output}' comes from {got}; expected x / ||x|| (CLIPModel/SiglipModel's "
                          f"normalisation, as optimum exports it)")
    return node.input[0]


def _graph_inputs_of(model, tensor: str) -> set[str]:
    """The graph inputs `tensor` depends on (walks producers back to inputs and initializers)."""
    producers = _producers(model)
    inputs = {i.name for i in model.graph.input}
    seen, stack, found = set(), [tensor], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            found.add(name)
        node = producers.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
            for attr in node.attribute:  # If/Loop bodies read outer tensors by name
                for g in list(attr.g and [attr.g]) + list(attr.graphs):
                    stack.extend(i for n in g.node for i in n.input if i)
    return found


def _cut(model, source: Path, feature: str, inputs: list[str], out: Path) -> None:
    """Write the subgraph `inputs` -> `feature`, its one output renamed `features`."""
    import onnx
    from onnx import helper
    from onnx.utils import Extractor

    inferred = onnx.shape_inference.infer_shapes(model)  # the Extractor needs a value_info for the cut tensor
    if not any(v.name == feature for v in inferred.graph.value_info):
        inferred.graph.value_info.append(helper.make_tensor_value_info(feature, onnx.TensorProto.FLOAT, None))
    sub = Extractor(inferred).extract_model(inputs, [feature])
    sub.graph.node.append(helper.make_node("Identity", [feature], ["features"], name="retrv_features"))
    value = sub.graph.output[0]
    renamed = helper.make_tensor_value_info("features", value.type.tensor_type.elem_type, None)
    renamed.type.CopyFrom(value.type)
    del sub.graph.output[:]
    sub.graph.output.append(renamed)
    try:
        onnx.checker.check_model(sub)
    except onnx.checker.ValidationError as e:
        raise _fail(source, f"the graph cut to '{feature}' is not valid ONNX ({str(e).splitlines()[0]})") from None
    onnx.save_model(sub, str(out))


def _tower(model, path: Path, output: str, allowed: tuple, role: str) -> tuple[str, list[str]]:
    outputs = [o.name for o in model.graph.output]
    if output not in outputs:
        raise _fail(path, f"no output '{output}' (has {outputs}); expected the {role} tower's output that "
                          f"optimum-cli export onnx writes")
    feature = _raw_feature(model, output, path) if role in ("image", "text") and output.endswith("_embeds") \
        else output
    needs = sorted(_graph_inputs_of(model, feature))
    bad = [n for n in needs if n not in allowed]
    if bad or not needs:
        raise _fail(path, f"the {role} tower ('{output}') reads inputs {needs}; expected only {list(allowed)}")
    return feature, needs


def _pad_id(folder: Path, tokenizer) -> int:
    cfg = _read_json(folder, "tokenizer_config.json", "the tokenizer's config (pad token)") \
        if os.path.lexists(folder / "tokenizer_config.json") else {}
    pad = cfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = tokenizer.token_to_id(pad) if isinstance(pad, str) else None
    if pad_id is None:
        pad_id = 0  # no pad token: masked positions are never read, any id in the vocabulary will do
    return int(pad_id)


def read_optimum_folder(folder: Path) -> tuple[OptimumEmbedderConfig, object, dict]:
    """Check `folder` and describe it: (the pack's embedder config, the loaded ONNX model, the tower tensors
    {"image"|"text": (feature tensor, its inputs)}). Refuses, naming the file, anything the runtime cannot run."""
    from tokenizers import Tokenizer

    if not folder.is_dir():
        raise _fail(folder, "not a directory; expected a checkpoint or an optimum-cli export onnx folder")
    config = _read_json(folder, "config.json", "the model's config.json (optimum-cli copies it)")
    model_type = config.get("model_type")
    if model_type not in DUAL_TYPES + TEXT_TYPES:
        raise _fail(folder / "config.json", f"model_type {model_type!r} is not supported; expected a dual encoder "
                                            f"{list(DUAL_TYPES)} or a text encoder {list(TEXT_TYPES)}")
    if not os.path.lexists(folder / "tokenizer.json"):
        raise _fail(folder / "tokenizer.json", "file not found; expected the fast tokenizer optimum-cli saves "
                                               "(convert a slow one with AutoTokenizer(..., use_fast=True))")
    tokenizer = Tokenizer.from_file(str(checkpoint_file(folder, "tokenizer.json")))
    model, _ = _load_onnx(folder)
    path = folder / MODEL_ONNX
    towers = {}
    if model_type in DUAL_TYPES:
        towers["image"] = _tower(model, path, "image_embeds", ("pixel_values",), "image")
        towers["text"] = _tower(model, path, "text_embeds", TEXT_INPUTS, "text")
        proc_dict = _read_json(folder, "preprocessor_config.json",
                               f"the {model_type} image processor's config (optimum-cli copies it)")
        try:
            image = ClipImageConfig.from_hf(proc_dict, model_type)
        except InputError as e:
            raise _fail(folder / "preprocessor_config.json", str(e)) from None
        text_cfg = config.get("text_config") or {}
        max_pos = _bounded_by_tokenizer(folder, text_cfg.get("max_position_embeddings",
                                                             77 if model_type == "clip" else 64))
        padding = "max_length" if model_type == "siglip" else "longest"  # SigLIP pools the last position
        pooling, family, output = "tower", model_type, "image_embeds"
        dim_of = towers["image"][0]
    else:
        outputs = [o.name for o in model.graph.output]
        output = "sentence_embedding" if "sentence_embedding" in outputs else "token_embeddings" \
            if "token_embeddings" in outputs else "last_hidden_state"
        towers["text"] = _tower(model, path, output, TEXT_INPUTS, "text encoder")
        pooling = "sentence_embedding" if output == "sentence_embedding" else _text_pooling(folder)
        image, family, padding = None, "text", "longest"
        max_pos = _text_max_length(folder, config)
        dim_of = towers["text"][0]
    dim = _feature_dim(model, dim_of, config, path)
    text = TextInputConfig(max_length=int(max_pos), padding=padding, pad_id=_pad_id(folder, tokenizer))
    spec = OptimumEmbedderConfig(family=family, model_type=model_type, dim=dim, pooling=pooling, text=text,
                                 image=image, source=folder.name)
    return spec, model, towers


def _text_pooling(folder: Path) -> str:
    """sentence-transformers' pooling config (1_Pooling/config.json); without one, mean pooling, and said so."""
    pooling_dir = folder / "1_Pooling"
    if not (pooling_dir / "config.json").is_file():
        log.warning("%s: no 1_Pooling/config.json; pooling token embeddings by their mean", folder)
        return "mean"
    cfg = _read_json(pooling_dir, "config.json", "sentence-transformers' pooling config")
    modes = [TEXT_POOLINGS[k] for k, v in cfg.items() if k in TEXT_POOLINGS and v is True]
    if len(modes) != 1:
        raise _fail(pooling_dir / "config.json", f"pooling modes {modes}; expected exactly one of "
                                                 f"{sorted(TEXT_POOLINGS)} set to true")
    return modes[0]


def _text_max_length(folder: Path, config: dict) -> int:
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        value = _read_json(folder, "sentence_bert_config.json", "sentence-transformers' config").get("max_seq_length")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return _bounded_by_tokenizer(folder, int(config.get("max_position_embeddings", 512)))


def _bounded_by_tokenizer(folder: Path, positions: int) -> int:
    """The text length: the model's positions, or less where the tokenizer's model_max_length says so (a
    sentence-transformers model saves its max_seq_length there)."""
    if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1:
        raise _fail(folder / "config.json", f"max_position_embeddings: got {positions!r}; expected a positive integer")
    if not os.path.lexists(folder / "tokenizer_config.json"):
        return positions
    limit = _read_json(folder, "tokenizer_config.json", "the tokenizer's config").get("model_max_length")
    return min(positions, limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 \
        else positions


def _feature_dim(model, tensor: str, config: dict, path: Path) -> int:
    """The features' last axis: from shape inference, else the config's projection/hidden size."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for v in list(inferred.graph.value_info) + list(inferred.graph.output):
            if v.name == tensor:
                last = v.type.tensor_type.shape.dim[-1]
                if last.HasField("dim_value"):
                    return int(last.dim_value)
    except Exception:  # noqa: BLE001 - shape inference is best effort; the config answers otherwise
        pass
    for key in ("projection_dim", "hidden_size"):
        for where in (config, config.get("text_config") or {}):
            if isinstance(where.get(key), int):
                return int(where[key])
    raise _fail(path, f"cannot tell the width of '{tensor}'; expected a static last axis or a projection_dim")


def _sample_feed(model, names: list[str], dim_hint: dict) -> dict:
    rng = np.random.default_rng(0)
    ins, _ = _tensor_io(model)
    feed = {}
    for name in names:
        if name == "pixel_values":
            feed[name] = rng.standard_normal((2, 3, dim_hint["h"], dim_hint["w"])).astype(np.float32)
        elif name == "input_ids":
            feed[name] = rng.integers(0, dim_hint["vocab"], (2, dim_hint["seq"])).astype(ins[name]["dtype"])
        elif name == "position_ids":
            feed[name] = np.tile(np.arange(dim_hint["seq"]), (2, 1)).astype(ins[name]["dtype"])
        elif name == "attention_mask":
            m = np.ones((2, dim_hint["seq"]), ins[name]["dtype"])
            m[1, -2:] = 0
            feed[name] = m
        else:
            feed[name] = np.zeros((2, dim_hint["seq"]), ins[name]["dtype"])
    return feed


def export_optimum_embedder(folder: Path, tmp: Path, files: dict, validation: dict) -> dict:
    """Cut, check and write the embedder's graphs and tokenizer into the pack being written at `tmp`; returns
    the manifest's `extra.embedder`."""
    import shutil

    import onnxruntime as ort

    spec, model, towers = read_optimum_folder(folder)
    source = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hint = {"seq": min(spec.text.max_length, 7), "vocab": 16}
    if spec.image is not None:
        hint["h"], hint["w"] = spec.image.out_size
    for role, (feature, inputs) in towers.items():
        name = f"embedder_{role}.onnx"
        _cut(model, folder / MODEL_ONNX, feature, inputs, tmp / name)
        feed = _sample_feed(model, inputs, hint)
        full_feed = {**_sample_feed(model, [i.name for i in model.graph.input], hint), **feed}
        dual = spec.family != "text"
        want_name = {"image": "image_embeds", "text": "text_embeds"}[role] if dual else feature
        cut = ort.InferenceSession(str(tmp / name), providers=["CPUExecutionProvider"])
        got = cut.run(["features"], feed)[0]
        if dual:  # the cut graph's features, normalised, must be the original's normalised output
            got = got / np.linalg.norm(got, axis=-1, keepdims=True)
        want = source.run([want_name], full_feed)[0]
        diff = float(np.abs(got - want).max())
        if not diff <= VALIDATION_TOLERANCE:
            raise _fail(folder / MODEL_ONNX, f"the cut {role} graph differs from '{want_name}' by {diff:.3g}; "
                                             f"expected <= {VALIDATION_TOLERANCE}")
        validation[f"embedder_{role}"] = {"max_abs_diff": {want_name: diff}, "tolerance": VALIDATION_TOLERANCE}
        import onnx

        ins, outs = _tensor_io(onnx.load(str(tmp / name)))
        files[name] = describe_file(tmp, name, f"embedder_{role}", precision="fp32", inputs=ins, outputs=outs)
    shutil.copyfile(checkpoint_file(folder, "tokenizer.json"), tmp / "embedder_tokenizer.json")
    files["embedder_tokenizer.json"] = describe_file(tmp, "embedder_tokenizer.json", "embedder_tokenizer")
    log.info("embedder %s (%s) from %s", spec.family, spec.model_type, folder)
    return spec.to_dict()
