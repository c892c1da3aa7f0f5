"""What a synthetic scene is and how it looks: the vocabulary (shapes, colours, positions, fine details), the
`Scene` ground truth, and the deterministic renderer. `retrv.train.synth` samples scenes, words them and writes the
dataset; everything here is pure (no randomness, no files).

Rendering draws at 4x and box-filters down (antialiased edges, the same pixels on every platform); every object's
fine detail is clipped to the object, so a mark never changes pixels outside it.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

from PIL import Image, ImageChops, ImageDraw

from retrv.runtime.errors import InputError

PALETTE = {  # object colours: saturated, far apart from each other and from every background
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 210, 30), "green": (40, 160, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (240, 120, 190), "brown": (130, 80, 40),
}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (185, 185, 185), "black": (20, 20, 20), "beige": (235, 225, 200)}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
POSITIONS = {"left": (0.2, 0.5), "top": (0.5, 0.2), "centre": (0.5, 0.5), "bottom": (0.5, 0.8), "right": (0.8, 0.5)}
DETAILS = ("dot", "stripe", "ring", "slash")

_LIGHT = frozenset({"yellow", "orange", "pink"})  # a white mark would be faint on these: theirs is black
RADIUS = 0.12  # object circumradius / image side: 13 px at 112, about one 28-px merged token each way
JITTER = 0.015  # max centre offset / side. Neighbours are 0.3 apart: 2*0.12*1.05 + 2*sqrt(2)*0.015 = 0.294 < 0.3
SCALE = (0.9, 1.05)  # object size nuisance; the upper bound keeps neighbours apart (above)
SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges, same pixels on every platform
MIN_SIZE = 56  # below this the details are under 2 px wide and stop being visible at all
_POSITION_ORDER = {p: i for i, p in enumerate(POSITIONS)}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str
    detail: str | None = None
    dx: float = 0.0  # rendering nuisance (fraction of the image side); not part of the meaning
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("colour", tuple(PALETTE)), ("position", tuple(POSITIONS))):
            if getattr(self, name) not in allowed:
                raise InputError(f"scene object {name}: got {getattr(self, name)!r}; expected one of {allowed}")
        if self.detail is not None and self.detail not in DETAILS:
            raise InputError(f"scene object detail: got {self.detail!r}; expected None or one of {DETAILS}")
        if max(abs(self.dx), abs(self.dy)) > JITTER + 1e-9 or not SCALE[0] <= self.scale <= SCALE[1]:
            raise InputError(f"scene object jitter: got dx={self.dx}, dy={self.dy}, scale={self.scale}; expected "
                             f"|dx|, |dy| <= {JITTER} and scale in {SCALE}")

    @property
    def meaning(self) -> tuple:
        return (self.shape, self.colour, self.position, self.detail)


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image. Objects are kept in canonical (position) order."""

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise InputError(f"scene background: got {self.background!r}; expected one of {tuple(BACKGROUNDS)}")
        objs = tuple(sorted(self.objects, key=lambda o: _POSITION_ORDER[o.position]))
        object.__setattr__(self, "objects", objs)
        if not 1 <= len(objs) <= 3:
            raise InputError(f"scene: got {len(objs)} objects; expected 1 to 3")
        if len({o.position for o in objs}) < len(objs):
            raise InputError(f"scene: two objects share a position in {[o.position for o in objs]}")
        # "the red circle" must name one object, or a modification text would be ambiguous.
        if len({(o.colour, o.shape) for o in objs}) < len(objs):
            raise InputError(f"scene: two objects share colour and shape in {[(o.colour, o.shape) for o in objs]}")
        if sum(o.detail is not None for o in objs) > 1:
            raise InputError("scene: more than one object carries a detail; expected at most one")

    def key(self) -> tuple:
        """The meaning: equal keys are the same scene whatever the rendering nuisances."""
        return (self.background,) + tuple(o.meaning for o in self.objects)

    @property
    def detail_index(self) -> int | None:
        return next((i for i, o in enumerate(self.objects) if o.detail is not None), None)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        try:
            return cls(d["background"], tuple(SceneObject(**o) for o in d["objects"]))
        except (KeyError, TypeError) as e:
            raise InputError(f"scene: got {d!r}; expected {{'background', 'objects': [...]}} ({e})") from None


