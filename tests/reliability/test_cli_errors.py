"""Hostile inputs through `retrv` in process: each gives exactly one line on stderr naming the bad value or field,
a non-zero exit, and never a traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from retrv.model.tiny import write_tiny_checkpoint
from retrv.app import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_ckpt, tiny_pack, tiny_corpus, tiny_index):
    """The shared tiny checkpoint, its pack, corpus and index (tests/conftest.py), and a second checkpoint of the
    same architecture."""
    root = tmp_path_factory.mktemp("cli-errors")
    other = write_tiny_checkpoint(root / "other", icm=True, seed=6)  # same config, other weights
    return {"root": tiny_corpus, "ckpt": tiny_ckpt, "pack": tiny_pack, "other": other, "index": tiny_index}


def one_line(capsys, code: int, *fragments: str) -> str:
    """The error line, checked: exit code non-zero, one line (argparse's usage lines aside), no traceback."""
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run(argv: list[str]) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        return e.code


# --- checkpoint files (retrv export reads them before any heavy work) ---------------------------------------------

def _config(ckpt: Path, edit) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _set(key, value, section=None):
    def edit(cfg):
        (cfg[section] if section else cfg)[key] = value
    return edit


def _write(name: str, data: bytes):
    return lambda ckpt: (ckpt / name).write_bytes(data)


def _link(name: str, target):
    def make(ckpt: Path):
        dest = target(ckpt) if callable(target) else target
        (ckpt / name).unlink()
        os.symlink(dest, ckpt / name)
    return make


def _outside_copy(ckpt: Path) -> Path:
    outside = ckpt.parent / f"{ckpt.name}-outside.json"
    shutil.copyfile(ckpt / "tokenizer.json", outside)
    return outside


CHECKPOINT_CASES = {
    "hidden_size as a string": (lambda c: _config(c, _set("hidden_size", "64")), ["hidden_size", "'64'", "str"]),
    "layers as a bool": (lambda c: _config(c, _set("num_hidden_layers", True)), ["num_hidden_layers", "True"]),
    "vision_config null": (lambda c: _config(c, _set("vision_config", None)), ["vision_config", "None"]),
    "vision heads a float": (lambda c: _config(c, _set("num_heads", 2.0, "vision_config")), ["num_heads", "2.0"]),
    "rms_norm_eps negative": (lambda c: _config(c, _set("rms_norm_eps", -1)), ["rms_norm_eps", "-1"]),
    "rope_scaling a string": (lambda c: _config(c, _set("rope_scaling", "mrope")), ["rope_scaling", "'mrope'"]),
    "eos id a string": (lambda c: _config(c, _set("eos_token_id", "2")), ["eos_token_id", "'2'"]),
    "heads not dividing hidden": (lambda c: _config(c, _set("num_attention_heads", 5)), ["hidden_size", "5"]),
    "hidden_size zero": (lambda c: _config(c, _set("hidden_size", 0)), ["hidden_size", "got 0"]),
    "config.json not UTF-8": (_write("config.json", b'{"model_type": "\xff\xfe"}'), ["config.json", "UTF-8"]),
    "config.json a list": (_write("config.json", b"[1, 2]"), ["config.json", "list"]),
    "config.json deeply nested": (_write("config.json", b"[" * 100_000), ["config.json", "not valid JSON"]),
    "retrv_config icm heads a string": (_write("retrv_config.json", b'{"icm": {"num_heads": "4"}}'),
                                        ["icm.num_heads", "'4'"]),
    "retrv_config icm unknown field": (_write("retrv_config.json", b'{"icm": {"heads": 4}}'), ["icm", "heads"]),
    "generation_config eos a dict": (_write("generation_config.json", b'{"eos_token_id": {"a": 1}}'),
                                     ["generation_config.json", "eos_token_id"]),
    "preprocessor resample a list": (_write("preprocessor_config.json", b'{"resample": [3]}'), ["resample", "[3]"]),
    "preprocessor mean a string": (_write("preprocessor_config.json", b'{"image_mean": "123"}'),
                                   ["image_mean", "'123'"]),
    "preprocessor not UTF-8": (_write("preprocessor_config.json", b"\xff"), ["preprocessor_config.json", "UTF-8"]),
    "tokenizer.json -> /etc/passwd": (_link("tokenizer.json", "/etc/passwd"), ["tokenizer.json", "outside"]),
    "tokenizer.json -> a file outside": (_link("tokenizer.json", _outside_copy), ["tokenizer.json", "outside"]),
    "config.json -> /etc/hostname": (_link("config.json", "/etc/hostname"), ["config.json", "outside"]),
    "shard index names ../": (_write("model.safetensors.index.json", b'{"weight_map": {"w": "../x.safetensors"}}'),
                              ["model.safetensors.index.json", "../x.safetensors"]),
    "shard index weight_map a list": (_write("model.safetensors.index.json", b'{"weight_map": []}'),
                                      ["weight_map", "list"]),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint_is_one_line(world, tmp_path, capsys, case):
    make, fragments = CHECKPOINT_CASES[case]
    ckpt = shutil.copytree(world["ckpt"], tmp_path / "ckpt")
    make(ckpt)
    code = run(["export", ckpt, tmp_path / "pack"])
    one_line(capsys, code, "retrv export: error:", *fragments)
    assert code == 2 and not (tmp_path / "pack").exists()


def test_shard_symlinked_outside_is_refused_on_load(world, tmp_path):
    from retrv.model.loading import load_checkpoint
    from retrv.runtime.errors import CheckpointError

    ckpt = shutil.copytree(world["ckpt"], tmp_path / "ckpt")
    shutil.move(ckpt / "model.safetensors", tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: resolves to .* outside the checkpoint"):
        load_checkpoint(ckpt)


def test_hugging_face_cache_layout_is_accepted(world, tmp_path):
    """snapshot_download's cache links every file to ../../blobs/SHA: outside the snapshot, but allowed."""
    from retrv.model.config import read_config
    from retrv.model.files import checkpoint_file

    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in world["ckpt"].iterdir():
        shutil.copyfile(f, blobs / f.name)
        os.symlink(Path("../../blobs") / f.name, snap / f.name)
    assert read_config(snap) == read_config(world["ckpt"])
    assert checkpoint_file(snap, "tokenizer.json").name == "tokenizer.json"


# --- corpus and query JSONL -------------------------------------------------------------------------------------

CORPUS_CASES = {
    "not UTF-8 on line 2": (b'{"did": "a", "txt": "x"}\n{"did": "b", "txt": "\xff"}\n', ["corpus.jsonl:2", "UTF-8"]),
    "did a number": (b'{"did": 5, "txt": "x"}\n', ["corpus.jsonl:1", "did", "5", "int"]),
    "txt a list": (b'{"did": "a", "txt": ["x"]}\n', ["corpus.jsonl:1", "txt", "['x']"]),
    "img_path a dict": (b'{"did": "a", "img_path": {"p": 1}}\n', ["corpus.jsonl:1", "img_path", "dict"]),
    "modality a number": (b'{"did": "a", "txt": "x", "modality": 3}\n', ["corpus.jsonl:1", "modality", "3"]),
    "img_path with NUL": (b'{"did": "a", "img_path": "x\\u0000.png"}\n', ["corpus.jsonl:1", "img_path", "NUL"]),
    "deep nesting": (b'{"did": ' + b"[" * 100_000 + b"\n", ["corpus.jsonl:1", "not valid JSON"]),
    "huge integer": (b'{"did": "a", "txt": "x", "n": ' + b"9" * 5000 + b"}\n", ["corpus.jsonl:1", "not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(CORPUS_CASES))
def test_bad_corpus_is_one_line(world, tmp_path, capsys, case):
    data, fragments = CORPUS_CASES[case]
    (tmp_path / "corpus.jsonl").write_bytes(data)
    code = run(["index", "build", world["pack"], tmp_path / "corpus.jsonl", tmp_path / "index"])
    one_line(capsys, code, "retrv index: error:", *fragments)


QUERY_CASES = {
    "not UTF-8": (b'{"qid": "q\xc3", "query_txt": "x"}\n', ["queries.jsonl:1", "UTF-8"]),
    "qid a number": (b'{"qid": 1, "query_txt": "x"}\n', ["queries.jsonl:1", "qid", "1"]),
    "pos_cand_list a string": (b'{"qid": "q", "query_txt": "x", "pos_cand_list": "a"}\n',
                               ["queries.jsonl:1", "pos_cand_list", "'a'"]),
    "neg_cand_list of numbers": (b'{"qid": "q", "query_txt": "x", "neg_cand_list": [1, 2]}\n',
                                 ["queries.jsonl:1", "neg_cand_list", "[1, 2]"]),
    "task_id a string": (b'{"qid": "q", "query_txt": "x", "task_id": "0"}\n', ["queries.jsonl:1", "task_id", "'0'"]),
    "task_id a bool": (b'{"qid": "q", "query_txt": "x", "task_id": true}\n', ["queries.jsonl:1", "task_id", "True"]),
    "query_modality a list": (b'{"qid": "q", "query_txt": "x", "query_modality": []}\n',
                              ["queries.jsonl:1", "query_modality"]),
}


@pytest.mark.parametrize("case", sorted(QUERY_CASES))
def test_bad_queries_are_one_line(world, tmp_path, capsys, case):
    data, fragments = QUERY_CASES[case]
    (tmp_path / "queries.jsonl").write_bytes(data)
    code = run(["eval", world["index"], "--pack", world["pack"], "--queries", tmp_path / "queries.jsonl",
                "--no-rerank"])
    one_line(capsys, code, "retrv eval: error:", *fragments)


def test_m_beir_nulls_and_empty_strings_still_mean_absent(tmp_path):
    from retrv.runtime.inputs.corpus import read_candidates, read_queries

    (tmp_path / "c.jsonl").write_text('{"did": "9:1", "txt": "x", "img_path": null, "modality": ""}\n'
                                      '{"did": "9:2", "txt": "", "img_path": "a.png", "modality": null}\n')
    (tmp_path / "q.jsonl").write_text('{"qid": "9:7", "query_txt": "x", "query_img_path": "", "query_modality": null,'
                                      ' "pos_cand_list": ["9:1"], "neg_cand_list": null, "task_id": null}\n')
    cands, (q,) = read_candidates(tmp_path / "c.jsonl"), read_queries(tmp_path / "q.jsonl")
    assert [(c.txt, c.img_path, c.modality) for c in cands] == [("x", None, "text"),
                                                               (None, str(tmp_path / "a.png"), "image")]
    assert (q.query_img_path, q.query_modality, q.neg_cand_list, q.task_id) == (None, "text", (), None)


# --- --checkpoint that is not the pack's source ---------------------------------------------------------------------

def test_torch_backend_refuses_another_checkpoint(world, capsys):
    code = run(["search", world["index"], "--pack", world["pack"], "--text", "x", "--no-rerank",
                "--backend", "torch", "--checkpoint", world["other"]])
    one_line(capsys, code, "retrv search: error:", f"--checkpoint {world['other']}", "source fingerprint")
    assert code == 2


def test_torch_backend_refuses_a_checkpoint_of_another_config(world, tmp_path, capsys):
    other = write_tiny_checkpoint(tmp_path / "plain", icm=False, seed=5)
    code = run(["search", world["index"], "--pack", world["pack"], "--text", "x", "--no-rerank",
                "--backend", "torch", "--checkpoint", other])
    one_line(capsys, code, "retrv search: error:", "config.json differs")


def test_pack_without_fingerprint_is_checked_on_config_and_warns(world, tmp_path, caplog):
    from retrv.runtime.errors import InputError
    from retrv.runtime.pack import Manifest, Pack, write_manifest
    from retrv.export.torch_backend import check_source_checkpoint

    pack_dir = shutil.copytree(world["pack"], tmp_path / "old-pack")
    m = Pack.open(pack_dir).manifest
    # an old pack's extra: no fingerprint (the decoder layout is what its graph is: packs then were all traced, and
    # the layout check would refuse a fused graph recorded as traced)
    layout = {k: v for k, v in m.extra.items() if k == "decoder_layout"}
    write_manifest(pack_dir, Manifest(**{**m.__dict__, "extra": {"source_checkpoint": "ckpt", **layout}}))
    old = Pack.open(pack_dir)
    with caplog.at_level("WARNING"):
        check_source_checkpoint(old, world["other"])  # same config: accepted, with a warning
    assert "no source fingerprint" in caplog.text
    with pytest.raises(InputError, match="config.json differs"):
        check_source_checkpoint(old, write_tiny_checkpoint(tmp_path / "plain", icm=False, seed=5))
    check_source_checkpoint(Pack.open(world["pack"]), world["ckpt"])  # the source itself passes


# --- flags ----------------------------------------------------------------------------------------------------------

FLAG_CASES = {
    "--k zero": (["--k", "0"], ["--k", "'0'"]),
    "--k absurd": (["--k", str(2**64)], ["--k", str(2**64)]),
    "--k not a number": (["--k", "ten"], ["--k", "'ten'"]),
    "--k 5000 digits": (["--k", "9" * 5000], ["--k", "expected an integer"]),
    "--think-budget negative": (["--think-budget", "-1"], ["--think-budget", "'-1'"]),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flag_is_argparse_usage_error(world, capsys, case):
    flags, fragments = FLAG_CASES[case]
    code = run(["search", world["index"], "--pack", world["pack"], "--text", "x", *flags])
    one_line(capsys, code, "error: argument", *fragments)
    assert code == 2


@pytest.mark.parametrize("argv,fragments", [
    (["demo", "--seed", "-1"], ["--seed", "'-1'"]),
    (["demo", "--queries", "1000000"], ["--queries", "1000000"]),
])
def test_bad_demo_flag_is_argparse_usage_error(capsys, argv, fragments):
    one_line(capsys, run(argv), "error: argument", *fragments)


@pytest.mark.parametrize("flags,fragments", [
    (["--ef-search", str(10**7)], ["--ef-search", str(10**7), "[1, 1000000]"]),
    (["--ef-construction", str(2**64)], ["--ef-construction", str(2**64)]),
    (["--m", "5000"], ["--m", "5000", "[2, 1024]"]),
])
def test_hnsw_flags_beyond_the_caps_are_one_line(world, tmp_path, capsys, flags, fragments):
    code = run(["index", "build", world["pack"], world["root"] / "corpus.jsonl", tmp_path / "index", *flags])
    one_line(capsys, code, "error: argument", *fragments)  # refused by argparse, before the pack is opened


# --- whatever escapes a command -------------------------------------------------------------------------------------

def _raising(exc):
    def cmd(args):
        raise exc
    return cmd


@pytest.mark.parametrize("exc,code,fragments", [
    (TypeError("unsupported operand\ntype(s)"), 3,
     ["retrv generate: internal error: TypeError: unsupported operand type(s)", "rerun with -v"]),
    (FileNotFoundError(2, "No such file or directory", "/no/such/file.png"), 2,
     ["retrv generate: error: /no/such/file.png: No such file or directory"]),
    (PermissionError(13, "Permission denied", "/root/x"), 2, ["/root/x: Permission denied"]),
    (MemoryError(), 2, ["retrv generate: error: out of memory"]),
    (RecursionError("maximum recursion depth exceeded"), 3, ["internal error: RecursionError"]),
])
def test_escaping_exception_is_one_line(monkeypatch, capsys, exc, code, fragments):
    monkeypatch.setattr(cli, "_cmd_generate", _raising(exc))
    got = run(["generate", "pack", "--prompt", "x"])
    one_line(capsys, got, *fragments)
    assert got == code


def test_verbose_prints_the_traceback_of_an_internal_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cmd_generate", _raising(KeyError("boom")))
    assert run(["-v", "generate", "pack", "--prompt", "x"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("retrv generate: internal error: KeyError: 'boom'")


def test_keyboard_interrupt_exits_130_quietly(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cmd_generate", _raising(KeyboardInterrupt()))
    assert run(["generate", "pack", "--prompt", "x"]) == 130
    assert capsys.readouterr().err == ""
