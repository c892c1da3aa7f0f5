"""retrv.runtime.inputs.preprocess against transformers' Qwen2-VL PIL image processor (the oracle), plus config and error
handling that need no oracle. Images are seeded random arrays, never downloads."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from retrv.runtime.errors import InputError
from retrv.runtime.inputs.preprocess import (
    ImageProcessorConfig,
    load_image,
    preprocess_image,
    preprocess_images,
    smart_resize,
)

ATOL = 1e-5  # the brief's tolerance; in practice the outputs are bit-identical


@pytest.fixture(scope="module")
def hf():
    """transformers' Qwen2VLImageProcessorPil class and smart_resize; skipped on a runtime-only install."""
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as mod

    return mod


def _hf_run(hf, images, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.Qwen2VLImageProcessorPil(**kwargs)(images)
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def _rand_image(rng, h, w, channels=3):
    return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)


def _assert_same(ours, theirs):
    (patches, grid), (ref_patches, ref_grid) = ours, theirs
    np.testing.assert_array_equal(grid.reshape(-1, 3), ref_grid)
    assert patches.dtype == np.float32 and patches.shape == ref_patches.shape
    np.testing.assert_allclose(patches, ref_patches, rtol=0, atol=ATOL)


# --- pixels against the oracle ------------------------------------------------------------------------------------

SIZES = [
    pytest.param(37, 91, {}, id="odd-37x91"),
    pytest.param(225, 301, {}, id="odd-225x301"),
    pytest.param(28, 28, {}, id="tiny-28x28-upscaled-to-min_pixels"),
    pytest.param(10, 30, {}, id="below-factor-10x30"),
    pytest.param(1, 1, {}, id="one-pixel"),
    pytest.param(3000, 2000, {}, id="large-3000x2000-hits-max_pixels"),
    pytest.param(480, 640, {"max_pixels": 28 * 28 * 16}, id="custom-small-max_pixels"),
    pytest.param(37, 91, {"min_pixels": 100_000, "max_pixels": 200_000}, id="custom-large-min_pixels"),
    pytest.param(300, 200, {"resample": 2}, id="bilinear"),
]


@pytest.mark.parametrize("h,w,kwargs", SIZES)
def test_matches_transformers(hf, h, w, kwargs):
    rng = np.random.default_rng(h * 10007 + w)
    image = Image.fromarray(_rand_image(rng, h, w))
    _assert_same(preprocess_image(image, ImageProcessorConfig(**kwargs)), _hf_run(hf, image, **kwargs))


def test_large_image_respects_max_pixels(hf):
    patches, grid = preprocess_image(Image.fromarray(_rand_image(np.random.default_rng(1), 3000, 2000)))
    cfg = ImageProcessorConfig()
    assert grid[1] * grid[2] * cfg.patch_size**2 <= cfg.max_pixels
    assert patches.shape == (grid[1] * grid[2], cfg.patch_dim)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P-transparency", "CMYK", "I;16"])
def test_non_rgb_modes_match_transformers(hf, mode):
    rng = np.random.default_rng(7)
    rgba = _rand_image(rng, 61, 83, 4)
    if mode == "L":
        image = Image.fromarray(rgba[..., 0])
    elif mode == "LA":
        image = Image.fromarray(rgba).convert("LA")
    elif mode == "P-transparency":
        image = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3  # palette index 3 is see-through: must be composited onto white
    elif mode == "CMYK":
        image = Image.fromarray(rgba, mode="RGBA").convert("CMYK")
    elif mode == "I;16":
        image = Image.fromarray(rgba[..., 0].astype(np.uint16) * 200)
    else:
        image = Image.fromarray(rgba)  # random alpha over the whole range
    _assert_same(preprocess_image(image), _hf_run(hf, image))


def test_rgba_is_composited_onto_white(hf):
    transparent = np.zeros((56, 56, 4), dtype=np.uint8)  # black, fully transparent
    patches, _ = preprocess_image(Image.fromarray(transparent))
    white = preprocess_image(Image.fromarray(np.full((56, 56, 3), 255, dtype=np.uint8)))[0]
    np.testing.assert_array_equal(patches, white)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_uint8_arrays_match_transformers(hf, channels):
    array = _rand_image(np.random.default_rng(channels), 50, 77, channels)
    _assert_same(preprocess_image(array), _hf_run(hf, array))


