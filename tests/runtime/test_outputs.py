"""Output paths: nothing the user had is replaced by mistake (runtime.outputs), and a directory write killed at
any moment leaves the old or the new directory (runtime.fsutil.atomic_dir)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retrv.runtime import fsutil
from retrv.runtime.errors import InputError
from retrv.runtime.fsutil import atomic_dir, clean_leftovers
from retrv.runtime.outputs import check_output, folder_kind


def make_pack(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"format_version": 1, "files": {}}))
    (d / "decoder.onnx").write_bytes(b"graph")
    return d


def make_index(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "index.json").write_text("{}")
    (d / "candidates.jsonl").write_text("")
    return d


def make_checkpoint(d: Path, sharded: bool = False) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / ("model.safetensors.index.json" if sharded else "model.safetensors")).write_bytes(b"w")
    return d


def make_docs(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "thesis.txt").write_text("years of work")
    return d


def tree_hash(root: Path) -> str:
    """Every path under `root`, its kind and its bytes: equal before and after means nothing was touched."""
    h = hashlib.sha256()
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes() if p.is_file() else b"<dir>")
    return h.hexdigest()


# -- folder_kind ---------------------------------------------------------------------------------------------------
def test_folder_kind_names_each_kind_from_file_names(tmp_path):
    assert folder_kind(make_pack(tmp_path / "p")) == "pack"
    assert folder_kind(make_index(tmp_path / "i")) == "index"
    assert folder_kind(make_checkpoint(tmp_path / "c")) == "checkpoint"
    assert folder_kind(make_checkpoint(tmp_path / "s", sharded=True)) == "checkpoint"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "cache.json").write_text("{}")
    assert folder_kind(tmp_path / "t") == "token-cache"
    assert folder_kind(make_docs(tmp_path / "d")) is None
    assert folder_kind(tmp_path / "missing") is None
    assert folder_kind(tmp_path / "d" / "thesis.txt") is None
    # a manifest.json that is not a pack's (a web project's, say) does not make a folder a pack
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "manifest.json").write_text('{"name": "my app"}')
    assert folder_kind(tmp_path / "web") is None
    # config.json alone is not a checkpoint
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    assert folder_kind(tmp_path / "cfg") is None


# -- check_output: refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", ["", "   ", None])
def test_empty_output_path_is_refused(out):
    with pytest.raises(InputError, match=r"^pack '.*': empty path; expected a new or existing pack directory$"):
        check_output(out, "pack")


def test_output_that_is_an_input_is_refused_however_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "ckpt")
    os.symlink("ckpt", tmp_path / "link")
    inputs = {"the checkpoint being exported": "ckpt"}
    for spelling in ("ckpt", "./ckpt/", str(tmp_path / "ckpt"), "link", "sub/../ckpt"):
        with pytest.raises(InputError, match=r"is the checkpoint being exported; expected a new or existing pack"):
            check_output(spelling, "pack", inputs)
    # and the other way round: the input given through the link
    with pytest.raises(InputError, match="is the checkpoint being exported"):
        check_output("ckpt", "pack", {"the checkpoint being exported": "link"})


def test_output_inside_or_containing_an_input_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "models" / "ckpt")
    with pytest.raises(InputError, match=r"'.*ckpt/pack': is inside the checkpoint being exported \('.*ckpt'\)"):
        check_output(ckpt / "pack", "pack", {"the checkpoint being exported": ckpt})
    with pytest.raises(InputError, match=r"'.*models': contains the checkpoint being exported"):
        check_output(tmp_path / "models", "pack", {"the checkpoint being exported": ckpt})
    corpus = tmp_path / "data" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("")
    with pytest.raises(InputError, match="contains the corpus"):
        check_output(tmp_path / "data", "index", {"the corpus": corpus})


def test_output_that_is_a_file_or_a_link_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"^pack '.*notes.txt': exists and is a file; expected a new or existing"):
        check_output(tmp_path / "notes.txt", "pack")
    make_pack(tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    with pytest.raises(InputError, match=r"'.*alias': is a symbolic link \(to '.*real'\)"):
        check_output(tmp_path / "alias", "pack")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(InputError, match="is a symbolic link"):
        check_output(tmp_path / "dangling", "pack")


@pytest.mark.parametrize("kind, make, found", [
    ("pack", make_index, "index"),
    ("pack", make_checkpoint, "checkpoint"),
    ("index", make_pack, "pack"),
    ("checkpoint", make_pack, "pack"),
])
def test_folder_of_another_kind_is_refused(tmp_path, kind, make, found):
    target = make(tmp_path / "target")
    article = "an" if found == "index" else "a"
    with pytest.raises(InputError, match=rf"^{kind} '.*target': is {article} {found} directory; expected a new or "
                                         rf"existing {kind} directory"):
        check_output(target, kind)


def test_non_empty_folder_of_no_known_kind_is_refused(tmp_path):
    docs = make_docs(tmp_path / "Documents")
    with pytest.raises(InputError, match=r"'.*Documents': is a non-empty folder that is not a pack; expected a new "
                                         r"or existing pack directory \(move it away first"):
        check_output(docs, "pack")
    with pytest.raises(InputError, match="names no folder of its own"):
        check_output(".", "pack")


def test_parent_that_is_a_file_or_not_writable_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"'.*file/a/pack': cannot be created: '.*file' is not a directory"):
        check_output(tmp_path / "file" / "a" / "pack", "pack")
    real_access = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    # root passes every permission check, so the refusal is shown through what os.access answers
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    with pytest.raises(InputError, match=r"'.*ro/pack': '.*ro' is not writable, so the pack cannot be written in"):
        check_output(ro / "pack", "pack")
    with pytest.raises(InputError, match=r"'.*ro/a/b/pack': '.*ro' is not writable, so the pack cannot be created"):
        check_output(ro / "a" / "b" / "pack", "pack")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(InputError, match="is not writable"):
            check_output(ro / "pack", "pack")
    finally:
        ro.chmod(0o700)


# -- check_output: allowed -----------------------------------------------------------------------------------------
def test_new_empty_and_same_kind_outputs_are_allowed(tmp_path):
    assert check_output(tmp_path / "a" / "b" / "new", "pack") == tmp_path / "a" / "b" / "new"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "pack")
    check_output(make_index(tmp_path / "idx"), "index", {"the pack": make_pack(tmp_path / "src")})
    check_output(make_checkpoint(tmp_path / "ck"), "checkpoint")
    # a pack over a pack: allowed, and atomic_dir then replaces it as a whole
    old = make_pack(tmp_path / "pack")
    check_output(old, "pack", {"the checkpoint being exported": tmp_path / "ck"})
    with atomic_dir(old) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"format_version": 1, "files": {"x": 1}}))
    assert sorted(p.name for p in old.iterdir()) == ["manifest.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- atomic_dir: killed writes -------------------------------------------------------------------------------------
KILLED_WRITE = """
import os, signal, sys
from retrv.runtime import fsutil
final, where = sys.argv[1], sys.argv[2]
if where == "gap":  # the two-rename fallback, killed between its renames
    fsutil._renameat2 = False
    real_rename = os.rename
    def rename(a, b):
        real_rename(a, b)
        if str(b).endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
