"""The same small checks against every backend: ONNX Runtime, PyTorch (export/torch_backend.py), TensorRT (the real
backend code over the CPU fake in tests/fake_tensorrt.py) and the scripted model, where each applies.

- `start` / `step`: logits (B, V), the state's length and stats counters advance by the tokens fed;
- the decode state extends: a prefill then one step gives a single longer prefill's last logits;
- `vision(feeds, role=...)` is accepted by every backend (the pack's own tower; a separate embedder's where served);
- `embed`, `icm_content`, `icm_relation` shapes; one-line refusals of a bad feed.
"""

from __future__ import annotations

import numpy as np
import pytest

import fake_tensorrt
from scripted_backend import ScriptedBackend

from retrv.export.pack_export import export_pack
import retrv.export.torch_backend  # noqa: F401  (registers the "torch" backend)
from retrv.export.trt import EngineShapes, build_engines
from retrv.model.tiny import write_tiny_checkpoint
from retrv.runtime.backends import Backend, open_backend
from retrv.runtime.backends.base import DecoderState
from retrv.runtime.backends.runner import Runner
from retrv.runtime.backends.trt import TrtBackend
from retrv.runtime.errors import InputError
from retrv.runtime.inputs.positions import vision_graph_inputs

BACKENDS = ["ort", "ort-fused", "torch", "trt-fake", "scripted"]
GRAPH_BACKENDS = ["ort", "ort-fused", "torch", "trt-fake"]  # run the pack's real model (the scripted one emits a script)
# Small engine limits: the tiny model needs no more, and the fake allocates the KV cache at max_total.
SHAPES = EngineShapes(max_batch=2, opt_prefill=16, max_seq=64, opt_past=32, max_total=128, opt_patches=64,
                      max_patches=1024, opt_cands=4, max_cands=8, opt_cand_len=8, max_cand_len=32, opt_query_len=8,
                      max_query_len=32, workspace_mb=64)