def test_batch_of_two_sizes_matches_transformers(hf):
    rng = np.random.default_rng(11)
    images = [Image.fromarray(_rand_image(rng, 225, 301)), Image.fromarray(_rand_image(rng, 90, 45, 1)[..., 0])]
    patches, grid = preprocess_images(images)
    _assert_same((patches, grid), _hf_run(hf, images))
    assert grid.shape == (2, 3) and grid.dtype == np.int64
    first, _ = preprocess_image(images[0])
    np.testing.assert_array_equal(patches[: len(first)], first)


def test_file_paths_match_transformers(hf, tmp_path):
    """A path goes through transformers' load_image: EXIF orientation applied, alpha dropped (not composited)."""
    rng = np.random.default_rng(5)
    png = tmp_path / "rgba.png"
    Image.fromarray(_rand_image(rng, 70, 130, 4)).save(png)
    jpg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_rand_image(rng, 64, 120)).save(jpg, exif=exif)
    for path in (png, jpg):
        _assert_same(preprocess_image(str(path)), _hf_run(hf, str(path)))
        _assert_same(preprocess_image(path), _hf_run(hf, str(path)))  # pathlib.Path too
    assert load_image(jpg).size == (64, 120)  # rotated: width and height swapped
    with Image.open(png) as im:
        np.testing.assert_array_equal(np.asarray(load_image(png)), np.asarray(im)[..., :3])


def test_no_resize_matches_transformers(hf):
    image = Image.fromarray(_rand_image(np.random.default_rng(3), 56, 84))
    _assert_same(preprocess_image(image, ImageProcessorConfig(do_resize=False)), _hf_run(hf, image, do_resize=False))


def test_config_round_trip_through_transformers(hf):
    """transformers reads our to_dict() to the same processor, and we read its to_dict()."""
    cfg = ImageProcessorConfig(min_pixels=1000, max_pixels=50_000, resample=2, image_mean=(0.5, 0.5, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf.Qwen2VLImageProcessorPil.from_dict(cfg.to_dict())
    image = Image.fromarray(_rand_image(np.random.default_rng(9), 123, 456))
    out = theirs(image)
    _assert_same(preprocess_image(image, cfg), (np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])))
    assert ImageProcessorConfig.from_dict(json.loads(json.dumps(theirs.to_dict(), default=int))) == cfg


def test_smart_resize_matches_transformers(hf):
    rng = np.random.default_rng(0)
    for _ in range(3000):
        h, w = (int(x) for x in np.exp(rng.uniform(0, math.log(8000), 2)).astype(int) + 1)
        lo = int(rng.integers(1, 200_000))
        hi = lo + int(rng.integers(0, 2_000_000))
        factor = int(rng.choice([28, 32]))
        try:
            expected = hf.smart_resize(h, w, factor, lo, hi)
        except ValueError:
            with pytest.raises(InputError, match="aspect ratio"):
                smart_resize(h, w, factor, lo, hi)
            continue
        assert smart_resize(h, w, factor, lo, hi) == expected, (h, w, factor, lo, hi)


def test_extreme_aspect_ratio_raises_like_transformers(hf):
    image = Image.fromarray(_rand_image(np.random.default_rng(2), 5, 1500))
    with pytest.raises(ValueError, match="aspect ratio"):
        _hf_run(hf, image)
    with pytest.raises(InputError, match=r"5x1500 .*aspect ratio 300.0; expected at most 200"):
        preprocess_image(image)


# --- config, errors and isolation: no oracle needed ---------------------------------------------------------------


def test_from_dict_reads_both_spellings():
    released = {  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }
    cfg = ImageProcessorConfig.from_dict(released)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.resample) == (3136, 12845056, 3)
    v5 = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 1000, "longest_edge": 9000}})
    assert (v5.min_pixels, v5.max_pixels) == (1000, 9000)
    v4 = ImageProcessorConfig.from_dict({"size": {"min_pixels": 1000, "max_pixels": 9000}})
    assert v4 == v5
    # top-level bounds override `size`, as transformers 5's __init__ does
    both = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 1000, "longest_edge": 9000}, "max_pixels": 5000})
    assert (both.min_pixels, both.max_pixels) == (1000, 5000)
    assert ImageProcessorConfig.from_dict(cfg.to_dict()) == cfg
    assert ImageProcessorConfig.from_dict({"image_mean": 0.5}).image_mean == (0.5, 0.5, 0.5)