else:  # killed just after the exchange, before the old directory is deleted
    real_exchange = fsutil.exchange
    def exchange(a, b):
        assert real_exchange(a, b)
        os.kill(os.getpid(), signal.SIGKILL)
    fsutil.exchange = exchange
with fsutil.atomic_dir(final) as tmp:
    (tmp / "version").write_text("new")
"""


def killed_write(final: Path, where: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITE), str(final), where])
    assert proc.returncode == -9


def versioned(d: Path, version: str) -> Path:
    with atomic_dir(d) as tmp:
        (tmp / "version").write_text(version)
    return d


@pytest.mark.skipif(not fsutil._load_renameat2(), reason="no renameat2 in this libc")
def test_kill_right_after_the_exchange_leaves_the_new_directory_and_the_next_write_cleans_up(tmp_path):
    final = versioned(tmp_path / "pack", "old")
    killed_write(final, "exchange")
    assert (final / "version").read_text() == "new"  # no moment without a directory at `final`
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".pack.")]
    assert len(left) == 1 and left[0].name.endswith(".tmpdir") and (left[0] / "version").read_text() == "old"
    versioned(final, "newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


@pytest.mark.skipif(os.name != "posix", reason="recovery needs flock")
def test_kill_between_the_fallback_renames_is_repaired_by_the_next_write(tmp_path):
    final = versioned(tmp_path / "pack", "old")
    killed_write(final, "gap")
    assert not final.exists()
    olds = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(olds) == 1 and (olds[0] / "version").read_text() == "old"
    clean_leftovers(final)  # what every write of `final` does first
    assert (final / "version").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_fallback_without_exchange_still_replaces(tmp_path, monkeypatch):
    final = versioned(tmp_path / "pack", "old")
    monkeypatch.setattr(fsutil, "_renameat2", False)
    versioned(final, "new")
    assert (final / "version").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


@pytest.mark.skipif(os.name != "posix", reason="cleaning needs flock")
def test_a_live_writers_temporary_is_never_cleaned_and_other_names_are_left_alone(tmp_path):
    final = versioned(tmp_path / "pack", "v1")
    dead = tmp_path / ".pack.0123456789ab.tmpdir"
    dead.mkdir()
    unrelated = [tmp_path / ".pack.0123456789ab.tmpdir.bak", tmp_path / ".packs.0123456789ab.tmpdir",
                 tmp_path / ".pack.xyz.tmpdir", tmp_path / ".other.0123456789ab.old"]
    for p in unrelated:
        p.mkdir()
    with atomic_dir(final) as tmp:  # a live writer: its temporary is locked while the block runs
        assert not dead.exists()  # the dead writer's temporary went when this write started
        clean_leftovers(final)  # a second writer starting now
        assert tmp.is_dir()
        (tmp / "version").write_text("v2")
    assert (final / "version").read_text() == "v2"
    assert all(p.is_dir() for p in unrelated)


# -- the CLI: refused, one line, the target untouched --------------------------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from retrv.app.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("case, fragment", [
    ("ckpt", "is the checkpoint being exported"),
    ("index", "is an index directory"),
    ("docs", "is a non-empty folder that is not a pack"),
    ("file", "exists and is a file"),
    ("empty", "empty path"),
])
def test_export_onto_something_else_is_refused_and_leaves_it_untouched(tmp_path, ckpt, capsys, case, fragment):
    target = {"ckpt": ckpt, "index": make_index(tmp_path / "idx"), "docs": make_docs(tmp_path / "docs"),
              "file": tmp_path / "notes.txt", "empty": None}[case]
    if case == "file":
        target.write_text("keep me")
    before = tree_hash(target) if target else None
    code, err = run_cli(["export", str(ckpt), str(target) if target else ""], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("retrv export: error: pack ")
    assert fragment in err
    if target:
        assert tree_hash(target) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_index_build_onto_a_pack_is_refused_and_leaves_it_untouched(tmp_path, capsys):
    src, other = make_pack(tmp_path / "pack"), make_pack(tmp_path / "other-pack")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("")
    before = tree_hash(other)
    code, err = run_cli(["index", "build", str(src), str(corpus), str(other)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "index '" in err and "is a pack directory; expected a new or existing index directory" in err
    assert tree_hash(other) == before
    code, err = run_cli(["index", "build", str(src), str(corpus), str(src)], capsys)
    assert code == 2 and "is the pack;" in err


def test_quantize_onto_its_source_is_refused(tmp_path, capsys):
    src = make_pack(tmp_path / "pack")
    before = tree_hash(src)
    code, err = run_cli(["quantize", str(src), str(src) + "/", "--mode", "int8-dynamic"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is the pack being quantized" in err
    assert tree_hash(src) == before


def test_tiny_checkpoint_writer_refuses_a_folder_of_documents(tmp_path, capsys):
    from retrv.model.tiny import main

    docs = make_docs(tmp_path / "docs")
    before = tree_hash(docs)
    assert main([str(docs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a non-empty folder that is not a checkpoint" in err
    assert tree_hash(docs) == before


def test_training_refuses_an_output_holding_its_work_folder_before_training(tmp_path, capsys):
    from retrv.train.run import main

    docs = make_docs(tmp_path / "docs")
    with pytest.raises(SystemExit) as e:
        main([str(docs), "--skip-eval"])
    assert e.value.code == 2 and "is a non-empty folder that is not a checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), "--work", str(tmp_path / "run" / "work"), "--skip-eval"])
    assert "contains the --work folder" in capsys.readouterr().err