@pytest.fixture(scope="module")
def fake_trt():
    """The fake `tensorrt` (and CUDA driver) stays installed for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        yield fake_tensorrt.install(mp)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, fake_trt):
    """(checkpoint, pack with TensorRT engines built by the recording fake)."""
    root = tmp_path_factory.mktemp("conformance")
    ckpt = write_tiny_checkpoint(root / "ckpt", icm=True, seed=5)
    pack_dir = export_pack(ckpt, root / "pack", decoder="traced")  # TensorRT takes the traced layout only
    fake_tensorrt.RecordingBuilder.made.clear()
    pack = build_engines(pack_dir, shapes=SHAPES, fingerprint=fake_tensorrt.fingerprint(fake_trt.driver),
                         builder_factory=fake_tensorrt.RecordingBuilder)
    return ckpt, pack


@pytest.fixture(scope="module")
def fused_pack(tiny, tmp_path_factory):
    """The same checkpoint exported with the fused decoder layout (export/fused_decoder.py)."""
    from retrv.runtime.pack import Pack

    return Pack.open(export_pack(tiny[0], tmp_path_factory.mktemp("conformance-fused") / "pack", decoder="fused"))


def _open(name: str, ckpt, pack, fused_pack=None) -> Backend:
    if name == "ort-fused":
        return open_backend(fused_pack, "ort", cache_dir=None)
    if name == "ort":
        return open_backend(pack, "ort", cache_dir=None)
    if name == "torch":
        return open_backend(pack, "torch", checkpoint=ckpt)  # registered by importing export.torch_backend
    if name == "trt-fake":
        return TrtBackend(pack)  # on the fake driver
    table = np.load(pack.file("embed_tokens"))
    return ScriptedBackend(table, script=[5, 6, 7], end_token=pack.model_config.tokens.eos_token_ids[0])


@pytest.fixture(scope="module")
def backends(tiny, fused_pack, fake_trt):
    ckpt, pack = tiny
    opened = {name: _open(name, ckpt, pack, fused_pack) for name in BACKENDS}
    yield opened
    for b in opened.values():
        b.close()


def _prompt(pack, s: int, seed: int = 0, batch: int = 1):
    """(B, S, H) embeddings of real token rows, text positions (3, B, S), a full key mask."""
    table = np.load(pack.file("embed_tokens"))
    ids = np.random.default_rng(seed).integers(10, table.shape[0], size=(batch, s))
    pos = np.broadcast_to(np.arange(s, dtype=np.int64), (3, batch, s)).copy()
    return table[ids].astype(np.float32), pos, np.ones((batch, s), np.int64)


def _vision_feeds(cfg, grids):
    v = cfg.vision
    grids = np.asarray(grids, np.int64)
    feeds = vision_graph_inputs(grids, v.spatial_merge_size, v.window_size, v.patch_size)
    n = int(grids.prod(axis=1).sum())
    feeds["patches"] = np.random.default_rng(1).standard_normal((n, v.patch_dim)).astype(np.float32)
    return feeds, n // v.spatial_merge_size ** 2


# -------------------------------------------------------------------------------------------------- decode state
@pytest.mark.parametrize("name", BACKENDS)
def test_start_and_step_shapes_and_stats(backends, tiny, name):
    _, pack = tiny
    b = backends[name]
    vocab = pack.model_config.text.vocab_size
    n = 1 if name == "scripted" else 2  # the scripted model plays one sequence
    state = b.start(n)
    assert isinstance(state, DecoderState) and state.batch == n and state.length == 0
    embeds, pos, mask = _prompt(pack, 5, batch=n)
    logits = b.step(state, embeds, pos, mask)
    assert logits.shape == (n, vocab)
    assert state.length == 5 and state.stats == {"steps": 1, "tokens": 5}
    one, _, _ = _prompt(pack, 1, seed=1, batch=n)
    logits = b.step(state, one, np.full((3, n, 1), 5, np.int64), np.ones((n, 1), np.int64))
    assert logits.shape == (n, vocab)
    assert state.length == 6 and state.stats == {"steps": 2, "tokens": 6}
    assert state.attention_mask.dtype == np.int64 and state.attention_mask.shape == (n, 6)


@pytest.mark.parametrize("name", GRAPH_BACKENDS)
def test_prefill_then_step_equals_one_longer_prefill(backends, tiny, name):
    _, pack = tiny
    b = backends[name]
    embeds, pos, mask = _prompt(pack, 7, seed=3)
    whole = b.step(b.start(1), embeds, pos, mask)
    state = b.start(1)
    b.step(state, embeds[:, :6], pos[:, :, :6], mask[:, :6])
    last = b.step(state, embeds[:, 6:], pos[:, :, 6:], mask[:, 6:])
    np.testing.assert_allclose(last, whole, atol=1e-4, rtol=0)
    # and a cache that did nothing would not pass: the last token alone gives other logits
    alone = b.step(b.start(1), embeds[:, 6:], pos[:, :, 6:], mask[:, 6:])
    assert np.abs(alone - whole).max() > 1e-3


def test_ort_torch_and_trt_agree_on_logits(backends, tiny):
    _, pack = tiny
    embeds, pos, mask = _prompt(pack, 6, seed=4)
    got = {n: backends[n].step(backends[n].start(1), embeds, pos, mask) for n in GRAPH_BACKENDS}
    np.testing.assert_allclose(got["ort"], got["torch"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["trt-fake"], got["ort"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["ort-fused"], got["ort"], atol=1e-5, rtol=0)


def test_trt_decode_runs_on_the_one_token_profile(backends, tiny, fake_trt):
    _, pack = tiny
    trt = fake_trt
    b = backends["trt-fake"]
    state = b.start(1)
    embeds, pos, mask = _prompt(pack, 4)
    del trt.executions[:]
    b.step(state, embeds, pos, mask)
    b.step(state, embeds[:, :1], np.full((3, 1, 1), 4, np.int64), np.ones((1, 1), np.int64))
    assert [(e["graph"], e["profile"]) for e in trt.executions] == [("decoder.onnx", 0), ("decoder.onnx", 1)]
    assert trt.executions[1]["inputs"]["past_key_0"][2] == 4  # the past read back from the other ping-pong slot


# ----------------------------------------------------------------------------------------- vision, embed, ICM
@pytest.mark.parametrize("name", BACKENDS)
def test_vision_takes_a_role(backends, tiny, name):
    _, pack = tiny
    feeds, tokens = _vision_feeds(pack.model_config, [(1, 4, 6), (1, 8, 4)])
    h = pack.model_config.text.hidden_size
    assert backends[name].vision(feeds).shape == (tokens, h)
    assert backends[name].vision(feeds, role="vision").shape == (tokens, h)


def test_fused_embed_of_a_left_padded_batch_equals_each_row_alone(backends, tiny):
    """The fused graph has no key mask: the backend runs a padded embedder batch row by row without its padding."""
    _, pack = tiny
    embeds, pos, mask = _prompt(pack, 6, seed=8, batch=2)
    mask[1, :2] = 0  # row 1 is left-padded: its real tokens are the last 4
    pos[:, 1, :2] = 1
    pos[:, 1, 2:] = np.arange(4)
    want = backends["ort"].embed(embeds, pos, mask)
    np.testing.assert_allclose(backends["ort-fused"].embed(embeds, pos, mask), want, atol=1e-5, rtol=0)
    alone = backends["ort-fused"].embed(embeds[1:, 2:], pos[:, 1:, 2:], mask[1:, 2:])
    np.testing.assert_allclose(alone[0], want[1], atol=1e-5, rtol=0)


def test_fused_decoder_refuses_padding_and_batched_extension_in_one_line(backends, tiny):
    _, pack = tiny
    b = backends["ort-fused"]
    embeds, pos, mask = _prompt(pack, 4, batch=2)
    state = b.start(2)
    mask[0, 0] = 0
    with pytest.raises(InputError, match="the fused decoder takes unpadded batches only"):
        b.step(state, embeds, pos, mask)
    b.step(state, embeds, pos, np.ones((2, 4), np.int64))
    with pytest.raises(InputError, match="extends a batched cache one position at a time"):
        b.step(state, embeds[:, :2], pos[:, :, :2] + 4, np.ones((2, 2), np.int64))
    assert state.length == 4 and state.stats["steps"] == 1


def test_fused_decoder_grows_its_buffer_and_refuses_past_the_context(backends, tiny):
    _, pack = tiny
    b = backends["ort-fused"]
    limit = pack.model_config.text.max_position_embeddings
    state = b.start(1)
    capacity = state.cache.capacity
    embeds, pos, mask = _prompt(pack, capacity + 3, seed=9)
    grown = b.step(state, embeds, pos, mask)  # more positions than the first buffer holds: it doubles
    assert state.cache.capacity == 2 * capacity
    np.testing.assert_allclose(grown, backends["ort"].step(backends["ort"].start(1), embeds, pos, mask), atol=1e-5,
                               rtol=0)
    state.attention_mask = np.ones((1, limit), np.int64)  # pretend the context is full
    with pytest.raises(InputError, match=rf"expected <= {limit} \(the model's context"):
        b.step(state, embeds[:, :1], np.full((3, 1, 1), limit, np.int64), np.ones((1, 1), np.int64))


def test_fused_decode_steps_match_the_traced_graph_across_regrowth_and_extension(backends, tiny):
    """One-token steps write into buffers bound once per binding: they must follow the state through a regrown
    cache (a new binding) and a multi-token call in between (which binds its own inputs), and every step's logits
    are the caller's own (a later step does not overwrite them)."""
    _, pack = tiny
    fused, traced = backends["ort-fused"], backends["ort"]
    embeds, pos, mask = _prompt(pack, 12, seed=4)
    a, b = fused._fused_start(1, capacity=4), traced.start(1)
    kept = []
    for lo, hi in ((0, 3), (3, 4), (4, 5), (5, 6), (6, 9), (9, 10), (10, 11), (11, 12)):  # regrows at 5 and 9
        got = fused.step(a, embeds[:, lo:hi], pos[:, :, lo:hi], mask[:, lo:hi])
        want = traced.step(b, embeds[:, lo:hi], pos[:, :, lo:hi], mask[:, lo:hi])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        kept.append((got, got.copy()))
    assert a.cache.capacity == 16 and a.length == 12
    for got, copy_ in kept:
        np.testing.assert_array_equal(got, copy_)