def test_from_file(tmp_path):
    cfg = ImageProcessorConfig(max_pixels=12845056)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg.to_dict()))
    assert ImageProcessorConfig.from_file(tmp_path / "preprocessor_config.json") == cfg
    assert ImageProcessorConfig.from_file(tmp_path) == cfg
    with pytest.raises(InputError, match="not found"):
        ImageProcessorConfig.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        ImageProcessorConfig.from_file(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"patch_size": 0}, r"patch_size: got 0; expected a positive integer"),
        ({"merge_size": 2.0}, r"merge_size: got 2.0"),
        ({"min_pixels": True}, r"min_pixels: got True"),
        ({"min_pixels": 5000, "max_pixels": 4000}, r"max_pixels: got 4000; expected >= min_pixels=5000"),
        ({"image_std": (0.2, 0.0, 0.2)}, r"image_std: .*expected 3 floats > 0"),
        ({"image_mean": (0.5, 0.5)}, r"image_mean: .*expected 3 finite floats"),
        ({"resample": 7}, r"resample: got 7; expected a PIL resampling id"),
        ({"rescale_factor": -1.0}, r"rescale_factor: got -1.0"),
        ({"do_resize": "yes"}, r"do_resize: got 'yes'; expected true or false"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        ImageProcessorConfig(**kwargs)


def test_from_dict_rejects_incomplete_size():
    with pytest.raises(InputError, match="'size'.*expected 'longest_edge'"):
        ImageProcessorConfig.from_dict({"size": {"shortest_edge": 100}})
    with pytest.raises(InputError, match="JSON object"):
        ImageProcessorConfig.from_dict([1, 2])


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        ImageProcessorConfig().min_pixels = 1  # type: ignore[misc]


def test_output_shapes_and_dtypes():
    patches, grid = preprocess_image(np.zeros((100, 200, 3), dtype=np.uint8))
    assert patches.dtype == np.float32 and grid.dtype == np.int64 and grid.shape == (3,)
    assert grid[0] == 1 and patches.shape == (grid[1] * grid[2], 3 * 2 * 14 * 14)
    # A still image is repeated along time: both temporal halves of every patch are equal.
    per_patch = patches.reshape(len(patches), 3, 2, 14 * 14)
    np.testing.assert_array_equal(per_patch[:, :, 0], per_patch[:, :, 1])


def test_image_errors(tmp_path):
    with pytest.raises(InputError, match=r"image file '.*nope.png': not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "text.png").write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="unreadable as an image"):
        preprocess_image(str(tmp_path / "text.png"))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(InputError, match="unreadable as an image"):
        load_image(tmp_path / "truncated.png")
    with pytest.raises(InputError, match="dtype: got float32; expected uint8"):
        preprocess_image(np.zeros((30, 30, 3), dtype=np.float32))
    with pytest.raises(InputError, match=r"shape: got \(30, 30, 2\)"):
        preprocess_image(np.zeros((30, 30, 2), dtype=np.uint8))
    with pytest.raises(InputError, match="got list; expected a file path"):
        load_image([[0]])
    with pytest.raises(InputError, match="do_convert_rgb=false: .*PIL mode 'RGBA'"):
        preprocess_image(Image.new("RGBA", (30, 30)), ImageProcessorConfig(do_convert_rgb=False))
    with pytest.raises(InputError, match="do_resize=false: expected both sides to be multiples of"):
        preprocess_image(Image.new("RGB", (30, 30)), ImageProcessorConfig(do_resize=False))
    with pytest.raises(InputError, match="empty list"):
        preprocess_images([])
    with pytest.raises(InputError, match="single Image"):
        preprocess_images(Image.new("RGB", (30, 30)))
    with pytest.raises(InputError, match="height: got 0"):
        smart_resize(0, 10, 28, 3136, 1003520)


def test_runtime_modules_import_without_torch():
    code = (
        "import sys, retrv.runtime.inputs.preprocess, retrv.runtime.inputs.positions; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
