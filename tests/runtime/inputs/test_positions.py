"""retrv.runtime.inputs.positions against transformers 5.23's vision_utils and Qwen2_5_VLModel.get_rope_index (the oracles),
on seeded random grids and prompts."""

from __future__ import annotations

import types

import numpy as np
import pytest

from retrv.runtime.errors import InputError
from retrv.runtime.inputs.positions import (
    decode_position_ids,
    rope_index,
    segment_ids_from_cu_seqlens,
    vision_cu_seqlens,
    vision_position_ids,
    vision_window_index,
)

MERGE, PATCH, WINDOW = 2, 14, 112  # Qwen2.5-VL's vision config: windows of 4x4 merge blocks
IMAGE_TOKEN = 151655
PAD = 151643


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers import vision_utils
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = Qwen2_5_VLConfig()
    assert config.image_token_id == IMAGE_TOKEN and config.vision_config.spatial_merge_size == MERGE
    # get_rope_index only reads self.config and calls self.get_vision_position_ids (which ignores self), so a stub
    # stands in for a model with weights.
    stub = types.SimpleNamespace(
        config=config,
        get_vision_position_ids=lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(None, *a, **k),
        rope_deltas=None,
    )
    return types.SimpleNamespace(torch=torch, vu=vision_utils, model=Qwen2_5_VLModel, stub=stub)