def test_trt_refuses_a_fused_pack_naming_the_flag(fused_pack, fake_trt):
    with pytest.raises(InputError, match="expected a pack exported with `retrv export --decoder traced`"):
        TrtBackend(fused_pack)
    with pytest.raises(InputError, match="build-engine: .* has a fused decoder"):
        build_engines(fused_pack.path, shapes=SHAPES, fingerprint=fake_tensorrt.fingerprint(fake_trt.driver),
                      builder_factory=fake_tensorrt.RecordingBuilder)


def test_vision_agrees_across_graph_backends(backends, tiny):
    _, pack = tiny
    feeds, _ = _vision_feeds(pack.model_config, [(1, 4, 6)])
    want = backends["ort"].vision(feeds)
    np.testing.assert_allclose(backends["torch"].vision(feeds, role="vision"), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(backends["trt-fake"].vision(feeds, role="vision"), want, atol=1e-5, rtol=0)


def test_torch_refuses_a_vision_role_it_does_not_hold(backends, tiny):
    _, pack = tiny
    feeds, _ = _vision_feeds(pack.model_config, [(1, 4, 6)])
    with pytest.raises(InputError, match="torch backend: vision role 'embedder_vision'") as err:
        backends["torch"].vision(feeds, role="embedder_vision")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", BACKENDS)
def test_embed_and_icm_shapes(backends, tiny, name):
    _, pack = tiny
    b, h = backends[name], pack.model_config.text.hidden_size
    embeds, pos, mask = _prompt(pack, 5, batch=2)
    vec = b.embed(embeds, pos, mask)
    assert vec.shape == (2, h)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-4)
    rng = np.random.default_rng(2)
    cands = rng.standard_normal((3, 6, h)).astype(np.float32)
    cmask = np.ones((3, 6), np.int64)
    cmask[0, 4:] = 0
    query = rng.standard_normal((4, h)).astype(np.float32)
    t_con = b.icm_content(cands, cmask)
    t_rel = b.icm_relation(cands, cmask, query, np.ones(4, np.int64))
    assert t_con.shape == (3, h) and t_rel.shape == (3, h)
    assert t_con.dtype == np.float32 and t_rel.dtype == np.float32


