"""CLIP / SigLIP image preprocessing in numpy + pillow, reproducing transformers 5.23's `CLIPImageProcessorPil` and
`SiglipImageProcessorPil` (the PIL backend `AutoImageProcessor` picks without torchvision) bit for bit.

The pipeline, step for step as transformers runs it:
1. to RGB exactly as the Qwen processor does (`preprocess.rgb_array`: a path is EXIF-transposed and converted, a PIL
   image or array with alpha composited onto white, CMYK / greyscale / palette through `convert("RGB")`);
2. resize the uint8 image with PIL: CLIP to `shortest_edge` (the long side `int(size * long / short)`, truncated,
   as `get_resize_output_image_size` computes it), SigLIP to a fixed (height, width);
3. CLIP: center crop in numpy (top/left `(orig - crop) // 2`; a side smaller than the crop is zero-padded, the
   pad split with the extra pixel before, as `center_crop` does);
4. rescale in float64 then cast to float32, normalize in float32; channels first.

No torch, no transformers: this runs on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from retrv.runtime.errors import InputError
from retrv.runtime.inputs.preprocess import (
    MAX_CONFIG_INT,
    NUM_CHANNELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RESAMPLE_NAMES,
    ImageLike,
    rgb_array,
)

# A shortest-edge resize of a very elongated image is huge before the crop (1x10000 at 224: 224x2,240,000, 1.5 GB
# of RGB): transformers allocates it; we refuse past this (400 MB of RGB), which no photo comes near.
MAX_RESIZED_PIXELS = 1 << 27
IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # SigLIP's mean and std (transformers' IMAGENET_STANDARD_MEAN/STD)
# transformers 5.23's class defaults, per model_type: what a preprocessor_config.json that omits a key gets.
DEFAULTS = {
    "clip": {"shortest_edge": 224, "crop": (224, 224), "size_hw": None, "mean": OPENAI_CLIP_MEAN,
             "std": OPENAI_CLIP_STD},
    "siglip": {"shortest_edge": None, "crop": None, "size_hw": (224, 224), "mean": IMAGENET_STANDARD,
               "std": IMAGENET_STANDARD},
}


def _side(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_CONFIG_INT:
        raise InputError(f"{where}: got {value!r}; expected a positive integer <= {MAX_CONFIG_INT}")
    return int(value)


def _pair(where: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(f"{where}: got {value!r}; expected [height, width]")
    return _side(f"{where}[0]", value[0]), _side(f"{where}[1]", value[1])


def _triple(where: str, value: Any, positive: bool) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * NUM_CHANNELS  # transformers broadcasts a scalar over the channels
    if not isinstance(value, (list, tuple)) or len(value) != NUM_CHANNELS or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise InputError(f"{where}: got {value!r}; expected {NUM_CHANNELS} finite floats")
    if positive and min(value) <= 0:
        raise InputError(f"{where}: got {value!r}; expected {NUM_CHANNELS} floats > 0")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class ClipImageConfig:
    """What CLIP/SigLIP's processors honour. Exactly one of `shortest_edge` (CLIP) and `size_hw` (SigLIP) sets the
    resize; `crop` is the center crop (CLIP), None for none. The result is always `out_size` (the towers take one
    image size)."""

    processor: str
    shortest_edge: int | None
    size_hw: tuple[int, int] | None
    crop: tuple[int, int] | None
    resample: int = 3  # PIL bicubic, both families' default
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if self.processor not in DEFAULTS:
            raise InputError(f"image processor: got {self.processor!r}; expected one of {sorted(DEFAULTS)}")
        if self.shortest_edge is not None:
            object.__setattr__(self, "shortest_edge", _side("size.shortest_edge", self.shortest_edge))
        object.__setattr__(self, "size_hw", _pair("size", self.size_hw))
        object.__setattr__(self, "crop", _pair("crop_size", self.crop))
        if (self.shortest_edge is None) == (self.size_hw is None):
            raise InputError(f"size: got shortest_edge={self.shortest_edge!r}, height/width={self.size_hw!r}; "
                             f"expected exactly one ({{'shortest_edge': N}} or {{'height': H, 'width': W}})")
        if self.crop is None and (self.size_hw is None or not self.do_resize):
            raise InputError("crop_size: got none with a shortest_edge resize (or no resize); expected a center "
                             "crop or a fixed {'height', 'width'} resize: the tower takes one image size")
        if isinstance(self.resample, bool) or self.resample not in RESAMPLE_NAMES:
            raise InputError(f"resample: got {self.resample!r}; expected a PIL resampling id in "
                             f"{sorted(RESAMPLE_NAMES)}")
        rf = self.rescale_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not 0 < rf < math.inf:
            raise InputError(f"rescale_factor: got {rf!r}; expected a finite float > 0")
        object.__setattr__(self, "rescale_factor", float(rf))
        object.__setattr__(self, "image_mean", _triple("image_mean", self.image_mean, positive=False))
        object.__setattr__(self, "image_std", _triple("image_std", self.image_std, positive=True))
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: got {getattr(self, name)!r}; expected true or false")

    @property
    def out_size(self) -> tuple[int, int]:
        """(height, width) of every processed image."""
        return self.crop if self.crop is not None else self.size_hw  # type: ignore[return-value]

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], model_type: str) -> ClipImageConfig:
        """A Hugging Face preprocessor_config.json dict for `model_type` ("clip", "siglip"), its class defaults
        filling what it omits; `size`/`crop_size` as dicts or (legacy) integers, as transformers reads them."""
        if model_type not in DEFAULTS:
            raise InputError(f"image processor for model_type {model_type!r}; expected one of {sorted(DEFAULTS)}")
        if not isinstance(d, Mapping):
            raise InputError(f"preprocessor config: got {type(d).__name__}; expected a JSON object")
        base = DEFAULTS[model_type]
        shortest, size_hw, crop = base["shortest_edge"], base["size_hw"], base["crop"]
        size = d.get("size")
        if isinstance(size, int) and not isinstance(size, bool):  # legacy: an int is the shortest edge
            shortest, size_hw = size, None
        elif isinstance(size, Mapping):
            if set(size) == {"shortest_edge"}:
                shortest, size_hw = size["shortest_edge"], None
            elif set(size) == {"height", "width"}:
                shortest, size_hw = None, (size["height"], size["width"])
            else:
                raise InputError(f"size: got {dict(size)!r}; expected {{'shortest_edge': N}} or "
                                 f"{{'height': H, 'width': W}}")
        elif size is not None:
            raise InputError(f"size: got {size!r}; expected an object or an integer")
        do_crop = d.get("do_center_crop", base["crop"] is not None)
        if not isinstance(do_crop, bool):
            raise InputError(f"do_center_crop: got {do_crop!r}; expected true or false")
        raw_crop = d.get("crop_size", crop)
        if isinstance(raw_crop, int) and not isinstance(raw_crop, bool):
            raw_crop = (raw_crop, raw_crop)
        elif isinstance(raw_crop, Mapping):
            if set(raw_crop) != {"height", "width"}:
                raise InputError(f"crop_size: got {dict(raw_crop)!r}; expected {{'height': H, 'width': W}}")
            raw_crop = (raw_crop["height"], raw_crop["width"])
        kw: dict[str, Any] = {"processor": model_type, "shortest_edge": shortest, "size_hw": size_hw,
                              "crop": raw_crop if do_crop else None, "image_mean": base["mean"],
                              "image_std": base["std"]}
        own = {f.name for f in fields(cls)} - {"processor", "shortest_edge", "size_hw", "crop"}
        kw.update({k: v for k, v in d.items() if k in own and v is not None})
        # A `null` flag is not the class default: transformers sets the attribute to None and tests it for truth,
        # so `"do_convert_rgb": null` (what 4.57's SiglipImageProcessor saves) means no conversion.
        kw.update({k: False for k, v in d.items() if k.startswith("do_") and k in own and v is None})
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, d: Any) -> ClipImageConfig:
        """The pack manifest's form (`to_dict`)."""
        if not isinstance(d, Mapping) or set(d) - {f.name for f in fields(cls)} or "processor" not in d:
            raise InputError(f"image config: got {d!r}; expected the fields of ClipImageConfig")
        return cls(**dict(d))


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(..., default_to_square=False)`: (height, width)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(image: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """(C, H, W) -> (C, ch, cw) as transformers' `center_crop`: zero-padded where the image is smaller."""
    _, h, w = image.shape
    ch, cw = crop
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return image[:, top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros((image.shape[0], nh, nw), image.dtype)
    top_pad, left_pad = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[:, top_pad:top_pad + h, left_pad:left_pad + w] = image
    top, left = top + top_pad, left + left_pad
    return canvas[:, max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def preprocess_clip_image(image: ImageLike, cfg: ClipImageConfig) -> np.ndarray:
    """One image -> pixel_values (3, H, W) float32 (float64 when do_rescale and do_normalize are both off, as
    transformers leaves the uint8 pixels; callers cast)."""
    rgb = rgb_array(image, cfg.do_convert_rgb)  # (H, W, 3) uint8
    h, w = rgb.shape[:2]
    if cfg.do_resize:
        nh, nw = _shortest_edge_size(h, w, cfg.shortest_edge) if cfg.shortest_edge else cfg.size_hw
        if nh * nw > MAX_RESIZED_PIXELS:
            raise InputError(f"image of {h}x{w} (HxW) pixels: a shortest-edge resize makes it {nh}x{nw}; expected "
                             f"at most {MAX_RESIZED_PIXELS:,} pixels before the crop (aspect ratio too extreme)")
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), resample=cfg.resample))  # (nh, nw, 3) uint8
    pixels = np.ascontiguousarray(rgb.transpose(2, 0, 1))  # (3, H, W) uint8
    if cfg.crop is not None:
        pixels = _center_crop(pixels, cfg.crop)
    if pixels.shape[1:] != cfg.out_size:
        raise InputError(f"image of {h}x{w} (HxW) pixels becomes {pixels.shape[1]}x{pixels.shape[2]} with "
                         f"do_resize=false; expected {cfg.out_size[0]}x{cfg.out_size[1]}")
    if cfg.do_rescale:
        # float64 multiply then float32 cast, the order transformers' rescale() uses
        pixels = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        pixels = pixels.astype(np.float32, copy=False)
        mean = np.asarray(cfg.image_mean, np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, np.float32)[:, None, None]
        pixels = (pixels - mean) / std  # (3, H, W) float32
    return pixels.astype(np.float32, copy=False)


def preprocess_clip_images(images: Sequence[ImageLike], cfg: ClipImageConfig) -> np.ndarray:
    """Images -> pixel_values (n, 3, H, W) float32."""
    if isinstance(images, (str, Image.Image, np.ndarray)) or len(images) == 0:
        raise InputError("images: got a single image or an empty list; expected a non-empty list of images")
    return np.stack([preprocess_clip_image(im, cfg) for im in images])
