"""A deterministic synthetic retrieval dataset on which reranking and details inspection can be shown to matter.

Why synthetic: the project trains a small Retrv-R1 reranker on a CPU and must show, on held-out data, that
(1) reranking beats the coarse embedding stage and (2) re-reading a candidate's full image tokens ("details
inspection") beats reasoning over its two compressed ICM tokens. Real data cannot be controlled like that. Here
every image is rendered from a `Scene` (the ground truth), and every hard negative differs from its target in
exactly one known attribute.

Design:

- An image is a plain background with 1-3 objects, each a shape (7), a colour (8) and a coarse position (left, top,
  centre, bottom, right). Exactly one object of every candidate carries a FINE DETAIL (a dot, a horizontal stripe,
  a ring or a diagonal stripe) a few pixels wide and clipped to the object. At the default 112x112 px (Qwen2.5-VL:
  8x8 patches of 14 px, 16 merged tokens of 28 px) an object spans about one merged token each way and a detail
  changes about 1% of the pixels: two scenes that differ only in it are near-identical globally and plainly
  different patch by patch. Every candidate carries a detail, so "has a mark" is never a cue.
- Each target has hard negatives, each differing in exactly one attribute (default: two with another detail, one
  each with another colour, position, shape), plus random distractors (`pool_per_query` images per target in all).
- Queries in M-BEIR fields: text->image (task 0, the caption names every object's shape, colour, position and the
  detail) and composed image+text->image (task 7: a reference image that differs from the target in one attribute
  and is never itself a candidate, plus a modification text such as "make the red circle blue"). `pos_cand_list` is
  the target, `neg_cand_list` its hard negatives; the extra field `neg_types` names each negative's attribute.
- Splits are disjoint by scene: every image in the dataset (candidate or reference) has a distinct meaning, and each
  split has its own candidate pool, `corpus_{split}.jsonl`, so no test candidate is a train target and test
  retrieval never sees a train image. The test split is drawn first from its own random stream: it depends on the
  seed and its own size only, never on n_train.
- Rendering nuisances (a small offset and scale per object) are shared by a target and its hard negatives, so they
  differ only where the attribute does, and redrawn for a composed query's reference, so it is never a pixel copy.

Determinism: all randomness goes through `random.Random.random()` (the one stream Python promises to keep across
versions) seeded from sha256(seed, split); PNGs carry no metadata. Same seed and config, same Pillow build => the
same bytes (`dataset.json` records the Pillow version and the sha256 of every file).

The vocabulary, the `Scene` ground truth and the renderer live in `retrv.train.scene`; this module samples scenes,
words them and writes the dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from retrv.runtime.errors import InputError, RetrvError
from retrv.runtime.fsutil import atomic_dir, atomic_write_json, sha256_file
from retrv.train.scene import (
    BACKGROUNDS,
    DETAILS,
    JITTER,
    MIN_SIZE,
    PALETTE,
    POSITIONS,
    SCALE,
    SHAPES,
    Scene,
    SceneObject,
    _png,
    render,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever the bytes written for a given seed and config change

ATTRIBUTES = ("detail", "colour", "position", "shape")
SPLITS = ("train", "val", "test")
ROLES = ("target", "negative", "distractor", "reference")
TASK_TEXT_TO_IMAGE, TASK_COMPOSED = 0, 7  # M-BEIR task ids: t->i and (i,t)->i

_MAX_TRIES = 200  # resampling attempts for a valid, unused scene; collisions are rare, exhaustion means a bad config


class _Rng:
    """Every draw goes through `random.Random.random()`, the one method whose stream Python keeps across versions."""

    def __init__(self, *parts) -> None:
        digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
        self._r = random.Random(int.from_bytes(digest[:8], "big"))

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def uniform(self, a: float, b: float) -> float:
        return round(a + (b - a) * self._r.random(), 4)  # rounded so the JSON is short and exact

    def shuffled(self, seq) -> list:
        pool, out = list(seq), []
        while pool:
            out.append(pool.pop(self.below(len(pool))))
        return out


# ---------------------------------------------------------------------------------------------------- language

def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_WHERE = {"left": ("on the left", "at the left"), "right": ("on the right", "at the right"),
          "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
          "centre": ("in the centre", "in the middle")}
_TO = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom",
       "centre": "to the centre"}
_DETAIL_NOUN = {"dot": "dot", "stripe": "horizontal stripe", "ring": "ring", "slash": "diagonal stripe"}
_MARK = ("with {n}", "marked with {n}", "with {small} inside")
_OBJECT = ("{a_c} {s}{d} {p}", "{a_c} {s} {p}{d}")
_SCENE = ("{Objs} on {a_bg} background.", "{A_bg} background with {objs}.",
          "{Objs}, against a plain {bg} background.", "A picture of {objs} on {a_bg} background.")


def _pick(rng: _Rng | None, options):
    return options[0] if rng is None else rng.choice(options)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene, rng: _Rng | None = None) -> str:
    """A caption naming every attribute of every object. Without `rng`: the canonical phrasing."""
    parts = []
    objs = list(scene.objects) if rng is None else rng.shuffled(scene.objects)
    for o in objs:
        mark = ""
        if o.detail is not None:
            noun = _DETAIL_NOUN[o.detail]
            mark = " " + _pick(rng, _MARK).format(n=_a(noun), small=_a("small " + noun))
        parts.append(_pick(rng, _OBJECT).format(a_c=_a(o.colour), s=o.shape, d=mark, p=_pick(rng, _WHERE[o.position])))
    objs_text = _join(parts)
    return _pick(rng, _SCENE).format(objs=objs_text, Objs=objs_text[0].upper() + objs_text[1:], bg=scene.background,
                                     a_bg=_a(scene.background), A_bg=_a(scene.background).capitalize())


def _modification(rng: _Rng, attribute: str, ref: SceneObject, tgt: SceneObject) -> str:
    """The text that turns object `ref` of the reference image into object `tgt` of the target."""
    the = f"the {ref.colour} {ref.shape}"
    if attribute == "colour":
        return rng.choice((f"make {the} {tgt.colour}", f"change {the} to {tgt.colour}",
                           f"{the.capitalize()} should be {tgt.colour}"))
    if attribute == "shape":
        return rng.choice((f"turn {the} into {_a(tgt.shape)}", f"make {the} {_a(tgt.shape)}",
                           f"replace {the} with {_a(tgt.colour)} {tgt.shape}"))
    if attribute == "position":
        return rng.choice((f"move {the} {_TO[tgt.position]}", f"shift {the} {_TO[tgt.position]}"))
    new = _a(_DETAIL_NOUN[tgt.detail])
    if ref.detail is None:
        return rng.choice((f"add {new} to {the}", f"put {new} inside {the}", f"mark {the} with {new}"))
    old = _DETAIL_NOUN[ref.detail]
    return rng.choice((f"replace the {old} on {the} with {new}", f"change the {old} on {the} to {new}"))


# ---------------------------------------------------------------------------------------------------- sampling

def _jitter(rng: _Rng, obj: SceneObject) -> SceneObject:
    return replace(obj, dx=rng.uniform(-JITTER, JITTER), dy=rng.uniform(-JITTER, JITTER), scale=rng.uniform(*SCALE))


def _random_scene(rng: _Rng, max_objects: int = 3) -> Scene | None:
    n = 1 + rng.below(max_objects)  # one draw whatever the maximum: the stream stays aligned
    positions = rng.shuffled(POSITIONS)[:n]
    objs = [_jitter(rng, SceneObject(rng.choice(SHAPES), rng.choice(tuple(PALETTE)), p)) for p in positions]
    k = rng.below(n)
    objs[k] = replace(objs[k], detail=rng.choice(DETAILS))
    try:
        return Scene(rng.choice(tuple(BACKGROUNDS)), tuple(objs))
    except InputError:  # two objects drew the same colour and shape
        return None


def _vary(rng: _Rng, scene: Scene, attribute: str, allow_none: bool = False):
    """`scene` with one object's `attribute` changed: (new scene, object before, object after), or None if invalid."""
    objs = list(scene.objects)
    i = scene.detail_index if attribute == "detail" else rng.below(len(objs))
    before = objs[i]
    if attribute == "detail":
        options = [d for d in DETAILS + ((None,) if allow_none else ()) if d != before.detail]
        after = replace(before, detail=rng.choice(options))
    elif attribute == "colour":
        after = replace(before, colour=rng.choice([c for c in PALETTE if c != before.colour]))
    elif attribute == "shape":
        after = replace(before, shape=rng.choice([s for s in SHAPES if s != before.shape]))
    else:
        after = replace(before, position=rng.choice([p for p in POSITIONS if p not in {o.position for o in objs}]))
    objs[i] = after
    try:
        return Scene(scene.background, tuple(objs)), before, after
    except InputError:
        return None


