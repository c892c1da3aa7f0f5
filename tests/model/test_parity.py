"""The oracle: transformers' Qwen2_5_VLForConditionalGeneration on the same tiny random checkpoint.

Fp32 logits must agree within 1e-4 absolute; greedy generations must match token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from retrv.model import load_checkpoint  # noqa: E402
from retrv.model.tiny import write_tiny_checkpoint  # noqa: E402

ATOL = 1e-4


def hf_model(path):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def prompt(rng, ids, cfg, grids, n_text=(5, 7, 4)):
    """Text, then each image as <|vision_start|> <|image_pad|>*n <|vision_end|>, interleaved with text."""
    text_vocab = min(ids.values())  # ordinary tokens sit below the added special tokens
    merge = cfg.vision.spatial_merge_size**2
    seq = list(rng.integers(0, text_vocab, n_text[0]))
    for i, (t, h, w) in enumerate(grids):
        seq += [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * (t * h * w // merge) + [ids["<|vision_end|>"]]
        seq += list(rng.integers(0, text_vocab, n_text[(i + 1) % len(n_text)]))
    return seq


def pixels(rng, grids, patch_dim):
    n = sum(t * h * w for t, h, w in grids)
    return torch.from_numpy(rng.standard_normal((n, patch_dim)).astype(np.float32))


def hf_logits(model, input_ids, attention_mask, pixel_values=None, grid=None, image_token_id=None):
    kwargs = {}
    if pixel_values is not None:
        kwargs = dict(
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=(input_ids == image_token_id).int(),
        )
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def pair(ckpt):
    return load_checkpoint(ckpt), hf_model(ckpt)


def _ids(ckpt):
    from retrv.model.tiny_tokenizer import build_tiny_tokenizer
    from retrv.model.tiny import VOCAB_SIZE

    return build_tiny_tokenizer(VOCAB_SIZE)[1]


# Grids (t, h, w) in patches. 16x16 patches = 8x8 merged tokens = 4 windows of 4x4; 10x22 does not divide into
# windows (padding windows); 4x6 is a single partial window.
TWO_IMAGES = [(1, 16, 16), (1, 10, 22)]


def test_two_images_of_different_sizes_match_transformers(ckpt, pair):
    ours, ref = pair
    rng = np.random.default_rng(0)
    ids = _ids(ckpt)
    seq = prompt(rng, ids, ours.cfg, TWO_IMAGES)
    input_ids = torch.tensor([seq])
    mask = torch.ones_like(input_ids)
    pv, grid = pixels(rng, TWO_IMAGES, ours.cfg.vision.patch_dim), torch.tensor(TWO_IMAGES)
    with torch.no_grad():
        got = ours(input_ids, pv, grid, mask).logits
    want = hf_logits(ref, input_ids, mask, pv, grid, ours.cfg.tokens.image_token_id)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_vision_tower_alone_matches_transformers(ckpt, pair):
    ours, ref = pair
    rng = np.random.default_rng(1)
    grids = [(1, 16, 16), (1, 4, 6), (1, 24, 18)]
    pv, grid = pixels(rng, grids, ours.cfg.vision.patch_dim), torch.tensor(grids)
    with torch.no_grad():
        got = ours.encode_images(pv, grid)
        want = torch.cat(ref.model.get_image_features(pv, grid).pooler_output)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_ratios_match_transformers(tmp_path, kv_heads):
    path = write_tiny_checkpoint(tmp_path, seed=kv_heads, num_attention_heads=4, num_key_value_heads=kv_heads)
    ours, ref = load_checkpoint(path), hf_model(path)
    rng = np.random.default_rng(kv_heads)
    grids = [(1, 8, 12)]
    seq = prompt(rng, _ids(path), ours.cfg, grids)
    input_ids, pv, grid = torch.tensor([seq]), pixels(rng, grids, ours.cfg.vision.patch_dim), torch.tensor(grids)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        got = ours(input_ids, pv, grid, mask).logits
    torch.testing.assert_close(got, hf_logits(ref, input_ids, mask, pv, grid, ours.cfg.tokens.image_token_id),
                               atol=ATOL, rtol=0)


def test_text_only_prompt_matches_transformers(ckpt, pair):
    ours, ref = pair
    rng = np.random.default_rng(2)
    input_ids = torch.tensor([list(rng.integers(0, 200, 23))])
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        got = ours(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, hf_logits(ref, input_ids, mask), atol=ATOL, rtol=0)


def test_batch_of_two_with_left_padding_matches_transformers(ckpt, pair):
    ours, ref = pair
    rng = np.random.default_rng(3)
    ids = _ids(ckpt)
    grids = [(1, 8, 8), (1, 12, 6)]
    long_seq = prompt(rng, ids, ours.cfg, grids[:1], n_text=(9, 11))
    short_seq = prompt(rng, ids, ours.cfg, grids[1:], n_text=(2, 3))
    width = max(len(long_seq), len(short_seq))
    pad = ids["<|endoftext|>"]
    rows = [[pad] * (width - len(s)) + s for s in (long_seq, short_seq)]
    input_ids = torch.tensor(rows)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in (long_seq, short_seq)])
    assert mask.min() == 0, "the test must actually pad a row"
    pv, grid = pixels(rng, grids, ours.cfg.vision.patch_dim), torch.tensor(grids)
    with torch.no_grad():
        got = ours(input_ids, pv, grid, mask).logits
    want = hf_logits(ref, input_ids, mask, pv, grid, ours.cfg.tokens.image_token_id)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)


def _hf_greedy(ref, input_ids, mask, n, **kwargs):
    out = ref.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
        **kwargs,
    )
    return out[:, input_ids.shape[1]:]


def test_greedy_generation_with_cache_matches_transformers(ckpt, pair):
    ours, ref = pair
    rng = np.random.default_rng(4)
    ids = _ids(ckpt)
    seq = prompt(rng, ids, ours.cfg, TWO_IMAGES)
    input_ids = torch.tensor([seq])
    mask = torch.ones_like(input_ids)
    pv, grid = pixels(rng, TWO_IMAGES, ours.cfg.vision.patch_dim), torch.tensor(TWO_IMAGES)
    # min_new_tokens keeps transformers from stopping at eos; ours gets no eos for the same effect, so both must
    # produce 32 tokens. (min_new_tokens masks eos logits; a random model rarely picks eos, and if it did the two
    # would disagree and the test would say so.)
    want = _hf_greedy(ref, input_ids, mask, 32, pixel_values=pv, image_grid_thw=grid,
                      mm_token_type_ids=(input_ids == ours.cfg.tokens.image_token_id).int())
    got = ours.generate(input_ids, pv, grid, mask, max_new_tokens=32, eos_token_ids=())
    assert got.shape == (1, 32)
    assert got.tolist() == want.tolist()


def test_greedy_generation_padded_text_batch_matches_transformers(ckpt, pair):
    ours, ref = pair
    rng = np.random.default_rng(5)
    a, b = list(rng.integers(0, 200, 12)), list(rng.integers(0, 200, 5))
    pad = _ids(ckpt)["<|endoftext|>"]
    input_ids = torch.tensor([a, [pad] * 7 + b])
    mask = torch.tensor([[1] * 12, [0] * 7 + [1] * 5])
    want = _hf_greedy(ref, input_ids, mask, 32)
    got = ours.generate(input_ids, attention_mask=mask, max_new_tokens=32, eos_token_ids=())
    assert got.tolist() == want.tolist()
