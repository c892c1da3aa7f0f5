"""The synthetic dataset: determinism, disjoint splits, consistent M-BEIR files, and hard negatives that differ from
their target in exactly the intended attribute (the fine detail in a small region of the image only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrv.runtime.inputs.corpus import read_candidates, read_queries
from retrv.runtime.errors import InputError
from retrv.runtime.fsutil import sha256_file
from retrv.train.scene import RADIUS, Scene, SceneObject, render
from retrv.train.synth import (
    ATTRIBUTES,
    SPLITS,
    SynthConfig,
    describe,
    generate_dataset,
    main,
    read_scenes,
)

SIZES = {"n_train": 6, "n_val": 3, "n_test": 4}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_dataset(out, seed=3, **SIZES)
    return out


@pytest.fixture(scope="module")
def scenes(data) -> dict:
    return {s: read_scenes(data / f"scenes_{s}.jsonl") for s in SPLITS}


def _queries(data: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (data / f"queries_{split}.jsonl").read_text().splitlines()]


def _differences(a: Scene, b: Scene) -> list[str]:
    """The attributes in which `b` differs from `a`, one entry per differing (object, attribute)."""
    diffs = ["background"] if a.background != b.background else []
    if len(a.objects) != len(b.objects):
        return diffs + ["count"]
    by_pos_a, by_pos_b = ({o.position: o for o in s.objects} for s in (a, b))
    if by_pos_a.keys() == by_pos_b.keys():
        pairs = [(by_pos_a[p], by_pos_b[p]) for p in by_pos_a]
    else:  # an object moved: match objects by (colour, shape), unique within a scene
        by_id_b = {(o.colour, o.shape): o for o in b.objects}
        pairs = [(o, by_id_b.get((o.colour, o.shape))) for o in a.objects]
        if any(q is None for _, q in pairs):
            return diffs + ["unmatched"]
    for o, q in pairs:
        diffs += [attr for attr in ("shape", "colour", "position", "detail") if getattr(o, attr) != getattr(q, attr)]
    return diffs


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(data, tmp_path):
    generate_dataset(tmp_path / "again", seed=3, **SIZES)
    assert _files(data) == _files(tmp_path / "again")
    generate_dataset(tmp_path / "other", seed=4, **SIZES)
    assert _files(tmp_path / "other")["queries_test.jsonl"] != _files(data)["queries_test.jsonl"]


def test_test_split_does_not_depend_on_the_train_size(data, tmp_path):
    generate_dataset(tmp_path / "small", seed=3, n_train=1, n_val=SIZES["n_val"], n_test=SIZES["n_test"])
    a, b = _files(data), _files(tmp_path / "small")
    test_files = [k for k in a if "test" in k]
    assert len(test_files) > 4 and all(a[k] == b[k] for k in test_files)


def test_png_has_no_metadata_chunks(data):
    raw = (data / "images" / "test-c000000.png").read_bytes()
    for chunk in (b"tIME", b"tEXt", b"iTXt", b"zTXt"):
        assert chunk not in raw


def test_every_scene_is_distinct_and_splits_are_disjoint(scenes):
    keys = {s: [r.scene.key() for r in scenes[s].values()] for s in SPLITS}
    everything = [k for s in SPLITS for k in keys[s]]
    assert len(everything) == len(set(everything))  # no meaning twice, in or across splits
    for s in SPLITS:
        assert {r.split for r in scenes[s].values()} == {s}
        assert sum(r.role == "target" for r in scenes[s].values()) == SIZES[f"n_{s}"]


def test_files_load_and_qrels_agree_with_queries(data):
    manifest = json.loads((data / "dataset.json").read_text())
    for split in SPLITS:
        cands = read_candidates(data / f"corpus_{split}.jsonl")
        queries = read_queries(data / f"queries_{split}.jsonl")
        dids = {c.did for c in cands}
        assert all(c.modality == "image" and Path(c.img_path).is_file() for c in cands)
        assert len(cands) == SIZES[f"n_{split}"] * SynthConfig.pool_per_query
        assert len(queries) == 2 * SIZES[f"n_{split}"]
        assert sorted(q.task_id for q in queries) == sorted([0, 7] * SIZES[f"n_{split}"])
        pairs = set()
        for q in queries:
            assert len(q.pos_cand_list) == 1 and q.pos_cand_list[0] in dids
            assert set(q.neg_cand_list) <= dids and q.pos_cand_list[0] not in q.neg_cand_list
            assert q.extra["neg_types"] == list(SynthConfig.hard_negatives)
            if q.task_id == 7:
                assert q.query_modality == "image,text" and Path(q.query_img_path).is_file()
                assert q.query_img_path not in {c.img_path for c in cands}  # the reference is never a candidate
            else:
                assert q.query_modality == "text" and q.query_img_path is None
            pairs.add((q.qid, q.pos_cand_list[0]))
        qrels = [line.split() for line in (data / f"qrels_{split}.txt").read_text().splitlines()]
        assert all(len(r) == 4 and r[1] == "0" and r[3] == "1" for r in qrels)
        assert {(r[0], r[2]) for r in qrels} == pairs and len(qrels) == len(pairs)
        assert manifest["splits"][split]["n_queries"] == len(queries)


def test_no_test_candidate_is_a_train_target(scenes):
    train_targets = {r.scene.key() for r in scenes["train"].values() if r.role == "target"}
    assert not train_targets & {r.scene.key() for r in scenes["test"].values()}


def test_dataset_json_hashes_every_file(data):
    manifest = json.loads((data / "dataset.json").read_text())
    on_disk = {k for k in _files(data) if k != "dataset.json"}
    assert set(manifest["files"]) == on_disk
    assert all(sha256_file(data / k) == v for k, v in manifest["files"].items())
    assert manifest["config"]["seed"] == 3 and manifest["generator_version"] >= 1


def test_hard_negatives_differ_in_exactly_the_named_attribute(data, scenes):
    seen = set()
    for split in SPLITS:
        for q in _queries(data, split):
            target = scenes[split][q["pos_cand_list"][0]]
            assert target.role == "target"
            for did, attr in zip(q["neg_cand_list"], q["neg_types"]):
                neg = scenes[split][did]
                assert neg.role == "negative" and neg.attribute == attr and neg.group == target.id
                assert _differences(target.scene, neg.scene) == [attr]
                # Same rendering nuisances: the images differ only where the attribute does.
                assert sorted((o.dx, o.dy, o.scale) for o in neg.scene.objects) == sorted(
                    (o.dx, o.dy, o.scale) for o in target.scene.objects)
                seen.add(attr)
            if q["task_id"] == 7:
                ref = scenes[split][Path(q["query_img_path"]).stem]
                mod = q["modification"]
                assert ref.role == "reference" and _differences(ref.scene, target.scene) == [mod["attribute"]]
    assert seen == set(ATTRIBUTES)


def test_fine_detail_changes_a_small_region_only(data, scenes):
    size = SynthConfig.image_size
    checked = 0
    for q in _queries(data, "test"):
        if q["task_id"] != 0:
            continue
        pos = np.asarray(Image.open(data / "images" / f"{q['pos_cand_list'][0]}.png"), dtype=np.int16)
        for did, attr in zip(q["neg_cand_list"], q["neg_types"]):
            if attr != "detail":
                continue
            neg = np.asarray(Image.open(data / "images" / f"{did}.png"), dtype=np.int16)
            changed = np.abs(pos - neg).max(axis=-1)  # (H, W)
            frac = (changed > 0).mean()
            assert 0 < frac < 0.05, f"{did}: {frac:.3%} of pixels changed"
            assert (changed > 60).sum() >= 6  # plainly visible, not a faint antialiasing ripple
            ys, xs = np.nonzero(changed)
            # Inside one object: the changed box is no larger than the object's bounding square.
            assert max(np.ptp(ys), np.ptp(xs)) <= 2 * RADIUS * 1.05 * size + 2
            checked += 1
    assert checked == 2 * SIZES["n_test"]


def test_text_query_names_every_attribute_including_the_detail(data, scenes):
    nouns = {"dot": "dot", "stripe": "horizontal stripe", "ring": "ring", "slash": "diagonal stripe"}
    for q in _queries(data, "val"):
        if q["task_id"] != 0:
            continue
        scene, text = scenes["val"][q["pos_cand_list"][0]].scene, q["query_txt"].lower()
        assert scene.background in text
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in text
            if o.detail:
                assert nouns[o.detail] in text


def test_render_size_and_canonical_caption():
    scene = Scene("white", (SceneObject("star", "red", "right"), SceneObject("circle", "orange", "left", "ring")))
    assert [o.position for o in scene.objects] == ["left", "right"]  # canonical order
    assert render(scene, 224).size == (224, 224)
    assert describe(scene) == ("An orange circle with a ring on the left and a red star on the right "
                               "on a white background.")
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


@pytest.mark.parametrize("objects", [
    (),
    (SceneObject("star", "red", "left"), SceneObject("circle", "blue", "left")),
    (SceneObject("star", "red", "left"), SceneObject("star", "red", "top")),
    (SceneObject("star", "red", "left", "dot"), SceneObject("circle", "red", "top", "ring")),
])
def test_invalid_scenes_are_refused(objects):
    with pytest.raises(InputError):
        Scene("white", objects)


@pytest.mark.parametrize("kwargs", [
    {"image_size": 20}, {"pool_per_query": 3}, {"hard_negatives": ("texture",)}, {"n_train": -1},
    {"hard_negatives": ("detail",) * 4}, {"tasks": (3,)},
])
def test_bad_config_is_refused(kwargs, tmp_path):
    with pytest.raises(InputError):
        generate_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        generate_dataset(tmp_path, n_train=1, n_val=0, n_test=0)
    with pytest.raises(InputError, match="no dataset.json"):
        generate_dataset(tmp_path, n_train=1, n_val=0, n_test=0, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_cli_writes_a_dataset_and_overwrites_its_own(tmp_path, capsys):
    args = [str(tmp_path / "d"), "--seed", "1", "--n-train", "1", "--n-val", "0", "--n-test", "1",
            "--image-size", "64"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 2  # exists: refused without --overwrite
    assert main(args + ["--overwrite"]) == 0
    manifest = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert manifest["config"]["image_size"] == 64 and manifest["splits"]["val"]["n_queries"] == 0
    assert Image.open(tmp_path / "d" / "images" / "test-c000000.png").size == (64, 64)


def test_a_target_with_every_variant_taken_is_redrawn_not_fatal():
    """After a few hundred scenes some drawn targets have all their variants for a hard negative taken already;
    the generator drops such a target and draws another from the same stream (it used to raise)."""
    from retrv.runtime.errors import RetrvError
    from retrv.train import synth

    def draw(make):
        rng = synth._Rng("retrv.train.synth", synth.GENERATOR_VERSION, 0, "train")
        seen, failed, keys = set(), 0, []
        for _ in range(400):
            try:
                g = make(rng, seen, synth.SynthConfig(seed=0))
            except RetrvError:
                failed += 1
                continue
            keys += [g.target.key()] + [s.key() for _, s in g.negatives] + [s.key() for s in g.distractors]
        return failed, keys

    assert draw(synth._try_group)[0] > 0  # the case this test is about does occur in 400 groups
    failed, keys = draw(synth._group)
    assert failed == 0 and len(keys) == len(set(keys)) == 400 * 8


def test_max_objects_bounds_every_scene_and_bad_values_are_refused(tmp_path):
    generate_dataset(tmp_path / "one", seed=1, n_train=4, n_val=0, n_test=2, max_objects=1)
    for split in ("train", "test"):
        assert {len(r.scene.objects) for r in read_scenes(tmp_path / "one" / f"scenes_{split}.jsonl").values()} == {1}
    for bad in (0, 4, True):
        with pytest.raises(InputError, match="max_objects"):
            SynthConfig(max_objects=bad)
