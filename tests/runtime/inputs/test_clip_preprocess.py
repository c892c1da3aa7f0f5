"""retrv.runtime.inputs.clip_preprocess against transformers 5.23's CLIPImageProcessorPil / SiglipImageProcessorPil
(the oracle), bit for bit: odd, tiny and huge images, RGBA / greyscale / CMYK / palette inputs, arrays and files.
The processors are configured from the committed optimum fixtures' preprocessor_config.json, and from the classes'
defaults (CLIP 224 shortest edge + 224 crop, SigLIP 224x224)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrv.runtime.errors import InputError
from retrv.runtime.inputs.clip_preprocess import ClipImageConfig, preprocess_clip_image, preprocess_clip_images

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "optimum"


def _processor(family: str, fixture: bool):
    pytest.importorskip("transformers")
    if family == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    else:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as cls
    d = json.loads((FIXTURES / family / "onnx" / "preprocessor_config.json").read_text()) if fixture else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = cls(**{k: v for k, v in d.items() if k != "image_processor_type"})
    return hf, ClipImageConfig.from_hf(d, family)


def _theirs(hf, image) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(hf([image])["pixel_values"])[0]


def _rand(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


SHAPES = [(1, 1), (3, 997), (997, 3), (4000, 3), (2, 5), (31, 29), (224, 224), (1500, 1100), (37, 91)]


@pytest.mark.parametrize("fixture", [True, False], ids=["fixture-config", "class-defaults"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_odd_tiny_and_huge_images_equal_transformers_bit_for_bit(family, fixture):
    hf, cfg = _processor(family, fixture)
    rng = np.random.default_rng(0)
    for h, w in SHAPES:
        # PIL images: transformers guesses the channel axis of an array and reads (1, 1, 3) or (3, 997, 3) as
        # channels-first; ours always reads arrays channels-last (tested with unambiguous arrays below)
        image = Image.fromarray(_rand(rng, h, w))
        ours, theirs = preprocess_clip_image(image, cfg), _theirs(hf, image)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape, (h, w)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{family} {h}x{w}")


def _modes(rng) -> dict:
    rgb = Image.fromarray(_rand(rng, 41, 57))
    rgba = Image.fromarray(_rand(rng, 41, 57, 4), "RGBA")
    palette = rgb.convert("P")
    palette.info["transparency"] = 3
    return {"RGBA": rgba, "L": rgb.convert("L"), "CMYK": rgb.convert("CMYK"), "P+transparency": palette,
            "LA": rgba.convert("LA"), "I;16": Image.fromarray(rng.integers(0, 255, (20, 33)).astype(np.uint16)),
            "RGBA array": _rand(rng, 23, 40, 4)}  # (a 2-D grey array transformers refuses; PIL "L" is grey)


@pytest.mark.parametrize("family, fixture", [("clip", True), ("siglip", False)])
def test_rgba_greyscale_cmyk_and_palette_inputs_equal_transformers(family, fixture):
    hf, cfg = _processor(family, fixture)
    for name, image in _modes(np.random.default_rng(1)).items():
        if name == "I;16":
            continue  # transformers refuses 16-bit arrays the same way we do, see the next test
        np.testing.assert_array_equal(preprocess_clip_image(image, cfg), _theirs(hf, image), err_msg=name)


def test_a_null_do_convert_rgb_means_no_conversion_as_in_transformers():
    """4.57's SigLIP processor saves `"do_convert_rgb": null`; transformers then converts nothing: RGB input is
    equal, and a 4-channel image fails there (ValueError on the mean) and is refused here in one line."""
    hf, cfg = _processor("siglip", True)
    assert cfg.do_convert_rgb is False
    rgb = Image.fromarray(_rand(np.random.default_rng(4), 33, 50))
    np.testing.assert_array_equal(preprocess_clip_image(rgb, cfg), _theirs(hf, rgb))
    rgba = _rand(np.random.default_rng(4), 33, 50, 4)
    with pytest.raises(ValueError, match="mean must have 4 elements"):
        _theirs(hf, rgba)
    with pytest.raises(InputError, match="do_convert_rgb=false: got uint8 array of shape"):
        preprocess_clip_image(rgba, cfg)


def test_a_file_path_is_read_as_transformers_load_image_reads_it(tmp_path):
    from transformers.image_utils import load_image

    hf, cfg = _processor("clip", True)
    rng = np.random.default_rng(2)
    path = tmp_path / "x.png"
    Image.fromarray(_rand(rng, 45, 70, 4), "RGBA").save(path)
    np.testing.assert_array_equal(preprocess_clip_image(str(path), cfg), _theirs(hf, load_image(str(path))))


def test_a_batch_stacks_to_one_size_channels_first():
    _, cfg = _processor("clip", True)
    rng = np.random.default_rng(3)
    out = preprocess_clip_images([_rand(rng, 5, 80), _rand(rng, 300, 20)], cfg)
    assert out.shape == (2, 3, *cfg.out_size) and out.dtype == np.float32


@pytest.mark.parametrize("d, match", [
    ({"size": {"longest_edge": 5}}, "size: got {'longest_edge': 5}; expected"),
    ({"size": {"shortest_edge": 30}, "do_center_crop": False}, "crop_size: got none"),
    ({"crop_size": {"height": 0, "width": 3}}, r"crop_size\[0\]: got 0"),
    ({"image_std": [1, 0, 1]}, "image_std: got"),
    ({"resample": 9}, "resample: got 9"),
    ({"size": "224"}, "size: got '224'"),
])
def test_bad_processor_configs_are_refused_in_one_line(d, match):
    with pytest.raises(InputError, match=match) as err:
        ClipImageConfig.from_hf(d, "clip")
    assert "\n" not in str(err.value)


def test_an_extreme_aspect_ratio_is_refused_before_a_gigabyte_resize():
    _, cfg = _processor("clip", False)
    with pytest.raises(InputError, match=r"image of 1x20000 \(HxW\) pixels: a shortest-edge resize makes it "
                                         r"224x4480000; expected at most"):
        preprocess_clip_image(Image.new("RGB", (20000, 1)), cfg)


def test_a_16_bit_array_and_an_empty_list_are_refused():
    _, cfg = _processor("siglip", True)
    with pytest.raises(InputError, match="expected uint8"):
        preprocess_clip_image(np.zeros((4, 4, 3), np.uint16), cfg)
    with pytest.raises(InputError, match="expected a non-empty list"):
        preprocess_clip_images([], cfg)


def test_the_manifest_form_round_trips():
    _, cfg = _processor("clip", True)
    assert ClipImageConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