def _random_grid(rng, n, max_side=48, max_t=1):
    t = rng.integers(1, max_t + 1, n)
    hw = rng.integers(1, max_side // MERGE + 1, (n, 2)) * MERGE
    return np.column_stack([t, hw]).astype(np.int64)


# Sides in merge blocks: 1 (smaller than a window), 4 and 8 (exact multiples of the 4-block window, which
# transformers pads by a whole empty window), 5 and 13 (ragged), 30 (many windows).
EDGE_GRIDS = [
    [[1, 2, 2]],
    [[1, 8, 8]],
    [[1, 16, 16]],
    [[1, 10, 26]],
    [[1, 60, 34]],
    [[2, 16, 10]],
    [[1, 8, 8], [1, 10, 26], [1, 60, 34], [2, 6, 4]],
]


def _grids(seed=0, n_random=40):
    rng = np.random.default_rng(seed)
    grids = [np.asarray(g, dtype=np.int64) for g in EDGE_GRIDS]
    grids += [_random_grid(rng, int(rng.integers(1, 5)), max_side=80, max_t=2) for _ in range(n_random)]
    return grids


def test_vision_position_ids_and_cu_seqlens_match_transformers(hf):
    for grid in _grids(1):
        ref_pos = hf.vu.get_vision_position_ids(hf.torch.from_numpy(grid), MERGE).numpy()
        pos = vision_position_ids(grid, MERGE)
        assert pos.dtype == np.int64 and pos.shape == (int(np.prod(grid, axis=1).sum()), 2)
        np.testing.assert_array_equal(pos, ref_pos)
        ref_cu = hf.vu.get_vision_cu_seqlens(hf.torch.from_numpy(grid)).numpy()
        cu = vision_cu_seqlens(grid)
        assert cu.dtype == np.int32
        np.testing.assert_array_equal(cu, ref_cu)


def test_vision_window_index_matches_transformers(hf):
    for grid in _grids(2):
        ref_index, ref_cu = hf.vu.get_vision_window_index(hf.torch.from_numpy(grid), MERGE, WINDOW, PATCH)
        index, cu = vision_window_index(grid, MERGE, WINDOW, PATCH)
        assert index.dtype == np.int64 and cu.dtype == np.int32
        np.testing.assert_array_equal(index, ref_index.numpy())
        np.testing.assert_array_equal(cu, ref_cu.numpy())
        # a permutation of the merge blocks, and windows that cover all patches
        n_blocks = int(np.prod(grid, axis=1).sum()) // MERGE**2
        np.testing.assert_array_equal(np.sort(index), np.arange(n_blocks))
        assert cu[-1] == n_blocks * MERGE**2 and np.all(np.diff(cu) > 0)


def test_multiple_windows_per_image():
    _, cu = vision_window_index([[1, 60, 34]], MERGE, WINDOW, PATCH)  # 30x17 blocks -> 8x5 windows of 4x4
    assert len(cu) - 1 == 8 * 5


def test_segment_ids_from_cu_seqlens():
    for grid in _grids(3, n_random=10):
        for cu in (vision_cu_seqlens(grid), vision_window_index(grid, MERGE, WINDOW, PATCH)[1]):
            total = int(cu[-1])
            seg = segment_ids_from_cu_seqlens(cu, total)
            expected = np.concatenate([np.full(int(e - s), i) for i, (s, e) in enumerate(zip(cu[:-1], cu[1:]))])
            assert seg.dtype == np.int64
            np.testing.assert_array_equal(seg, expected)
    # empty segments (repeated boundaries) are skipped, not assigned
    np.testing.assert_array_equal(segment_ids_from_cu_seqlens([0, 2, 2, 3], 3), [0, 0, 2])
    with pytest.raises(InputError, match="expected non-decreasing from 0 to total=5"):
        segment_ids_from_cu_seqlens([0, 2, 4], 5)
    with pytest.raises(InputError, match="expected non-decreasing"):
        segment_ids_from_cu_seqlens([0, 3, 2, 5], 5)


# --- decoder M-RoPE -----------------------------------------------------------------------------------------------


def _prompt(rng, grids):
    """Token ids of a chat-like prompt: text, then per image <vision_start> image tokens <vision_end>, then text."""
    ids = list(rng.integers(0, 1000, int(rng.integers(1, 12))))
    for t, h, w in grids:
        ids += [151652] + [IMAGE_TOKEN] * (t * h * w // MERGE**2) + [151653]
        ids += list(rng.integers(0, 1000, int(rng.integers(0, 6))))
    return ids


def _left_pad(rows):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    return ids, mask


def _hf_rope(hf, ids, grid, mask):
    t = hf.torch
    pos, deltas = hf.model.get_rope_index(
        hf.stub,
        t.from_numpy(ids),
        mm_token_type_ids=t.from_numpy((ids == IMAGE_TOKEN).astype(np.int32)),
        image_grid_thw=None if grid is None else t.from_numpy(grid),
        attention_mask=None if mask is None else t.from_numpy(mask),
    )
    return pos.numpy(), deltas.numpy()


def _check_rope(hf, ids, grid, mask):
    ref_pos, ref_deltas = _hf_rope(hf, ids, grid, mask)
    kw = dict(image_token_id=IMAGE_TOKEN, spatial_merge_size=MERGE)
    exact, deltas = rope_index(ids, grid, mask, pad_position=0, **kw)  # transformers 5.23 zero-fills padding
    np.testing.assert_array_equal(exact, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    assert exact.dtype == np.int64 and deltas.dtype == np.int64 and deltas.shape == (ids.shape[0], 1)
    pos, _ = rope_index(ids, grid, mask, **kw)  # default: padding gets 1
    valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], ref_pos[:, valid])
    assert np.all(pos[:, ~valid] == 1)
    return pos, deltas


@pytest.mark.parametrize(
    "grids",
    [
        pytest.param([[1, 4, 4]], id="one-small-image"),
        pytest.param([[1, 30, 52]], id="wide-image"),
        pytest.param([[1, 86, 58]], id="tall-max-pixels-image"),
        pytest.param([[1, 8, 12], [1, 20, 6]], id="two-images-one-prompt"),
    ],
)
def test_rope_index_single_prompt(hf, grids):
    rng = np.random.default_rng(len(grids))
    ids = np.asarray([_prompt(rng, grids)], dtype=np.int64)
    grid = np.asarray(grids, dtype=np.int64)
    _check_rope(hf, ids, grid, None)
    _check_rope(hf, ids, grid, np.ones_like(ids))


def test_rope_index_left_padded_batch(hf):
    rng = np.random.default_rng(4)
    grids = [[[1, 8, 8], [1, 4, 10]], [[1, 16, 6]]]
    ids, mask = _left_pad([_prompt(rng, grids[0]), _prompt(rng, grids[1]) + [7] * 30])
    assert mask.min() == 0  # some row really is padded
    _check_rope(hf, ids, np.asarray(grids[0] + grids[1]), mask)


def test_rope_index_batch_with_a_text_only_row(hf):
    rng = np.random.default_rng(5)
    ids, mask = _left_pad([list(rng.integers(0, 1000, 40)), _prompt(rng, [[1, 6, 8]])])
    _, deltas = _check_rope(hf, ids, np.asarray([[1, 6, 8]]), mask)
    assert deltas[0, 0] == 0


def test_rope_index_text_only(hf):
    """No images: positions are cumsum(attention_mask) - 1 on all three rows and the delta is 0, as transformers'
    generate path sets them (get_rope_index with no image tokens agrees)."""
    rng = np.random.default_rng(6)
    ids, mask = _left_pad([list(rng.integers(0, 1000, 9)), list(rng.integers(0, 1000, 14))])
    pos, deltas = _check_rope(hf, ids, None, mask)
    expected = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1)
    np.testing.assert_array_equal(pos, np.broadcast_to(expected, (3, *ids.shape)))
    np.testing.assert_array_equal(deltas, 0)
    pos_nomask, _ = rope_index(ids[:1, :], None, None, image_token_id=IMAGE_TOKEN, spatial_merge_size=MERGE)
    np.testing.assert_array_equal(pos_nomask[0, 0], np.arange(ids.shape[1]))


def test_rope_index_random_batches(hf):
    rng = np.random.default_rng(7)
    for _ in range(25):
        batch = int(rng.integers(1, 4))
        per_row = [[g.tolist() for g in _random_grid(rng, int(rng.integers(0, 3)), max_side=40)] for _ in range(batch)]
        ids, mask = _left_pad([_prompt(rng, g) for g in per_row])
        flat = [g for row in per_row for g in row]
        grid = np.asarray(flat, dtype=np.int64).reshape(-1, 3) if flat else None
        _check_rope(hf, ids, grid, mask)


