"""runtime/index/store.py as a unit, with a fake encoder (no model): generations, integrity, refusal, refresh, cleanup."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from retrv.app.cli import main as cli
from retrv.runtime.errors import IndexFileError, InputError, RetrvError
from retrv.runtime.index.store import INDEX_JSON, Index

sys.path.insert(0, str(Path(__file__).parents[2] / "reliability"))
from index_worker import FakeEncoder, rows, vector  # noqa: E402


@pytest.fixture()
def ix(tmp_path) -> Path:
    Index.build(FakeEncoder(), rows("b", 0, 12), tmp_path / "ix")
    return tmp_path / "ix"


def _copy(ix: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(ix, dst, symlinks=True)
    return dst


def test_build_add_delete_make_generations_and_keep_labels(ix):
    index = Index.open(ix)
    assert index.generation == 1 and index.meta.count == 12
    assert index.add(rows("a", 0, 3), encoder=FakeEncoder()) == 2
    assert index.delete(["b0", "a1"]) == 3
    re = Index.open(ix)
    assert re.generation == 3 and re.meta.count == 13
    snap = re.snapshot()
    assert snap.live_dids() == {f"b{i}" for i in range(1, 12)} | {"a0", "a2"}
    # labels are positions: a deleted row keeps its place, an added row comes after
    assert [r["did"] for r in snap.rows][12:] == ["a0", "a1", "a2"] and snap.rows[0]["deleted"]
    labels, _ = snap.search(vector("a2")[None], 1)
    assert snap.row(labels[0, 0])["did"] == "a2"
    assert snap.cache.tokens(12).shape == (4, 8)  # a0 has an image: its 4 cached tokens are in the appended cache
    assert sorted(p.name for p in ix.iterdir() if p.name.startswith("g")) == ["g000002", "g000003"]


def test_add_and_delete_are_all_or_nothing(ix):
    index = Index.open(ix)
    with pytest.raises(InputError, match="'b3' is already in the index"):
        index.add(rows("a", 0, 2) + rows("b", 3, 1), encoder=FakeEncoder())
    with pytest.raises(InputError, match="'nope' is not in the index"):
        index.delete(["b0", "nope"])
    with pytest.raises(InputError, match="duplicate did 'a0'"):
        index.add(rows("a", 0, 1) * 2, encoder=FakeEncoder())
    with pytest.raises(InputError, match="expected a list of did strings"):
        index.delete("b0")
    assert Index.open(ix).generation == 1 and Index.open(ix).snapshot().live_dids() == {f"b{i}" for i in range(12)}


def test_a_deleted_did_can_be_added_again(ix):
    index = Index.open(ix)
    index.delete(["b4"])
    index.add([{"did": "b4", "txt": "back"}], encoder=FakeEncoder())
    snap = Index.open(ix).snapshot()
    assert "b4" in snap.live_dids() and [r["did"] for r in snap.rows].count("b4") == 2
    assert snap.row(snap.label("b4"))["txt"] == "back"


def test_another_objects_commit_is_picked_up(ix):
    reader, writer = Index.open(ix), Index.open(ix)
    writer.add(rows("a", 0, 2), encoder=FakeEncoder())
    assert "a1" in reader.snapshot().live_dids()  # auto refresh on the next search/snapshot
    frozen = Index.open(ix, auto_refresh=False)
    writer.delete(["a1"])
    assert "a1" in frozen.snapshot().live_dids()
    assert frozen.refresh() is True and "a1" not in frozen.snapshot().live_dids()
    assert frozen.refresh() is False


@pytest.mark.parametrize("victim, how", [
    ("g000001/candidates.jsonl", "edit-id"), ("g000001/candidates.jsonl", "swap-rows"),
    ("g000001/candidates.jsonl", "duplicate-row"), ("g000001/cache.json", "flip"), ("g000001/ann/ann.json", "flip"),
    ("g000001/ann/hnsw.bin", "truncate"), ("cache/tokens.i8", "flip"), ("cache/t_con.f16", "truncate"),
    (INDEX_JSON, "flip"), (INDEX_JSON, "truncate"),
])
def test_any_modified_file_is_refused(ix, tmp_path, victim, how):
    bad = _copy(ix, tmp_path, "bad")
    p = bad / victim
    data = p.read_bytes()
    if how == "edit-id":
        data = data.replace(b'"b1"', b'"b9"', 1)
    elif how == "swap-rows":
        lines = data.splitlines(keepends=True)
        data = b"".join([lines[1], lines[0], *lines[2:]])
    elif how == "duplicate-row":
        lines = data.splitlines(keepends=True)
        data = b"".join([lines[0], lines[0], *lines[2:]])
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        b = bytearray(data)
        b[len(b) // 3] ^= 0x01
        data = bytes(b)
    p.write_bytes(data)
    with pytest.raises(RetrvError) as e:
        Index.open(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


@pytest.mark.parametrize("victim", ["g000001/candidates.jsonl", "cache/tokens.i8", "cache", "g000001"])
def test_symlinks_inside_the_index_are_refused(ix, tmp_path, victim):
    bad = _copy(ix, tmp_path, "bad")
    outside = tmp_path / "outside"
    (shutil.copytree if (bad / victim).is_dir() else shutil.copy2)(bad / victim, outside)
    (shutil.rmtree if (bad / victim).is_dir() else os.unlink)(bad / victim)
    os.symlink(outside, bad / victim)
    with pytest.raises(IndexFileError, match="symlink"):
        Index.open(bad)


def test_older_and_newer_formats_are_refused_with_what_to_do(ix, tmp_path):
    for version, hint in ((1, "rebuild it"), (99, "upgrade retrv-edge")):
        bad = _copy(ix, tmp_path, f"v{version}")
        d = json.loads((bad / INDEX_JSON).read_text())
        (bad / INDEX_JSON).write_text(json.dumps({**d, "format_version": version}))
        with pytest.raises(IndexFileError, match=hint):
            Index.open(bad)


def test_the_next_write_removes_what_a_killed_writer_left(ix):
    (ix / "g000007").mkdir()  # an uncommitted generation
    (ix / "g000007" / "candidates.jsonl").write_text("{}")
    (ix / f".{INDEX_JSON}.abcdef.tmp").write_text("{")  # an index.json that was never renamed
    with open(ix / "cache" / "tokens.i8", "ab") as f:  # token-cache bytes past the committed prefix
        f.write(b"\x01" * 100)
    index = Index.open(ix)  # leftovers do not stop a reader
    index.add(rows("a", 0, 1), encoder=FakeEncoder())
    assert not (ix / "g000007").exists() and not (ix / f".{INDEX_JSON}.abcdef.tmp").exists()
    re = Index.open(ix)
    assert re.snapshot().live_dids() == {f"b{i}" for i in range(12)} | {"a0"}
    assert os.path.getsize(ix / "cache" / "tokens.i8") == re.cache.files["tokens.i8"]["bytes"]


def test_a_reader_keeps_its_generation_when_the_next_one_is_broken(ix):
    reader = Index.open(ix)
    Index.open(ix).add(rows("a", 0, 1), encoder=FakeEncoder())
    p = ix / "g000002" / "candidates.jsonl"
    p.write_bytes(p.read_bytes().replace(b'"a0"', b'"z0"'))
    assert reader.snapshot().generation == 1  # searches go on with the last good generation
    with pytest.raises(IndexFileError, match="sha256"):
        reader.refresh()  # an explicit refresh says why


def test_search_result_rows_come_from_the_snapshot_searched(ix):
    index = Index.open(ix)
    snap = index.snapshot()
    index.delete([f"b{i}" for i in range(12) if i != 5])
    labels, _ = snap.search(np.stack([vector(f"b{i}") for i in range(12)]), 3)
    assert labels.shape == (12, 3)  # the old snapshot still answers from its own generation
    assert index.snapshot().live_dids() == {"b5"}


def test_info_and_cli(ix, capsys):
    info = Index.open(ix).info()
    assert (info["generation"], info["count"], info["deleted"], info["dim"]) == (1, 12, 0, 16)
    assert cli(["index", "delete", str(ix), "--ids", "b1", "b2"]) == 0
    assert "generation 2, 10 live" in capsys.readouterr().out
    assert cli(["index", "info", str(ix), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["generation"], out["count"], out["deleted"]) == (2, 10, 2)
    assert cli(["index", "delete", str(ix), "--ids", "b1"]) == 2
    assert "'b1' is not in the index" in capsys.readouterr().err
    assert cli(["index", "info", str(ix / "nope")]) == 2
    assert "index directory not found" in capsys.readouterr().err


def test_rows_given_in_python_resolve_images_against_the_current_directory(ix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Index.open(ix).add([{"did": "p0", "img_path": "pics/p0.png"}], encoder=FakeEncoder())
    row = Index.open(ix).snapshot().rows[-1]
    assert row["img_path"] == str(tmp_path / "pics" / "p0.png")


def test_a_refused_update_leaves_no_generation_behind(ix):
    with pytest.raises(InputError):
        Index.open(ix).delete(["nope"])
    with pytest.raises(InputError):
        Index.open(ix).add(rows("b", 0, 1), encoder=FakeEncoder())
    assert sorted(p.name for p in ix.iterdir() if p.name.startswith("g")) == ["g000001"]


def test_an_open_overtaken_by_a_commit_starts_over_whatever_failed(ix, monkeypatch):
    """A reader opening generation N while writers commit and delete N sees a file vanish: the token cache's
    description (CacheFileError), the graph (OSError) ... It reads the new head and starts over."""
    from retrv.runtime.errors import CacheFileError
    from retrv.runtime.index import store

    real_open, calls = store.TokenCache.open, []

    def racing_open(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # a writer commits right now, then the file this reader wanted is gone
            monkeypatch.setattr(store.TokenCache, "open", real_open)
            Index.open(ix).add(rows("a", 0, 1), encoder=FakeEncoder())
            monkeypatch.setattr(store.TokenCache, "open", racing_open)
            raise CacheFileError("g000001/cache.json: file not found")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(store.TokenCache, "open", racing_open)
    index = Index.open(ix)
    assert index.generation == 2 and "a0" in index.snapshot().live_dids() and len(calls) >= 2
    # and the same failure without a commit in between is reported, not retried forever
    monkeypatch.setattr(store.TokenCache, "open", lambda *a, **k: (_ for _ in ()).throw(CacheFileError("broken")))
    with pytest.raises(CacheFileError, match="broken"):
        Index.open(ix)


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (seed, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_inline_images_are_stored_listed_verified_and_moved_with_the_folder(ix, tmp_path):
    index = Index.open(ix)
    index.add([{"did": "p0", "txt": "x"}, {"did": "p1"}], encoder=FakeEncoder(), images={"p1": _png(1)})
    (name,) = json.loads((ix / INDEX_JSON).read_text())["images"]
    assert (ix / name).read_bytes() == _png(1) and name.endswith(".png")
    moved = tmp_path / "moved"
    os.rename(ix, moved)  # the row is relative to the folder: it follows it
    re = Index.open(moved)
    assert re.row(re.snapshot().label("p1"))["img_path"] == str(moved / name)
    (moved / name).write_bytes(_png(2))  # an altered image is refused like any other file
    with pytest.raises(IndexFileError, match="modified file"):
        Index.open(moved)
    (moved / name).unlink()
    with pytest.raises(IndexFileError, match=name.split("/")[1]):
        Index.open(moved, verify="size")


def test_inline_images_refused_with_what_was_expected(ix):
    index = Index.open(ix)
    with pytest.raises(InputError, match=r"images\['p0'\]: starts with b'GIF89a"):
        index.add([{"did": "p0"}], encoder=FakeEncoder(), images={"p0": b"GIF89a" + b"\0" * 20})
    with pytest.raises(InputError, match="did 'zz' is not among the rows"):
        index.add([{"did": "p0", "txt": "x"}], encoder=FakeEncoder(), images={"zz": _png(1)})
    with pytest.raises(InputError, match="img_path .* and inline image bytes"):
        index.add([{"did": "p0", "img_path": "/x.png"}], encoder=FakeEncoder(), images={"p0": _png(1)})
    assert not (ix / "images").exists()


def test_a_killed_adds_image_is_removed_by_the_next_write(ix, monkeypatch):
    import retrv.runtime.index.store as store

    index = Index.open(ix)

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies between writing the generation and committing it

    monkeypatch.setattr(store, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        index.add([{"did": "p0"}], encoder=FakeEncoder(), images={"p0": _png(3)})
    monkeypatch.undo()
    (leftover,) = os.listdir(ix / "images")
    assert "images" not in json.loads((ix / INDEX_JSON).read_text())  # never committed: nothing points at it
    index.add([{"did": "p1"}], encoder=FakeEncoder(), images={"p1": _png(4)})
    assert leftover not in os.listdir(ix / "images") and len(os.listdir(ix / "images")) == 1
    index.delete(["p1"])
    index.delete(["b0"])  # two writes later no generation a reader may hold uses it: gone
    assert os.listdir(ix / "images") == []
    assert Index.open(ix).info()["count"] == 11


def test_an_image_two_rows_share_stays_while_either_uses_it(ix):
    index = Index.open(ix)
    index.add([{"did": "p0"}, {"did": "p1"}], encoder=FakeEncoder(), images={"p0": _png(5), "p1": _png(5)})
    (name,) = json.loads((ix / INDEX_JSON).read_text())["images"]  # one file for the same bytes
    index.delete(["p0"])
    index.delete(["b0"])
    index.delete(["b1"])
    assert (ix / name).is_file() and json.loads((ix / INDEX_JSON).read_text())["images"] == {
        name: {"bytes": len(_png(5)), "sha256": name.split("/")[1].split(".")[0]}}
    assert Index.open(ix).snapshot().live_dids() >= {"p1"}
