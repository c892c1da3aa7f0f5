"""`retrv export CKPT PACK --embedder DIR` with DIR an optimum-cli export (tests/fixtures/optimum: tiny random
CLIP, SigLIP and sentence-transformers models made with transformers 4.57 and exported by optimum-cli 0.1.0 in a
second environment; tests/fixtures/optimum/make.py). The oracle is the main environment's transformers 5.23 loading
the same checkpoints' safetensors: the pack's vectors must equal `get_image_features` / `get_text_features` within
1e-5. Malformed or unsupported folders are refused in one line naming the file."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrv.runtime.errors import CheckpointError, InputError, PackError
from retrv.runtime.inputs.embedding import EmbedItem

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "optimum"
TOL = 1e-5  # fp32, the brief's tolerance
TEXTS = ["a red ball", "The THEN other; thing 42!", "x", "a much longer caption that the tokenizer must cut short "
         "because it runs well past sixteen tokens of this tiny vocabulary"]


@pytest.fixture(scope="module")
def packs(tiny_ckpt, tmp_path_factory):
    """{family: (pack, components)} for clip, siglip and the sentence-transformers text encoder."""
    from retrv.export.pack_export import export_pack
    from retrv.runtime.backends import open_backend
    from retrv.runtime.pack import Pack
    from retrv.runtime.retriever import Components

    root = tmp_path_factory.mktemp("optimum-packs")
    out = {}
    for family in ("clip", "siglip", "sentence"):
        pack = Pack.open(export_pack(tiny_ckpt, root / family, embedder=FIXTURES / family / "onnx"))
        out[family] = (pack, Components(pack, open_backend(pack, "ort", cache_dir=None)))
    return out


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 57), (30, 30), (91, 13))]


def _oracle(family: str):
    """transformers 5.23's model, tokenizer and PIL image processor from the fixture's saved checkpoint."""
    import torch
    from transformers import AutoTokenizer, CLIPModel, SiglipModel

    hf = FIXTURES / family / "hf"
    model = (CLIPModel if family == "clip" else SiglipModel).from_pretrained(hf).eval()
    if family == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as proc_cls
    else:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as proc_cls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = proc_cls.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    padding = "max_length" if family == "siglip" else True  # SigLIP is trained on max_length-padded text

    def features(out):
        return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().numpy()

    def image(images):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = proc(images, return_tensors="pt")["pixel_values"]
            return features(model.get_image_features(pixel_values=pixels))

    def text(texts):
        enc = tok(texts, padding=padding, truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            kw = {"attention_mask": enc["attention_mask"]} if family == "clip" else {}
            return features(model.get_text_features(input_ids=enc["input_ids"], **kw))

    return image, text


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_packs_vectors_equal_transformers_get_image_and_text_features(packs, family):
    pytest.importorskip("transformers")
    pack, comps = packs[family]
    emb = comps.embedder
    image, text = _oracle(family)
    images = _images()
    want_img, want_txt = image(images), text(TEXTS)
    np.testing.assert_allclose(emb.image_features(images), want_img, rtol=0, atol=TOL)
    np.testing.assert_allclose(emb.text_features(TEXTS), want_txt, rtol=0, atol=TOL)
    # UniIR CLIP-SF: image-only, text-only and image+text items; each L2-normalised
    items = [EmbedItem(None, image=images[0]), EmbedItem(TEXTS[0]), EmbedItem(TEXTS[1], image=images[1])]
    want = _unit(np.stack([want_img[0], want_txt[0], want_img[1] + want_txt[1]]))
    np.testing.assert_allclose(emb.embed(items, "candidate"), want, rtol=0, atol=TOL)
    np.testing.assert_allclose(emb.embed(items, "query"), want, rtol=0, atol=TOL)  # symmetric encoders


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_pack_records_the_embedder_and_each_call_runs_one_tower(packs, family):
    pack, comps = packs[family]
    spec = pack.manifest.extra["embedder"]
    assert (spec["kind"], spec["family"], spec["pooling"], spec["fusion"], spec["normalize"]) == \
        ("optimum", family, "tower", "sum", True)
    assert spec["image"]["processor"] == family and spec["text"]["padding"] == \
        ("max_length" if family == "siglip" else "longest")
    assert list(pack.manifest.files["embedder_image.onnx"].inputs) == ["pixel_values"]
    assert "pixel_values" not in pack.manifest.files["embedder_text.onnx"].inputs
    for role in ("image", "text"):
        assert pack.manifest.validation[f"embedder_{role}"]["max_abs_diff"][f"{role}_embeds"] <= TOL
    backend = comps.backend
    backend.close()
    comps.embedder.embed([EmbedItem("only text")], "query")
    assert set(backend._runners) == {"embedder_text"}  # noqa: SLF001 - a text query never opens the image tower


def test_a_sentence_transformers_text_encoder_uses_its_sentence_embedding(packs):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoTokenizer, BertModel

    pack, comps = packs["sentence"]
    spec = pack.manifest.extra["embedder"]
    assert (spec["family"], spec["pooling"], spec["image"]) == ("text", "sentence_embedding", None)
    assert not pack.has("embedder_image")
    hf = FIXTURES / "sentence" / "hf"
    bert, tok = BertModel.from_pretrained(hf).eval(), AutoTokenizer.from_pretrained(hf)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        tokens = bert(**enc).last_hidden_state.numpy()  # (n, S, H)
    mask = enc["attention_mask"].numpy()[:, :, None]
    want = _unit((tokens * mask).sum(1) / mask.sum(1))  # its 1_Pooling (mean) then 2_Normalize
    np.testing.assert_allclose(comps.embedder.embed([EmbedItem(t) for t in TEXTS], "query"), want, rtol=0, atol=TOL)
    with pytest.raises(InputError, match="the pack's embedder is a bert text encoder, expected text-only items"):
        comps.embedder.embed([EmbedItem("a", image=_images()[0])], "candidate")


def test_token_embeddings_are_pooled_as_the_pooling_config_says(packs):
    """A text encoder whose graph gives token embeddings only: pooled here (mean, cls, max, lasttoken)."""
    from retrv.runtime.inputs.dual_encoder import OptimumEmbedder, OptimumEmbedderConfig

    pack, _ = packs["sentence"]
    out = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # (n, S, D)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    base = pack.manifest.extra["embedder"]
    got = {p: OptimumEmbedder(None, OptimumEmbedderConfig.from_dict({**base, "pooling": p}),
                              pack.file("embedder_tokenizer")).pool(out, mask)
           for p in ("mean", "cls", "max", "lasttoken")}
    np.testing.assert_array_equal(got["mean"], [[1, 2], [8, 9]])
    np.testing.assert_array_equal(got["cls"], [[0, 1], [6, 7]])
    np.testing.assert_array_equal(got["max"], [[2, 3], [10, 11]])
    np.testing.assert_array_equal(got["lasttoken"], [[2, 3], [10, 11]])


# --- malformed / unsupported folders ------------------------------------------------------------------------------

def _copy(tmp_path: Path, family: str = "clip") -> Path:
    return Path(shutil.copytree(FIXTURES / family / "onnx", tmp_path / f"{family}-onnx"))


def _edit_model(folder: Path, fn) -> None:
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    fn(model)
    onnx.save_model(model, str(folder / "model.onnx"))


def _drop_output(name):
    def fn(model):
        keep = [o for o in model.graph.output if o.name != name]
        del model.graph.output[:]
        model.graph.output.extend(keep)
    return fn


def _set_opset(version):
    def fn(model):
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = version
    return fn


def _edit_json(name, fn):
    def edit(folder: Path):
        path = folder / name
        d = json.loads(path.read_text())
        fn(d)
        path.write_text(json.dumps(d))
    return edit


CASES = [
    pytest.param(lambda f: _edit_model(f, _drop_output("image_embeds")),
                 r"model.onnx: no output 'image_embeds' \(has \[.*\]\); expected the image tower's output",
                 id="missing-image-tower"),
    pytest.param(lambda f: _edit_model(f, _drop_output("text_embeds")),
                 r"model.onnx: no output 'text_embeds'", id="missing-text-tower"),
    pytest.param(_edit_json("config.json", lambda d: d.update(model_type="blip")),
                 r"config.json: model_type 'blip' is not supported; expected a dual encoder \['clip', 'siglip'\]",
                 id="unknown-model-type"),
    pytest.param(lambda f: _edit_model(f, _set_opset(11)),
                 r"model.onnx: opset 11; expected 13..21", id="opset-too-old"),
    pytest.param(lambda f: _edit_model(f, _set_opset(40)),
                 r"model.onnx: opset 40; expected 13..21", id="opset-too-new"),
    pytest.param(lambda f: (f / "preprocessor_config.json").unlink(),
                 r"preprocessor_config.json: file not found; expected the clip image processor's config",
                 id="missing-preprocessor"),
    pytest.param(lambda f: (f / "tokenizer.json").unlink(),
                 r"tokenizer.json: file not found; expected the fast tokenizer", id="missing-tokenizer"),
    pytest.param(lambda f: (f / "model.onnx").write_bytes(b"\x08\x07garbage"),
                 r"model.onnx: not a readable ONNX model", id="corrupt-onnx"),
    pytest.param(_edit_json("preprocessor_config.json", lambda d: d.update(size={"longest_edge": 9})),
                 r"preprocessor_config.json: size: got \{'longest_edge': 9\}; expected", id="bad-preprocessor"),
]


@pytest.mark.parametrize("breaks, match", CASES)
def test_a_malformed_optimum_folder_is_refused_naming_the_file(tmp_path, breaks, match):
    from retrv.export.optimum_embedder import read_optimum_folder

    folder = _copy(tmp_path)
    breaks(folder)
    with pytest.raises(CheckpointError, match=match) as err:
        read_optimum_folder(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_a_tower_that_reads_the_other_towers_input_is_refused(tmp_path):
    """An 'image_embeds' that depends on input_ids cannot run image-only: refused, not cut wrong."""
    from onnx import helper

    from retrv.export.optimum_embedder import read_optimum_folder

    def fn(model):
        prod = {o: n for n in model.graph.node for o in n.output}
        div = prod["image_embeds"]
        # image features + 0 * (a value computed from input_ids): the tower now reads input_ids
        cast = helper.make_node("Cast", ["input_ids"], ["ids_f"], to=1)
        red = helper.make_node("ReduceSum", ["ids_f"], ["ids_sum"], keepdims=0)
        mul = helper.make_node("Mul", ["ids_sum", "ids_sum"], ["ids_sq"])
        add = helper.make_node("Add", [div.input[0], "ids_sq"], ["mixed"])
        model.graph.node.extend([cast, red, mul, add])
        div.input[0] = "mixed"

    folder = _copy(tmp_path)
    _edit_model(folder, fn)
    with pytest.raises(CheckpointError, match=r"the image tower \('image_embeds'\) reads inputs \['input_ids', "
                                              r"'pixel_values'\]; expected only \['pixel_values'\]"):
        read_optimum_folder(folder)


def test_the_cli_refuses_a_bad_folder_in_one_line_and_writes_no_pack(tiny_ckpt, tmp_path, capsys):
    from retrv.app.cli import main

    folder = _copy(tmp_path)
    _edit_model(folder, _drop_output("image_embeds"))
    assert main(["export", str(tiny_ckpt), str(tmp_path / "pack"), "--embedder", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.onnx: no output 'image_embeds'" in err
    assert not (tmp_path / "pack").exists()


def test_a_pack_whose_optimum_embedder_lost_a_graph_is_refused(packs, tmp_path):
    from retrv.runtime.pack import MANIFEST_NAME, Pack

    pack, _ = packs["clip"]
    copy = Path(shutil.copytree(pack.path, tmp_path / "pack"))
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    del manifest["files"]["embedder_image.onnx"]
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PackError, match=r"a clip embedder without files of roles \['embedder_image'\]"):
        Pack.open(copy)
    manifest["extra"]["embedder"]["pooling"] = "mean"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="embedder pooling: got 'mean' for family 'clip'"):
        Pack.open(copy)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_text_encoder_with_token_embeddings_only_is_pooled_as_its_pooling_config_says(tiny_ckpt, tmp_path, pooling):
    """A feature-extraction export (token embeddings, no sentence_embedding): pooled in numpy as 1_Pooling says
    (here cls; without a pooling config, mean), then L2; against BertModel's hidden states."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoTokenizer, BertModel

    from retrv.export.pack_export import export_pack
    from retrv.runtime.backends import open_backend
    from retrv.runtime.pack import Pack
    from retrv.runtime.retriever import Components

    folder = _copy(tmp_path, "sentence")
    _edit_model(folder, _drop_output("sentence_embedding"))
    if pooling == "cls":
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    pack = Pack.open(export_pack(tiny_ckpt, tmp_path / "pack", embedder=folder))
    assert pack.manifest.extra["embedder"]["pooling"] == pooling
    got = Components(pack, open_backend(pack, "ort", cache_dir=None)).embedder.embed(
        [EmbedItem(t) for t in TEXTS], "candidate")
    hf = FIXTURES / "sentence" / "hf"
    bert, tok = BertModel.from_pretrained(hf).eval(), AutoTokenizer.from_pretrained(hf)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        tokens = bert(**enc).last_hidden_state.numpy()  # (n, S, H)
    mask = enc["attention_mask"].numpy()[:, :, None]
    want = tokens[:, 0] if pooling == "cls" else (tokens * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(got, _unit(want), rtol=0, atol=TOL)


def test_a_pooling_config_with_two_modes_is_refused(tmp_path):
    from retrv.export.optimum_embedder import read_optimum_folder

    folder = _copy(tmp_path, "sentence")
    _edit_model(folder, _drop_output("sentence_embedding"))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    with pytest.raises(CheckpointError, match=r"1_Pooling/config.json: pooling modes \['cls', 'mean'\]; expected "
                                              r"exactly one"):
        read_optimum_folder(folder)


def test_auto_keeps_an_optimum_embedder_pack_on_onnx_runtime_even_with_engines(packs, monkeypatch):
    """TensorRT engines are not built for the optimum graphs yet: `auto` must not pick TensorRT for such a pack
    (it would fail at the first embedding), even where the pack's other engines match the device."""
    import dataclasses

    import retrv.runtime.backends.trt as trt
    from retrv.runtime.backends import open_backend
    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.pack import FileEntry, Manifest

    pack, _ = packs["clip"]
    files = {**pack.manifest.files, "decoder.plan": FileEntry(role="trt_decoder", sha256="0" * 64, bytes=1)}
    fake = type(pack).__new__(type(pack))
    fake.__init__(pack.path, Manifest(**{**dataclasses.asdict(pack.manifest) | {"files": files}}),
                  pack.model_config, pack.preprocessor, pack.sha256)
    monkeypatch.setattr(trt, "engines_match", lambda p: True)
    assert isinstance(open_backend(fake, "auto", cache_dir=None), OrtBackend)