def test_rope_index_errors():
    kw = dict(image_token_id=IMAGE_TOKEN, spatial_merge_size=MERGE)
    ids = np.asarray([[1, 2] + [IMAGE_TOKEN] * 4 + [3] + [IMAGE_TOKEN] * 4 + [5]])
    with pytest.raises(InputError, match="got 1 rows; expected one per image-token run .*found 2 runs"):
        rope_index(ids, [[1, 4, 4]], **kw)
    with pytest.raises(InputError, match="got 3 rows; .*found 2 runs"):
        rope_index(ids, [[1, 4, 4]] * 3, **kw)
    with pytest.raises(InputError, match="got 0 rows; .*found 2 runs"):
        rope_index(ids, None, **kw)
    with pytest.raises(InputError, match=r"image 1 has 4 image tokens; expected t\*h\*w/merge\^2 = 1\*4\*8/4 = 8"):
        rope_index(ids, [[1, 4, 4], [1, 4, 8]], **kw)
    with pytest.raises(InputError, match="multiples of merge_size=2"):
        rope_index(ids, [[1, 4, 4], [1, 3, 4]], **kw)
    with pytest.raises(InputError, match=r"attention_mask: got shape \(1, 3\)"):
        rope_index(ids, [[1, 4, 4]] * 2, np.ones((1, 3)), **kw)
    with pytest.raises(InputError, match="input_ids: got float64"):
        rope_index(ids.astype(float), [[1, 4, 4]] * 2, **kw)


# --- decoding continuation ----------------------------------------------------------------------------------------


def test_decode_continues_the_prompt():
    """Appending text to a prompt gives the same positions as decode_position_ids after the prompt."""
    rng = np.random.default_rng(8)
    kw = dict(image_token_id=IMAGE_TOKEN, spatial_merge_size=MERGE)
    prompt = _prompt(rng, [[1, 8, 6], [1, 4, 4]])
    grid = np.asarray([[1, 8, 6], [1, 4, 4]])
    _, deltas = rope_index(np.asarray([prompt]), grid, **kw)
    full, _ = rope_index(np.asarray([prompt + [11, 12, 13, 14, 15]]), grid, **kw)
    np.testing.assert_array_equal(decode_position_ids(deltas, len(prompt), 5), full[:, :, len(prompt):])


def test_decode_matches_transformers(hf):
    """transformers' incremental path (compute_3d_position_ids with cached rope_deltas)."""
    rng = np.random.default_rng(9)
    grids = [[[1, 8, 8]], [[1, 4, 6], [1, 6, 4]]]
    ids, mask = _left_pad([_prompt(rng, grids[0]), _prompt(rng, grids[1])])
    grid = np.asarray(grids[0] + grids[1])
    _, deltas = rope_index(ids, grid, mask, image_token_id=IMAGE_TOKEN, spatial_merge_size=MERGE)
    t = hf.torch
    past = ids.shape[1]
    cache = types.SimpleNamespace(get_seq_length=lambda: past)
    hf.stub.rope_deltas = t.from_numpy(deltas)
    for step in (1, 3):
        full_mask = np.concatenate([mask, np.ones((2, step), dtype=np.int64)], axis=1)
        ref = hf.model.compute_3d_position_ids(
            hf.stub, input_ids=t.zeros(2, step, dtype=t.long), image_grid_thw=None, video_grid_thw=None,
            inputs_embeds=t.zeros(2, step, 8), attention_mask=t.from_numpy(full_mask), past_key_values=cache,
        ).numpy()[:, :, -step:]
        # With left padding the deltas are relative to the unpadded length, so start counts unpadded tokens.
        np.testing.assert_array_equal(decode_position_ids(deltas, mask.sum(-1), step), ref)
        ref_nomask = hf.model.compute_3d_position_ids(
            hf.stub, input_ids=t.zeros(2, step, dtype=t.long), image_grid_thw=None, video_grid_thw=None,
            inputs_embeds=t.zeros(2, step, 8), attention_mask=None, past_key_values=cache,
        ).numpy()
        np.testing.assert_array_equal(decode_position_ids(deltas, past, step), ref_nomask)
    hf.stub.rope_deltas = None


def test_decode_validation():
    deltas = np.zeros((2, 1), dtype=np.int64)
    assert decode_position_ids(deltas, 4, 0).shape == (3, 2, 0)
    with pytest.raises(InputError, match=r"rope_deltas: got .* shape \(2,\); expected integer \(batch, 1\)"):
        decode_position_ids(np.zeros(2, dtype=np.int64), 4, 1)
    with pytest.raises(InputError, match=r"start: .*expected an int or an integer array \(2,\)"):
        decode_position_ids(deltas, [1, 2, 3], 1)
    with pytest.raises(InputError, match="length: got -1"):
        decode_position_ids(deltas, 4, -1)