def test_embed_and_icm_agree_across_graph_backends(backends, tiny):
    _, pack = tiny
    h = pack.model_config.text.hidden_size
    embeds, pos, mask = _prompt(pack, 5, seed=6)
    rng = np.random.default_rng(7)
    cands, cmask = rng.standard_normal((2, 5, h)).astype(np.float32), np.ones((2, 5), np.int64)
    query, qmask = rng.standard_normal((3, h)).astype(np.float32), np.ones(3, np.int64)
    want = backends["ort"]
    for name in ("torch", "trt-fake", "ort-fused"):
        got = backends[name]
        np.testing.assert_allclose(got.embed(embeds, pos, mask), want.embed(embeds, pos, mask), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.icm_content(cands, cmask), want.icm_content(cands, cmask), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.icm_relation(cands, cmask, query, qmask),
                                   want.icm_relation(cands, cmask, query, qmask), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ runners, refusals
@pytest.mark.parametrize("name, graph", [("ort", "decoder.onnx"), ("trt-fake", "decoder.plan")])
def test_a_bad_decoder_feed_is_refused_in_one_line(backends, tiny, name, graph):
    _, pack = tiny
    b = backends[name]
    state = b.start(1)
    embeds, _, mask = _prompt(pack, 7)
    with pytest.raises(InputError, match=rf"{graph} input 'position_ids': got shape \(1, 7\); expected "
                                         rf"\(3, batch, seq\)"):
        b.step(state, embeds, np.zeros((1, 7), np.int64), mask)
    assert state.length == 0 and state.stats["steps"] == 0  # a refused step leaves the state as it was


@pytest.mark.parametrize("name, graph", [("ort", "icm_content.onnx"), ("trt-fake", "icm_content.plan")])
def test_runners_share_one_protocol(backends, tiny, name, graph):
    _, pack = tiny
    h = pack.model_config.text.hidden_size
    runner = backends[name].runner("icm_content")
    assert isinstance(runner, Runner) and runner.name == graph
    assert set(runner.input_names) == {"cand_tokens", "cand_mask"}
    feed = {"cand_tokens": np.zeros((2, 3, h), np.float32), "cand_mask": np.ones((2, 3), np.int64)}
    with runner as r:
        out = r.infer(feed)
    assert list(out) == ["t_con"] and out["t_con"].shape == (2, h)
    with pytest.raises(InputError, match=rf"{graph}: input 'cand_mask' is missing"):
        runner.infer({"cand_tokens": feed["cand_tokens"]})
    with pytest.raises(InputError, match=rf"{graph} input 'cand_mask': got dtype int32; expected int64"):
        runner.infer({**feed, "cand_mask": feed["cand_mask"].astype(np.int32)})
    backends[name].close()  # runners reopen on next use


def test_open_backend_refuses_unknown_names(tiny):
    _, pack = tiny
    with pytest.raises(InputError, match=r"--backend: got 'tensorflow'; expected one of \['auto', 'ort', 'trt', "
                                         r"'torch'\]"):
        open_backend(pack, "tensorflow")


def test_open_backend_auto_picks_trt_only_for_engines_built_here(tiny, fake_trt):
    _, pack = tiny
    # the fake device's fingerprint is the one the engines were built for: auto takes TensorRT
    b = open_backend(pack, "auto")
    assert b.name == "trt"
    b.close()
    fake_trt.driver.gpu = "another GPU"
    try:
        assert open_backend(pack, "auto", cache_dir=None).name == "ort"
    finally:
        fake_trt.driver.gpu = "Fake GPU (CPU)"
