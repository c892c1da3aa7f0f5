"""V-Retrver's visual tools, served in-process: `select_images` and `crop_image` (alias `zoom_in`).

A call is JSON inside `<tool_call>…</tool_call>`: `{"name": "crop_image", "arguments": {"bbox_2d": [x1, y1, x2, y2],
"target_image": 2}}`, read tolerantly (a fence, a trailing comma, text around the object; `target_image` 3.0 is
3). Image 0 is the query image, 1..N the window's candidates, as the released tool server numbers them; with
`target_image_base=1` crop targets are numbered as the released prompt says (from 1, in the order the prompt shows
the images, 1 being the query image). Boxes are normalised when every
coordinate is <= 1, pixels otherwise; the crop is padded by 0.1 of the image on each side (at most 600 px) and
clamped to the image, as the released tool server does. Whatever goes wrong (malformed JSON, an unknown tool, a
missing argument, an index out of range, a box outside the image, an exhausted budget) becomes a short text
observation, as the model would see from a tool server: never an exception.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from PIL import Image

from retrv.runtime.errors import InputError
from retrv.runtime.inputs.preprocess import load_image
from retrv.runtime.rerank.answer import whole_number

CROP_NAMES = ("crop_image", "zoom_in", "crop_image_normalized")
TOOL_NAMES = ("select_images", *CROP_NAMES)
PADDING = 0.1  # fraction of the image added around a box
MAX_PADDING_PX = 600.0
MIN_CROP_PX = 4  # a crop thinner than this carries nothing the vision tower can use


@dataclass
class ToolResult:
    ok: bool
    text: str  # observation text; "<image>" marks where each returned image goes
    images: list = field(default_factory=list)  # PIL images, in the order of the "<image>" marks
    name: str | None = None


INVALID_CALL = 'Invalid tool call: expected JSON {"name": ..., "arguments": {...}}.'
_FENCE = re.compile(r"^\s*```(?:json)?\s*|\s*```\s*$")
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _loads(body: str):
    """JSON as models write it: surrounding whitespace or a ``` fence, text around the object, a trailing comma,
    raw newlines inside strings. -> the value, or None when no reading parses."""
    body = _FENCE.sub("", body.strip())
    tries = [body]
    if "{" in body and "}" in body:
        tries.append(body[body.index("{"): body.rindex("}") + 1])
    tries += [_TRAILING_COMMA.sub(r"\1", b) for b in tries]
    for b in tries:
        try:
            return json.loads(b, strict=False)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; "[[[[..." nests too deep
            continue
    return None


def parse_call(body: str) -> tuple[dict | None, str | None]:
    """The text between <tool_call> and </tool_call> -> (call, None) or (None, error observation)."""
    call = _loads(body)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None, INVALID_CALL
    if call["name"] not in TOOL_NAMES:
        return None, f"Unknown action name {call['name'][:40]!r}; available: {', '.join(TOOL_NAMES)}."
    if "arguments" not in call:
        return None, "Missing 'arguments' in the tool call."
    if not isinstance(call["arguments"], dict):
        return None, "'arguments' should be a dictionary of parameter key-value pairs."
    return call, None


def crop_box(size: tuple[int, int], bbox) -> tuple[int, int, int, int] | None:
    """Pixel box to crop from an image of `size` (w, h), with padding and clamping; None if it is empty."""
    w, h = size
    pad_x, pad_y = min(PADDING, MAX_PADDING_PX / w), min(PADDING, MAX_PADDING_PX / h)
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if x2 <= x1 or y2 <= y1:  # inverted or degenerate: not a region of the image
        return None
    if max(x1, y1, x2, y2) > 1:  # pixels -> fractions
        x1, x2, y1, y2 = x1 / w, x2 / w, y1 / h, y2 / h
    clamp = lambda v: min(max(0.0, v), 1.0)  # noqa: E731
    box = (int(clamp(x1 - pad_x) * w), int(clamp(y1 - pad_y) * h), int(clamp(x2 + pad_x) * w),
           int(clamp(y2 + pad_y) * h))
    if box[2] - box[0] < MIN_CROP_PX or box[3] - box[1] < MIN_CROP_PX:
        return None
    return box


class ToolServer:
    """Tools over one window: `images[0]` is the query image (or None), `images[i]` candidate i's (or None)."""

    def __init__(self, images: list, target_image_base: int = 0) -> None:
        """`target_image_base` (crop_image's `target_image`): 0, the released server's numbering (0 = the query,
        i = candidate i); 1, the released prompt's (images numbered from 1 in the order the prompt shows them,
        the query image first when there is one). `select_images` numbers candidates from 1 either way."""
        self.images, self.base = images, target_image_base
        self.shown = [i for i, im in enumerate(images) if im is not None]  # server indices, in prompt order
        self._loaded: dict[int, Image.Image] = {}

    def _image(self, i: int) -> Image.Image:
        if i not in self._loaded:
            self._loaded[i] = load_image(self.images[i])
        return self._loaded[i]

    def _check_index(self, i) -> str | None:
        n = len(self.images) - 1
        if isinstance(i, bool) or not isinstance(i, int):
            return f"Index {str(i)[:40]!r} is not an integer."
        if i == 0 and self.images[0] is None:
            return "Query image does not exist. Please analyze based on the query text."
        if not 0 <= i <= n:
            return (f"Index {i}: invalid image index; expected 0 for the query image or 1 to {n} for the "
                    f"candidates.")
        if self.images[i] is None:
            return f"Index {i}: candidate {i} has no image. Please analyze based on its text."
        return None

    def run(self, body: str) -> ToolResult:
        call, error = parse_call(body)
        if error:
            return ToolResult(False, error)
        name, args = call["name"], call["arguments"]
        try:
            if name == "select_images":
                return self._select(args)
            return self._crop(args, name)
        except (OSError, ValueError, ArithmeticError, InputError) as e:  # an unreadable image file: tell the
            return ToolResult(False, f"Error processing {name}: {e}.", name=name)  # model, keep serving

    def _select(self, args: dict) -> ToolResult:
        targets = args.get("target_images")
        if targets is None:
            return ToolResult(False, "Missing parameters: target_images.", name="select_images")
        if not isinstance(targets, list) or not targets:
            return ToolResult(False, "Invalid target_images format. It should be a non-empty list of integers.",
                              name="select_images")
        targets = [i if whole_number(i) is None else whole_number(i) for i in targets]  # 3.0 -> 3
        errors = [e for e in (self._check_index(i) for i in targets) if e]
        if errors:
            return ToolResult(False, "Invalid indices found: " + " ".join(errors), name="select_images")
        images = [self._image(i) for i in targets]
        w, h = images[0].size
        text = (f"Here are the selected images for detailed analysis. (Image Size: {w}x{h}, Numbered 1 to "
                f"{len(images)}):" + "<image>" * len(images))
        return ToolResult(True, text, images, name="select_images")

    def _crop(self, args: dict, name: str) -> ToolResult:
        missing = [k for k in ("bbox_2d", "target_image") if k not in args]
        if missing:
            return ToolResult(False, f"Missing parameters: {', '.join(missing)}.", name=name)
        bbox, given = args["bbox_2d"], args["target_image"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
            return ToolResult(False, "Invalid bbox_2d format. It should be a list of four numbers.", name=name)
        target = whole_number(given)  # the schema says "number": 3.0 is image 3, 3.5 is no image
        if target is None:
            return ToolResult(False, f"Invalid target_image {str(given)[:40]!r}: it should be a whole number.",
                              name=name)
        if self.base == 1:
            if not 1 <= target <= len(self.shown):
                return ToolResult(False, f"Index {target}: invalid image index; expected 1 to {len(self.shown)} "
                                         f"(the images in the order shown, 1 being the original image).", name=name)
            target = self.shown[target - 1]
        error = self._check_index(target)
        if error:
            return ToolResult(False, error, name=name)
        image = self._image(target)
        box = crop_box(image.size, bbox)
        if box is None:
            return ToolResult(False, f"Invalid bbox_2d {bbox}: expected x1 < x2 and y1 < y2 inside image {target} "
                                     f"(size {image.size[0]}x{image.size[1]}).", name=name)
        cropped = image.crop(box)
        return ToolResult(True, f"Here is the cropped image. (Image Size: {cropped.size[0]}x{cropped.size[1]})\n<image>",
                          [cropped], name=name)