def _draw_unused(make, used) -> tuple:
    for _ in range(_MAX_TRIES):
        got = make()
        if got is not None and (got[0] if isinstance(got, tuple) else got).key() not in used:
            return got
    raise RetrvError(f"synth: no unused scene after {_MAX_TRIES} draws; the configuration leaves too few scenes")


@dataclass(frozen=True)
class _Group:
    target: Scene
    negatives: tuple[tuple[str, Scene], ...]  # (attribute, scene)
    distractors: tuple[Scene, ...]
    reference: tuple[str, Scene, str, SceneObject, SceneObject] | None  # attribute, scene, text, before, after


_GROUP_REDRAWS = 100  # targets given up before generation fails; a few per thousand scenes need one redraw


def _group(rng: _Rng, seen: set, cfg: SynthConfig) -> _Group:
    """A target, its hard negatives, distractors and (for task 7) a reference; every scene unused so far. A target
    whose variants for some hard negative are all taken by earlier scenes is dropped and another drawn from the same
    stream (`seen` only grows once a group is complete), so the output stays a function of the seed."""
    for _ in range(_GROUP_REDRAWS):
        try:
            return _try_group(rng, seen, cfg)
        except RetrvError:
            continue
    return _try_group(rng, seen, cfg)


def _try_group(rng: _Rng, seen: set, cfg: SynthConfig) -> _Group:
    taken: set = set()
    used = _Union(seen, taken)
    target = _draw_unused(lambda: _random_scene(rng, cfg.max_objects), used)
    taken.add(target.key())
    negatives = []
    for attribute in cfg.hard_negatives:
        scene = _draw_unused(lambda: _vary(rng, target, attribute), used)[0]
        negatives.append((attribute, scene))
        taken.add(scene.key())
    distractors = []
    for _ in range(cfg.pool_per_query - 1 - len(negatives)):
        distractors.append(_draw_unused(lambda: _random_scene(rng, cfg.max_objects), used))
        taken.add(distractors[-1].key())
    reference = None
    if TASK_COMPOSED in cfg.tasks:
        attribute = rng.choice(ATTRIBUTES)
        scene, tgt_obj, ref_obj = _draw_unused(lambda: _vary(rng, target, attribute, allow_none=True), used)
        scene = Scene(scene.background, tuple(_jitter(rng, o) for o in scene.objects))  # never a pixel copy
        reference = (attribute, scene, _modification(rng, attribute, ref_obj, tgt_obj), ref_obj, tgt_obj)
        taken.add(scene.key())
    seen |= taken
    return _Group(target, tuple(negatives), tuple(distractors), reference)