def _ring(cx: float, cy: float, r: float, n: int, phase: float, radii=(1.0,)) -> list[tuple[float, float]]:
    m = n * len(radii)
    return [(cx + r * radii[k % len(radii)] * math.cos(phase + 2 * math.pi * k / m),
             cy + r * radii[k % len(radii)] * math.sin(phase + 2 * math.pi * k / m)) for k in range(m)]


def _bar(cx: float, cy: float, half_len: float, half_w: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + a * c - b * s, cy + a * s + b * c)
            for a, b in ((-half_len, -half_w), (half_len, -half_w), (half_len, half_w), (-half_len, half_w))]


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    # Every shape leaves room for a ring of radius 0.45 r at its centre (triangle and star inradius 0.5 r).
    up = -math.pi / 2
    if shape == "circle":
        d.ellipse([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=255)
    elif shape == "square":
        d.polygon(_bar(cx, cy, 0.75 * r, 0.75 * r, 0.0), fill=255)
    elif shape == "triangle":
        d.polygon(_ring(cx, cy, r, 3, up), fill=255)
    elif shape == "diamond":
        d.polygon(_ring(cx, cy, r, 4, up), fill=255)
    elif shape == "star":
        d.polygon(_ring(cx, cy, r, 5, up, (1.0, 0.5)), fill=255)
    elif shape == "cross":
        d.polygon(_bar(cx, cy, 0.85 * r, 0.38 * r, 0.0), fill=255)
        d.polygon(_bar(cx, cy, 0.85 * r, 0.38 * r, math.pi / 2), fill=255)
    else:  # hexagon
        d.polygon(_ring(cx, cy, 0.9 * r, 6, 0.0), fill=255)


def _draw_detail(d: ImageDraw.ImageDraw, detail: str, cx: float, cy: float, r: float) -> None:
    if detail == "dot":
        d.ellipse([cx - 0.28 * r, cy - 0.28 * r, cx + 0.28 * r, cy + 0.28 * r], fill=255)
    elif detail == "ring":
        d.ellipse([cx - 0.45 * r, cy - 0.45 * r, cx + 0.45 * r, cy + 0.45 * r], outline=255,
                  width=max(1, round(0.15 * r)))
    else:  # a bar across the whole object, clipped to it by the caller
        d.polygon(_bar(cx, cy, 2 * r, 0.12 * r, 0.0 if detail == "stripe" else math.pi / 4), fill=255)


def render(scene: Scene, size: int = 112) -> Image.Image:
    """The RGB image of `scene`, `size` x `size` pixels."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    for obj in scene.objects:
        px, py = POSITIONS[obj.position]
        cx, cy, r = (px + obj.dx) * big, (py + obj.dy) * big, RADIUS * obj.scale * big
        # Masks cover the object's bounding square only: full-image masks made rendering 5x slower.
        x0, y0 = math.floor(cx - r) - 1, math.floor(cy - r) - 1
        box = (x0, y0, math.ceil(cx + r) + 2, math.ceil(cy + r) + 2)
        side = (box[2] - x0, box[3] - y0)
        mask = Image.new("L", side, 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, cx - x0, cy - y0, r)
        img.paste(PALETTE[obj.colour], box, mask)
        if obj.detail is not None:
            mark = Image.new("L", side, 0)
            _draw_detail(ImageDraw.Draw(mark), obj.detail, cx - x0, cy - y0, r)
            ink = BACKGROUNDS["black"] if obj.colour in _LIGHT else BACKGROUNDS["white"]
            img.paste(ink, box, ImageChops.multiply(mark, mask))  # clipped: the mark never leaves its object
    return img.resize((size, size), Image.Resampling.BOX)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # Pillow writes no tIME/text chunks unless asked
    return buf.getvalue()
