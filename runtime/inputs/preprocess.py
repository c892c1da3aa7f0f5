"""Qwen2-VL / Qwen2.5-VL image preprocessing in numpy + pillow, reproducing transformers 5.23's
`Qwen2VLImageProcessorPil` (the class `AutoImageProcessor` picks when torchvision is absent).

The pipeline, step for step as transformers runs it:
1. to RGB: a file path is opened, EXIF-transposed and `convert("RGB")`-ed (alpha dropped, as
   `transformers.image_utils.load_image` does); a PIL image or uint8 array with alpha is composited onto white;
2. resize with PIL (bicubic by default) to `smart_resize`'s size, on the uint8 image;
3. rescale in float64, cast to float32, normalize in float32;
4. cut into `patch_size` patches in merge-block-major order; a still image is repeated
   `temporal_patch_size` times along time, so one patch row is `C * T * P * P` values.

No torch, no transformers: this runs on the device.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from retrv.runtime.errors import InputError

# OpenAI CLIP statistics: what Qwen2-VL's vision tower was trained with (transformers' OPENAI_CLIP_MEAN/STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # smart_resize refuses anything more elongated (transformers raises the same)
NUM_CHANNELS = 3
# Bound on every integer of the config: a terapixel image; far past any real bound, and it keeps smart_resize's
# float arithmetic (sqrt of pixels / bound) away from OverflowError on a hostile 400-digit value.
MAX_CONFIG_INT = 1 << 40
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
# PIL's Image.Resampling values, the integers preprocessor_config.json stores under "resample".
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def _positive_int(name: str, value: Any) -> None:
    # bool is an int subclass; `True` as a patch size is a config typo, not a 1.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_CONFIG_INT:
        raise InputError(f"ImageProcessorConfig.{name}: got {value!r}; expected a positive integer <= {MAX_CONFIG_INT}")


def _float_triple(name: str, value: Any, positive: bool) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * NUM_CHANNELS  # transformers broadcasts a scalar mean/std over the channels
    # A list of numbers only: a string "123" would iterate to (1.0, 2.0, 3.0), and `true` is no float.
    if not isinstance(value, (list, tuple, np.ndarray)) or not all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)) for v in value):
        raise InputError(f"ImageProcessorConfig.{name}: got {value!r}; expected {NUM_CHANNELS} floats")
    try:
        triple = tuple(float(v) for v in value)
    except OverflowError:  # an integer beyond float range
        raise InputError(f"ImageProcessorConfig.{name}: got {value!r}; expected {NUM_CHANNELS} finite floats") from None
    if len(triple) != NUM_CHANNELS or not all(math.isfinite(v) for v in triple):
        raise InputError(f"ImageProcessorConfig.{name}: got {value!r}; expected {NUM_CHANNELS} finite floats")
    if positive and min(triple) <= 0:
        raise InputError(f"ImageProcessorConfig.{name}: got {value!r}; expected {NUM_CHANNELS} floats > 0")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What `Qwen2VLImageProcessorPil` honours. Defaults are transformers 5.23's class defaults; the released
    Qwen2.5-VL checkpoints override `max_pixels` (12845056) in their preprocessor_config.json."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            _positive_int(name, getattr(self, name))
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.max_pixels < self.min_pixels:
            raise InputError(
                f"ImageProcessorConfig.max_pixels: got {self.max_pixels}; expected >= min_pixels={self.min_pixels}"
            )
        object.__setattr__(self, "image_mean", _float_triple("image_mean", self.image_mean, positive=False))
        object.__setattr__(self, "image_std", _float_triple("image_std", self.image_std, positive=True))
        rf = self.rescale_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not (0 < rf < math.inf):
            # a comparison, not math.isfinite: an integer beyond float range must be refused, not OverflowError
            raise InputError(f"ImageProcessorConfig.rescale_factor: got {rf!r}; expected a finite float > 0")
        object.__setattr__(self, "rescale_factor", float(rf))
        if isinstance(self.resample, bool) or not isinstance(self.resample, (int, np.integer)) \
                or self.resample not in RESAMPLE_NAMES:
            raise InputError(
                f"ImageProcessorConfig.resample: got {self.resample!r}; expected a PIL resampling id in "
                f"{sorted(RESAMPLE_NAMES)} ({', '.join(f'{k}={v}' for k, v in RESAMPLE_NAMES.items())})"
            )
        object.__setattr__(self, "resample", int(self.resample))
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"ImageProcessorConfig.{name}: got {getattr(self, name)!r}; expected true or false")
            object.__setattr__(self, name, bool(getattr(self, name)))

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merge block of patches."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * P * P."""
        return NUM_CHANNELS * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessorConfig:
        """Read a Hugging Face preprocessor_config.json dict. Pixel bounds come from `size`
        (`shortest_edge`/`longest_edge`, transformers 5; `min_pixels`/`max_pixels`, transformers 4.4x) and are
        overridden by top-level `min_pixels`/`max_pixels`, which is the precedence of transformers 5's
        `Qwen2VLImageProcessor.__init__`. Keys that do not change the pixels (processor_class, ...) are ignored."""
        if not isinstance(d, Mapping):
            raise InputError(f"preprocessor config: got {type(d).__name__}; expected a JSON object (dict)")
        kwargs: dict[str, Any] = {}
        size = d.get("size")
        if size is not None:
            if not isinstance(size, Mapping):
                raise InputError(f"preprocessor config 'size': got {size!r}; expected an object with pixel bounds")
            for ours, spellings in (("min_pixels", ("shortest_edge", "min_pixels")),
                                    ("max_pixels", ("longest_edge", "max_pixels"))):
                value = next((size[k] for k in spellings if size.get(k) is not None), None)
                if value is None and d.get(ours) is None:
                    # transformers would accept this and then fail on the first image; fail on load instead.
                    raise InputError(
                        f"preprocessor config 'size': got {dict(size)!r}; expected '{spellings[0]}' "
                        f"(or '{spellings[1]}', or a top-level '{ours}')"
                    )
                if value is not None:
                    kwargs[ours] = value
        own = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key in own and value is not None:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A preprocessor_config.json dict that transformers 5 and 4.x both read to the same processor: 5 reads
        `size` and lets the top-level bounds override it, 4.x reads the top-level bounds."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "do_convert_rgb": self.do_convert_rgb,
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ImageProcessorConfig:
        """Read preprocessor_config.json, or the one inside a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / PREPROCESSOR_CONFIG_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"preprocessor config '{path}': file not found") from None
        except OSError as e:
            raise InputError(f"preprocessor config '{path}': cannot be read ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise InputError(f"preprocessor config '{path}': not UTF-8 (byte {e.start}); expected JSON") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"preprocessor config '{path}': invalid JSON at line {e.lineno} ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # a 5,000-digit integer; nesting deeper than the stack
            raise InputError(f"preprocessor config '{path}': invalid JSON ({type(e).__name__})") from None
        try:
            return cls.from_dict(d)
        except InputError as e:
            raise InputError(f"preprocessor config '{path}': {e}") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' `smart_resize`: round each side to a multiple of `factor`, then scale both sides (keeping
    the aspect ratio) into [min_pixels, max_pixels]. As in transformers, a very elongated image can still end
    above max_pixels (each side is at least `factor`), and Python's round() rounds halves to even."""
    for name, value in (("height", height), ("width", width), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"smart_resize {name}: got {value!r}; expected a positive integer")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"image of {height}x{width} (HxW) pixels has aspect ratio {max(height, width) / min(height, width):.1f}; "
            f"expected at most {MAX_ASPECT_RATIO} (Qwen2-VL's smart_resize limit)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def _open_image_file(path: str | os.PathLike) -> Image.Image:
    """transformers' `load_image` for a local path: EXIF orientation applied, then `convert("RGB")`, which drops
    any alpha channel rather than compositing it (unlike an in-memory RGBA image, see `_pil_to_rgb`)."""
    if not os.path.isfile(path):
        raise InputError(f"image file '{os.fspath(path)}': not found (expected an existing image file)")
    try:
        with Image.open(path) as im:
            im.load()  # PIL opens lazily; decode now so a truncated file fails here, not mid-pipeline
            return ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError as e:
        raise InputError(f"image file '{os.fspath(path)}': too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        # Pillow raises UnidentifiedImageError (an OSError) for unknown formats, plain OSError or SyntaxError for
        # corrupt ones.
        raise InputError(f"image file '{os.fspath(path)}': unreadable as an image ({e})") from None


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL: anything with alpha (or a palette transparency) is composited onto
    white; everything else goes through `convert("RGB")`."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """transformers' `convert_to_rgb` for a channels-last uint8 array: grey repeated to 3 channels, alpha blended
    onto white in float64 and rounded half to even (np.round), which can differ by 1 from PIL's alpha_composite."""
    if array.dtype != np.uint8:
        raise InputError(
            f"image array dtype: got {array.dtype}; expected uint8 (convert with (x * 255).round().astype(np.uint8))"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(f"image array shape: got {array.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if array.shape[2] == 1:
        return np.repeat(array, NUM_CHANNELS, axis=2)
    if array.shape[2] == 4:
        alpha = array[..., 3:4] / 255  # (H, W, 1) float64
        composite = alpha * array[..., :3] + (1 - alpha) * 255  # (H, W, 3)
        return np.round(composite).astype(np.uint8)
    return np.ascontiguousarray(array)


def load_image(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a file path, a PIL image or a channels-last uint8 array, converted exactly as the
    transformers processor converts that kind of input."""
    if isinstance(image, (str, os.PathLike)):
        return _open_image_file(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_rgb(image))
    raise InputError(f"image: got {type(image).__name__}; expected a file path, a PIL image or a uint8 numpy array")


def rgb_array(image: ImageLike, do_convert_rgb: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 of any accepted input. With do_convert_rgb off transformers feeds the pixels through as
    they are, so only 3-channel input can be normalized with 3 means."""
    if do_convert_rgb or isinstance(image, (str, os.PathLike)):
        # A path is RGB either way: transformers' load_image converts before the processor sees it.
        if isinstance(image, np.ndarray):
            return _array_to_rgb(image)
        return np.asarray(load_image(image))
    array = np.asarray(image) if isinstance(image, Image.Image) else image
    if not isinstance(array, np.ndarray):
        raise InputError(f"image: got {type(image).__name__}; expected a file path, a PIL image or a uint8 numpy array")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != NUM_CHANNELS:
        mode = f" (PIL mode {image.mode!r})" if isinstance(image, Image.Image) else ""
        raise InputError(
            f"image with do_convert_rgb=false: got {array.dtype} array of shape {array.shape}{mode}; "
            f"expected uint8 (H, W, 3) RGB"
        )
    return array


def _patchify(pixels: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """(H, W, C) float32 -> (gh * gw, C * T * P * P) in transformers' order: merge blocks row-major, the
    merge_size x merge_size patches inside a block row-major, then per patch (C, T, P, P)."""
    height, width, channels = pixels.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    blocks = pixels.reshape(gh // m, m, p, gw // m, m, p, channels)  # (bh, mh, ph, bw, mw, pw, C)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, C, ph, pw)
    # A still image is its own second frame: repeat it along a time axis placed after the channels.
    # (bh, bw, mh, mw, C, T, ph, pw)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    return np.ascontiguousarray(frames).reshape(gh * gw, channels * t * p * p)  # (N, C*T*P*P)


def preprocess_image(image: ImageLike, cfg: ImageProcessorConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches float32 (gh*gw, C*T*P*P), grid_thw int64 (3,) = [1, gh, gw])."""
    cfg = ImageProcessorConfig() if cfg is None else cfg
    rgb = rgb_array(image, cfg.do_convert_rgb)  # (H, W, 3) uint8
    height, width = rgb.shape[:2]
    if cfg.do_resize:
        new_h, new_w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        # transformers resizes the uint8 image through PIL (never in float), so PIL's rounding is part of the output.
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=cfg.resample))  # (h, w, 3) uint8
    elif height % cfg.factor or width % cfg.factor:
        raise InputError(
            f"image of {height}x{width} (HxW) pixels with do_resize=false: expected both sides to be multiples of "
            f"patch_size*merge_size={cfg.factor}"
        )
    if cfg.do_rescale:
        # float64 multiply then float32 cast, the order transformers' rescale() uses; float32 math differs in the ulp.
        pixels = (rgb.astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # (h, w, 3)
    else:
        pixels = rgb.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)
        std = np.asarray(cfg.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std  # (h, w, 3) float32
    patches = _patchify(pixels, cfg)  # (N, C*T*P*P)
    grid_thw = np.array([1, pixels.shape[0] // cfg.patch_size, pixels.shape[1] // cfg.patch_size], dtype=np.int64)
    return patches, grid_thw


def preprocess_images(
    images: Sequence[ImageLike], cfg: ImageProcessorConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (patches of all images concatenated (sum N_i, C*T*P*P), grid_thw int64 (n, 3))."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        raise InputError(
            f"images: got a single {type(images).__name__}; expected a list of images (preprocess_image takes one)"
        )
    if len(images) == 0:
        raise InputError("images: got an empty list; expected at least one image")
    cfg = ImageProcessorConfig() if cfg is None else cfg
    results = [preprocess_image(image, cfg) for image in images]
    patches = np.concatenate([r[0] for r in results], axis=0)  # (sum N_i, C*T*P*P)
    grid_thw = np.stack([r[1] for r in results], axis=0)  # (n, 3)
    return patches, grid_thw
