"""Export oracles: the PyTorch model for every graph, transformers for generation through the pack."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from retrv.export.graphs import DecoderGraph, SubModel, decoder_spec, sub_models
from retrv.export.onnx_export import ExportValidationError, check_uses_cache, export_onnx, validate_onnx
from retrv.export.pack_export import export_pack
from retrv.export.verify import MAX_NEW_TOKENS, _transformers_greedy, verification_images
from retrv.model import load_checkpoint
from retrv.model.tiny import write_tiny_checkpoint
from retrv.runtime.backends.ort import OrtBackend
from retrv.export.torch_backend import TorchBackend
from retrv.runtime.rerank.budget import Budget
from retrv.app.cli import main as cli
from retrv.runtime.errors import CheckpointError, InputError
from retrv.runtime.generate import Generator
from retrv.runtime.pack import Pack, PackError
from retrv.runtime.inputs.embedding import Embedder
from retrv.runtime.inputs.preprocess import ImageProcessorConfig, preprocess_images


@pytest.fixture(scope="module", params=[True, False], ids=["icm", "plain"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = write_tiny_checkpoint(root / "ckpt", icm=request.param, seed=7)
    return ckpt, export_pack(ckpt, root / "pack")


def _cli_json(argv: list[str]) -> dict:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli(argv) == 0
    return json.loads(buf.getvalue())


def test_pack_lists_every_sub_model_with_validation(exported):
    ckpt, pack_dir = exported
    pack = Pack.open(pack_dir)
    has_icm = (ckpt / "icm.safetensors").exists()
    assert pack.has("icm_content") == has_icm and pack.has("icm_relation") == has_icm
    assert pack.manifest.method == ("retrv-r1" if has_icm else "listwise")
    # a listwise pack records its prompt, answer format and target_image numbering (runtime.rerank.formats)
    assert pack.manifest.extra.get("rerank") == (None if has_icm else
                                                 {"prompt": "v-retrver-released", "answer_format": "list",
                                                  "target_image_base": 1})
    for role in ("vision", "decoder", "embed_tokens", "tokenizer"):
        assert pack.has(role)
    assert not pack.has("embedder"), "the default embedder is the decoder's output, not a second backbone copy"
    val = pack.manifest.validation
    assert val["decoder"]["uses_cache"] is True
    assert all(d <= 1e-4 for role in val for d in val[role]["max_abs_diff"].values())
    assert len(val["decoder"]["shapes"]) == 2  # validated on two input shapes


@pytest.mark.parametrize("case", ["text", "two_images"])
def test_retrv_generate_equals_transformers_greedy(exported, case, tmp_path):
    pytest.importorskip("transformers")
    ckpt, pack_dir = exported
    argv = ["generate", str(pack_dir), "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", "--provider", "cpu"]
    images = []
    if case == "text":
        prompt = "Describe a red bicycle leaning on a wall."
    else:
        prompt = "Which picture shows more circles?"
        images = verification_images()
        for i, img in enumerate(images):
            img.save(tmp_path / f"{i}.png")
            argv += ["--image", str(tmp_path / f"{i}.png")]
    out = _cli_json(argv + ["--prompt", prompt])
    gen = Generator.from_pack(Pack.open(pack_dir), OrtBackend(Pack.open(pack_dir), cache_dir=None))
    want = _transformers_greedy(ckpt, gen, prompt, images)
    assert len(want) == MAX_NEW_TOKENS, "seed must give a full-length generation for this test to mean something"
    assert out["token_ids"] == want
    grids = preprocess_images(images, gen.processor)[1] if images else np.zeros((0, 3), np.int64)
    assert out["prompt_ids"] == gen.render(prompt, grids)
    assert set(out["timings_ms"]) >= {"vision", "prefill", "decode"}


def test_ort_and_torch_backends_generate_the_same(exported):
    ckpt, pack_dir = exported
    pack = Pack.open(pack_dir)
    ort_gen = Generator.from_pack(pack, OrtBackend(pack, cache_dir=None))
    torch_gen = Generator.from_pack(pack, TorchBackend(load_checkpoint(ckpt)))
    images = verification_images()
    assert ort_gen.generate("compare", images, 16).token_ids == torch_gen.generate("compare", images, 16).token_ids


def test_embedding_output_matches_the_torch_embedder_with_left_padding(exported):
    ckpt, pack_dir = exported
    pack = Pack.open(pack_dir)
    ort_b, torch_b = OrtBackend(pack, cache_dir=None), TorchBackend(load_checkpoint(ckpt))
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((2, 6, 64)).astype(np.float32)
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], dtype=np.int64)
    pos = np.broadcast_to(np.clip(np.cumsum(mask, 1) - 1, 0, None), (3, 2, 6)).astype(np.int64).copy()
    got, want = ort_b.embed(embeds, pos, mask), torch_b.embed(embeds, pos, mask)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the padded row differs from the same tokens unpadded only through the mask, and must not be all padding noise
    assert not np.allclose(got[0], got[1])


def test_icm_graphs_match_the_torch_backend(exported):
    ckpt, pack_dir = exported
    pack = Pack.open(pack_dir)
    if not pack.has("icm_content"):
        with pytest.raises(InputError, match="no ICM"):
            OrtBackend(pack, cache_dir=None).icm_content(np.zeros((1, 1, 64), np.float32), np.ones((1, 1), np.int64))
        return
    ort_b, torch_b = OrtBackend(pack, cache_dir=None), TorchBackend(load_checkpoint(ckpt))
    rng = np.random.default_rng(0)
    cand, mask = rng.standard_normal((5, 7, 64)).astype(np.float32), np.ones((5, 7), np.int64)
    mask[2, 4:] = 0
    query, qmask = rng.standard_normal((3, 64)).astype(np.float32), np.ones(3, np.int64)
    np.testing.assert_allclose(ort_b.icm_content(cand, mask), torch_b.icm_content(cand, mask), atol=1e-5)
    np.testing.assert_allclose(ort_b.icm_relation(cand, mask, query, qmask),
                               torch_b.icm_relation(cand, mask, query, qmask), atol=1e-5)


def test_tampered_exported_pack_is_refused_by_generate(exported, tmp_path, capsys):
    _, pack_dir = exported
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pack_dir, bad)
    data = bytearray((bad / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (bad / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(PackError, match="decoder.onnx"):
        Pack.open(bad)
    assert cli(["generate", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "decoder.onnx" in err and "\n" not in err


def test_validation_names_the_output_that_disagrees(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=8)
    model = load_checkpoint(ckpt)
    sub = next(s for s in sub_models(model) if s.spec.role == "vision")
    path = export_onnx(sub, model.cfg, tmp_path / "vision.onnx")[0]
    with torch.no_grad():
        model.visual.merger.mlp[2].bias.add_(0.5)  # the oracle moves; the file does not
    with pytest.raises(ExportValidationError, match=r"vision.onnx output 'image_tokens': max abs diff"):
        validate_onnx(sub, model.cfg, path)


class _IgnoresPast(DecoderGraph):
    """The optimum bug in miniature: a decoder that takes past KV inputs and never reads them."""

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        empty = [p[:, :, :0] for p in past]
        total = attention_mask[:, -inputs_embeds.shape[1]:]
        return super().forward(inputs_embeds, position_ids, total, *empty)


def test_cache_check_catches_a_decoder_that_ignores_its_past(tmp_path):
    import onnxruntime as ort

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=9)
    model = load_checkpoint(ckpt)
    sub = SubModel(decoder_spec(model.cfg), _IgnoresPast(model))
    path = export_onnx(sub, model.cfg, tmp_path / "decoder.onnx")[0]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(ExportValidationError, match="do not depend on past"):
        check_uses_cache(sess, sub.spec, model.cfg, path)


def test_bad_feed_is_refused_with_the_expected_shape(exported):
    _, pack_dir = exported
    backend = OrtBackend(Pack.open(pack_dir), cache_dir=None)
    state = backend.start(1)
    with pytest.raises(InputError, match=r"decoder.onnx input 'position_ids': got shape \(1, 7\); expected \(3, batch, seq\)"):
        backend.step(state, np.zeros((1, 7, 64), np.float32), np.zeros((1, 7), np.int64), np.ones((1, 7), np.int64))


def test_optimized_model_cache_is_written_once_and_reused(exported, tmp_path):
    _, pack_dir = exported
    pack = Pack.open(pack_dir)
    gen = Generator.from_pack(pack, OrtBackend(pack, cache_dir=tmp_path))
    first = gen.generate("hello", max_new_tokens=4).token_ids
    cached = sorted(p.name for p in (tmp_path / "ort").glob("*.onnx"))
    assert any(n.startswith("decoder-") for n in cached)
    again = Generator.from_pack(pack, OrtBackend(pack, cache_dir=tmp_path)).generate("hello", max_new_tokens=4)
    assert again.token_ids == first
    assert sorted(p.name for p in (tmp_path / "ort").glob("*.onnx")) == cached


def test_generate_from_a_pack_does_not_import_torch(exported):
    _, pack_dir = exported
    code = (
        "import sys\n"
        "from retrv.runtime.generate import load_pack_generator\n"
        f"r = load_pack_generator({str(pack_dir)!r}, cache_dir=None).generate('hi', max_new_tokens=3)\n"
        "print(len(r.token_ids), 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "False", "False"]


def test_a_failed_export_leaves_no_pack_and_keeps_the_old_one(exported, tmp_path, monkeypatch):
    ckpt, _ = exported
    target = tmp_path / "pack"
    export_pack(ckpt, target)
    before = (target / "manifest.json").read_bytes()
    import retrv.export.pack_export as pe

    def boom(*a, **k):
        raise ExportValidationError("simulated failure")

    monkeypatch.setattr(pe, "validate_onnx", boom)
    with pytest.raises(ExportValidationError):
        export_pack(ckpt, target)
    assert (target / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pack"]


def test_fp16_pack_validates_against_the_fp32_model_and_verifies(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", icm=True, seed=2)
    pack = Pack.open(export_pack(ckpt, tmp_path / "pack16", precision="fp16", verify=True))
    decoder = pack.manifest.files["decoder.onnx"]
    assert decoder.precision == "fp16"
    assert decoder.inputs["past_key_0"]["dtype"] == "float16"  # half the KV memory on a device
    assert decoder.outputs["logits"]["dtype"] == "float32"
    assert np.load(pack.file("embed_tokens")).dtype == np.float16
    gen = pack.manifest.validation["generation"]
    assert gen["text"]["matches_torch"] and gen["two_images"]["matches_torch"]
    fp32 = Pack.open(export_pack(ckpt, tmp_path / "pack32"))
    assert pack.file("decoder").stat().st_size < 0.6 * fp32.file("decoder").stat().st_size


def test_separate_embedder_checkpoint_is_exported_validated_and_used(tmp_path):
    from retrv.runtime.inputs.corpus import write_jsonl
    from retrv.app.demo import synthetic_image
    from retrv.runtime.inputs.embedding import EmbedItem
    from retrv.runtime.index.store import Index
    from retrv.runtime.retriever import Components, Retriever

    ckpt = write_tiny_checkpoint(tmp_path / "reranker", icm=True, seed=3)
    emb = write_tiny_checkpoint(tmp_path / "embedder", seed=4, hidden_size=96, intermediate_size=160,
                                mrope_section=[4, 4, 4])
    pack = Pack.open(export_pack(ckpt, tmp_path / "pack", embedder=emb))
    for role in ("embedder", "embedder_vision", "embedder_embed_tokens", "embedder_tokenizer"):
        assert pack.has(role)
    assert pack.manifest.validation["embedder"]["max_abs_diff"]["embedding"] <= 1e-4
    assert pack.manifest.extra["embedder"]["model"]["text"]["hidden_size"] == 96

    # the oracle: the embedder checkpoint's own PyTorch model, vision tower and all, on the same item
    comps = Components(pack, OrtBackend(pack, cache_dir=None))
    img = synthetic_image(3)
    got = comps.embedder.embed([EmbedItem("a red ball", image=img)], "query")
    emb_model = load_checkpoint(emb)
    emb_proc = ImageProcessorConfig.from_file(emb / "preprocessor_config.json")

    def torch_encode(images):
        patches, grids = preprocess_images(images, emb_proc)
        with torch.no_grad():
            tokens = emb_model.encode_images(torch.from_numpy(patches), grids).numpy()
        return [(tokens, tuple(int(x) for x in grids[0]))]

    oracle = Embedder(TorchBackend(emb_model), comps.embedder.builder, image_encoder=torch_encode)
    want = oracle.embed([EmbedItem("a red ball", image=img)], "query")
    assert got.shape == (1, 96)
    np.testing.assert_allclose(got, want, atol=1e-5)

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(5):
        synthetic_image(i).save(data / f"{i}.png")
        rows.append({"did": f"c{i}", "txt": f"picture {i}", "img_path": f"{i}.png"})
    write_jsonl(data / "corpus.jsonl", rows)
    assert cli(["index", "build", str(pack.path), str(data / "corpus.jsonl"), str(tmp_path / "index")]) == 0
    index = Index.open(tmp_path / "index", pack=pack)
    assert index.meta.dim == 96
    res = Retriever(pack, index, cache_dir=None).search(text="picture 2", k=3, budget=Budget(think=4))
    assert len(res.ranked) == 3


def test_embedder_of_another_family_is_refused_by_model_type(tmp_path):
    import json as _json

    ckpt = write_tiny_checkpoint(tmp_path / "reranker", seed=3)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(_json.dumps({"model_type": "clip"}))
    (clip / "tokenizer.json").write_text("{}")
    (clip / "preprocessor_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="'clip' is not supported"):
        export_pack(ckpt, tmp_path / "pack", embedder=clip)
    assert not (tmp_path / "pack").exists()