class _Union:
    def __init__(self, *sets) -> None:
        self.sets = sets

    def __contains__(self, key) -> bool:
        return any(key in s for s in self.sets)


# ---------------------------------------------------------------------------------------------------- config and I/O

@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    n_train: int = 200  # target scenes per split; each gives one query per task
    n_val: int = 25
    n_test: int = 25
    image_size: int = 112  # Qwen2.5-VL with min_pixels 112*112: 8x8 patches, 16 merged tokens
    pool_per_query: int = 8  # candidates per target: the target, its hard negatives, then random distractors
    hard_negatives: tuple[str, ...] = ("detail", "detail", "colour", "position", "shape")
    tasks: tuple[int, ...] = (TASK_TEXT_TO_IMAGE, TASK_COMPOSED)
    max_objects: int = 3  # objects per scene: 1 to this

    def __post_init__(self) -> None:
        object.__setattr__(self, "hard_negatives", tuple(self.hard_negatives))
        object.__setattr__(self, "tasks", tuple(int(t) for t in self.tasks))
        if not isinstance(self.seed, int):
            raise InputError(f"synth seed: got {self.seed!r}; expected an integer")
        for name in ("n_train", "n_val", "n_test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InputError(f"synth {name}: got {getattr(self, name)!r}; expected an integer >= 0")
        if isinstance(self.max_objects, bool) or self.max_objects not in (1, 2, 3):
            raise InputError(f"synth max_objects: got {self.max_objects!r}; expected 1, 2 or 3")
        if not MIN_SIZE <= self.image_size <= 1024:
            raise InputError(f"synth image_size: got {self.image_size}; expected {MIN_SIZE} to 1024 px")
        bad = [a for a in self.hard_negatives if a not in ATTRIBUTES]
        if bad:
            raise InputError(f"synth hard_negatives: got {bad}; expected attributes from {ATTRIBUTES}")
        # A target has 3 other details, >= 7 other colours, >= 6 other shapes, but only 2 free positions with 3 objects.
        limits = {"detail": len(DETAILS) - 1, "colour": 7, "shape": 6, "position": 2}
        over = {a: self.hard_negatives.count(a) for a in limits if self.hard_negatives.count(a) > limits[a]}
        if over:
            raise InputError(f"synth hard_negatives: got counts {over}; expected at most {limits} per attribute")
        if self.pool_per_query < 1 + len(self.hard_negatives):
            raise InputError(f"synth pool_per_query: got {self.pool_per_query}; expected >= "
                             f"{1 + len(self.hard_negatives)} (the target and {len(self.hard_negatives)} hard negatives)")
        if not self.tasks or set(self.tasks) - {TASK_TEXT_TO_IMAGE, TASK_COMPOSED}:
            raise InputError(f"synth tasks: got {self.tasks}; expected a non-empty subset of (0, 7)")

    def size(self, split: str) -> int:
        return getattr(self, f"n_{split}")

    def to_dict(self) -> dict:
        return {**asdict(self), "hard_negatives": list(self.hard_negatives), "tasks": list(self.tasks)}


@dataclass(frozen=True)
class SceneRecord:
    """One row of `scenes_{split}.jsonl`: the ground truth of one image."""

    id: str
    image: str  # relative to the dataset folder
    split: str
    role: str  # one of ROLES
    group: str  # the did of the target this image was drawn for
    attribute: str | None  # for a negative or reference: the attribute that differs from the target
    caption: str  # canonical phrasing
    scene: Scene


def read_scenes(path: str | Path) -> dict[str, SceneRecord]:
    """Read `scenes_{split}.jsonl` into {image id: record}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; expected a scenes_{{split}}.jsonl written by retrv.train.synth")
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                out[row["id"]] = SceneRecord(**{**row, "scene": Scene.from_dict(row["scene"])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"{path}:{n}: not a scene record ({e}); expected the fields of SceneRecord") from None
    return out


def _write_split(root: Path, split: str, groups: list[_Group], rng: _Rng, cfg: SynthConfig, files: dict) -> dict:
    records, candidates, queries, qrels = [], [], [], []

    def image(name: str, scene: Scene) -> str:
        rel = f"images/{name}.png"
        data = _png(render(scene, cfg.image_size))
        (root / rel).write_bytes(data)
        files[rel] = hashlib.sha256(data).hexdigest()
        return rel

    # One permutation over the whole split: a did's number says nothing about its group or its role.
    items = [(g, role, attr, scene) for g, grp in enumerate(groups)
             for role, attr, scene in ([("target", None, grp.target)] + [("negative", a, s) for a, s in grp.negatives]
                                       + [("distractor", None, s) for s in grp.distractors])]
    dids: dict[tuple[int, str, int], str] = {}
    target_did, neg_dids = {}, {g: [] for g in range(len(groups))}
    for n, (g, role, attr, scene) in enumerate(rng.shuffled(items)):
        did = f"{split}-c{n:06d}"
        candidates.append({"did": did, "txt": "", "img_path": image(did, scene), "modality": "image"})
        records.append((did, candidates[-1]["img_path"], role, g, attr, scene))
        if role == "target":
            target_did[g] = did
        elif role == "negative":
            neg_dids[g].append((groups[g].negatives.index((attr, scene)), did, attr))
    for g, grp in enumerate(groups):
        negs = [(did, attr) for _, did, attr in sorted(neg_dids[g])]
        common = {"pos_cand_list": [target_did[g]], "neg_cand_list": [d for d, _ in negs],
                  "neg_types": [a for _, a in negs]}
        if TASK_TEXT_TO_IMAGE in cfg.tasks:
            queries.append({"qid": f"{split}-q{len(queries):06d}", "query_txt": describe(grp.target, rng),
                            "query_img_path": None, "query_modality": "text", **common,
                            "task_id": TASK_TEXT_TO_IMAGE})
        if grp.reference is not None:
            attr, scene, text, before, after = grp.reference
            rid = f"{split}-r{g:06d}"
            records.append((rid, image(rid, scene), "reference", g, attr, scene))
            queries.append({"qid": f"{split}-q{len(queries):06d}", "query_txt": text,
                            "query_img_path": f"images/{rid}.png", "query_modality": "image,text", **common,
                            "task_id": TASK_COMPOSED, "modification": {
                                "attribute": attr, "from": getattr(before, attr), "to": getattr(after, attr)}})
    qrels = [f"{q['qid']} 0 {d} 1" for q in queries for d in q["pos_cand_list"]]
    rows = [{"id": i, "image": img, "split": split, "role": role, "group": target_did[g], "attribute": attr,
             "caption": describe(scene), "scene": scene.to_dict()} for i, img, role, g, attr, scene in records]
    names = {"corpus": f"corpus_{split}.jsonl", "queries": f"queries_{split}.jsonl", "qrels": f"qrels_{split}.txt",
             "scenes": f"scenes_{split}.jsonl"}
    for key, lines in (("corpus", candidates), ("queries", queries), ("scenes", rows)):
        (root / names[key]).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), "utf-8")
    (root / names["qrels"]).write_text("".join(line + "\n" for line in qrels), "utf-8")
    for name in names.values():
        files[name] = sha256_file(root / name)
    return {**names, "n_scenes": len(groups), "n_candidates": len(candidates), "n_queries": len(queries),
            "n_references": sum(g.reference is not None for g in groups)}


def generate_dataset(
    out_dir: str | Path,
    seed: int = SynthConfig.seed,
    n_train: int = SynthConfig.n_train,
    n_val: int = SynthConfig.n_val,
    n_test: int = SynthConfig.n_test,
    image_size: int = SynthConfig.image_size,
    pool_per_query: int = SynthConfig.pool_per_query,
    *,
    hard_negatives: tuple[str, ...] = SynthConfig.hard_negatives,
    tasks: tuple[int, ...] = SynthConfig.tasks,
    max_objects: int = SynthConfig.max_objects,
    overwrite: bool = False,
) -> dict:
    """Write the dataset to `out_dir` (atomically: a failure leaves no partial folder) and return `dataset.json`.

    Files: `images/*.png`; per split `corpus_{split}.jsonl`, `queries_{split}.jsonl`, `qrels_{split}.txt` (M-BEIR
    `qid 0 did 1`) and `scenes_{split}.jsonl` (ground truth of every image, see `read_scenes`); `dataset.json`.
    """
    cfg = SynthConfig(seed, n_train, n_val, n_test, image_size, pool_per_query, hard_negatives, tasks, max_objects)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise InputError(f"{out}: exists and is not empty; expected a new or empty folder (or overwrite=True)")
        if not (out / "dataset.json").is_file():
            raise InputError(f"{out}: has no dataset.json; refusing to replace a folder this generator did not write")
    t0 = time.perf_counter()
    files: dict[str, str] = {}
    splits = {}
    seen: set = set()
    with atomic_dir(out) as root:
        (root / "images").mkdir()
        for split in ("test", "val", "train"):  # test first: it must not depend on n_train or n_val
            rng = _Rng("retrv.train.synth", GENERATOR_VERSION, cfg.seed, split)
            groups = [_group(rng, seen, cfg) for _ in range(cfg.size(split))]
            splits[split] = _write_split(root, split, groups, rng, cfg, files)
            log.info("synth %s: %d scenes, %d images, %.1f s", split, len(groups),
                     splits[split]["n_candidates"] + splits[split]["n_references"], time.perf_counter() - t0)
        import PIL

        manifest = {
            "generator": "retrv.train.synth", "generator_version": GENERATOR_VERSION, "pillow": PIL.__version__,
            "config": cfg.to_dict(), "palette": {k: list(v) for k, v in PALETTE.items()},
            "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()}, "shapes": list(SHAPES),
            "positions": {k: list(v) for k, v in POSITIONS.items()}, "details": list(DETAILS),
            "splits": {s: splits[s] for s in SPLITS}, "files": files,
        }
        atomic_write_json(root / "dataset.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrv.train.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (new or empty; --overwrite replaces an earlier dataset)")
    ap.add_argument("--seed", type=int, default=SynthConfig.seed)
    for split in SPLITS:
        ap.add_argument(f"--n-{split}", type=int, default=SynthConfig().size(split), help=f"target scenes in {split}")
    ap.add_argument("--image-size", type=int, default=SynthConfig.image_size)
    ap.add_argument("--pool-per-query", type=int, default=SynthConfig.pool_per_query)
    ap.add_argument("--max-objects", type=int, default=SynthConfig.max_objects, help="objects per scene: 1 to this")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        m = generate_dataset(args.out, args.seed, args.n_train, args.n_val, args.n_test, args.image_size,
                             args.pool_per_query, max_objects=args.max_objects, overwrite=args.overwrite)
    except RetrvError as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 2
    n_images = sum(1 for f in m["files"] if f.startswith("images/"))
    print(f"wrote {args.out}: {n_images} images, "
          + ", ".join(f"{s} {m['splits'][s]['n_queries']} queries" for s in SPLITS)
          + f" in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
