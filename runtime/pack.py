"""The pack: one directory holding everything the runtime needs, described and checksummed by `manifest.json`.

    pack/
      manifest.json       format version, model config, preprocessor, prompt template, opset, writer versions,
                          validation results, and every other file with its role, size and sha256
      tokenizer.json
      vision.onnx  icm_content.onnx  icm_relation.onnx  decoder.onnx  embedder.onnx  (+ *.onnx.data)
      embedder_image.onnx  embedder_text.onnx  embedder_tokenizer.json   (an embedder from optimum: CLIP, SigLIP)
      embed_tokens.npy    (or embed_tokens.nbits: a tied LM head quantized, stored once; runtime/inputs/table.py)

`Pack.open` treats the manifest as untrusted input and refuses, with a one-line `PackError` naming the file, a
pack with a missing, truncated or modified file, a manifest that is not a JSON object, a manifest from a newer
format version, or a file path that leaves the pack directory. Every check runs before the `Pack` object is
built, so a refused pack is never half-loaded.

numpy + stdlib only at import: no torch, onnx, onnxruntime or transformers (a device may have none of them).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrv.runtime.config import ModelConfig
from retrv.runtime.rerank.formats import ListwiseFormat
from retrv.runtime.errors import InputError, PackError, RetrvError
from retrv.runtime.folder import check_name, check_version, member, read_manifest, verify_files
from retrv.runtime.fsutil import atomic_write_json, sha256_file

if TYPE_CHECKING:
    from retrv.runtime.inputs.preprocess import ImageProcessorConfig

logger = logging.getLogger(__name__)

# Bump when a reader of the previous version would misread or mis-run a pack written by this one: a manifest
# field renamed, removed or changing meaning, a sub-model's inputs/outputs changing contract, a new role the
# runtime cannot do without. Readers refuse a newer version. Purely additive information goes under `extra`
# (readers ignore keys they do not know there) and does not need a bump.
PACK_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# A real manifest is a few tens of KB; the cap keeps a hostile one from exhausting memory before it is parsed.
MAX_MANIFEST_BYTES = 16 << 20

# The roles the runtime knows. Other lower-case roles are accepted (a newer writer's additive files, TensorRT
# engines) and may appear on several files; the roles here name exactly one file each, except external_data.
SINGLE_ROLES = ("vision", "icm_content", "icm_relation", "decoder", "embedder", "embed_tokens", "embed_tokens_nbits",
                "tokenizer", "embedder_image", "embedder_text")
EXTERNAL_DATA = "external_data"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
METHODS = ("retrv-r1", "listwise")  # retrv-r1: the model has an ICM; listwise: every candidate in the prompt
VERIFY_MODES = ("full", "size")

_ROLE_RE = re.compile(r"[a-z][a-z0-9_]*")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _fail(msg: str) -> PackError:
    # Messages must stay one line: the CLI prints them as such, and they may quote untrusted manifest text.
    return PackError(" ".join(str(msg).split()))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int subclass; `true` is no size


def _check_dict(where: str, value: Any) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(f"{where}: got {type(value).__name__}; expected a JSON object")
    return value


def _json_copy(where: str, value: Any) -> dict:
    """A deep copy through JSON: tuples become lists (so a manifest built in code equals the one read back), and
    anything JSON cannot hold (a set, an array, NaN) is refused now rather than when the manifest is written."""
    _check_dict(where, value)
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
        raise _fail(f"{where}: not JSON-serializable ({type(e).__name__}: {e})") from None


def check_file_name(name: Any) -> str:
    """A manifest file name: a relative POSIX path inside the pack (`folder.check_name`). Symlinks are checked
    against the real directory by `Pack.open`."""
    check_name(name, PackError, folder="pack directory", example="decoder.onnx")
    if name == MANIFEST_NAME:
        raise _fail(f"file name {name!r}: the manifest cannot list itself")
    return name


def _check_io(where: str, value: Any) -> dict[str, dict]:
    """{name: {"dtype": str, "shape": [int | str]}}; shapes normalized to lists so a round trip compares equal."""
    _check_dict(where, value)
    out = {}
    for name, spec in value.items():
        if not name or not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
            raise _fail(f"{where}[{name!r}]: got {spec!r}; expected {{'dtype': str, 'shape': [int | str, ...]}}")
        dtype, shape = spec["dtype"], spec["shape"]
        if not isinstance(dtype, str) or not dtype:
            raise _fail(f"{where}[{name!r}].dtype: got {dtype!r}; expected a dtype name such as 'float32'")
        if not isinstance(shape, (list, tuple)) or not all(
            (_is_int(d) and d >= 0) or (isinstance(d, str) and d) for d in shape
        ):
            raise _fail(f"{where}[{name!r}].shape: got {shape!r}; expected a list of sizes >= 0 or axis names")
        out[name] = {"dtype": dtype, "shape": list(shape)}
    return out


@dataclass(frozen=True)
class FileEntry:
    """One file of the pack. `inputs`/`outputs` describe an ONNX graph's I/O (empty for data files); `data_of`
    names the .onnx file an external-data file belongs to."""

    role: str
    sha256: str
    bytes: int
    precision: str | None = None
    quantization: dict | None = None
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    data_of: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or not _ROLE_RE.fullmatch(self.role):
            raise _fail(f"role: got {self.role!r}; expected a lower-case name such as 'decoder'")
        if not isinstance(self.sha256, str) or not _SHA_RE.fullmatch(self.sha256):
            raise _fail(f"sha256: got {self.sha256!r}; expected 64 lower-case hex digits")
        if not _is_int(self.bytes) or self.bytes < 0:
            raise _fail(f"bytes: got {self.bytes!r}; expected an integer >= 0")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise _fail(f"precision: got {self.precision!r}; expected one of {list(PRECISIONS)} or null")
        if self.quantization is not None:
            object.__setattr__(self, "quantization", _json_copy("quantization", self.quantization))
        object.__setattr__(self, "inputs", _check_io("inputs", self.inputs))
        object.__setattr__(self, "outputs", _check_io("outputs", self.outputs))
        if (self.role == EXTERNAL_DATA) != (self.data_of is not None):
            raise _fail(f"role {self.role!r} with data_of {self.data_of!r}: an '{EXTERNAL_DATA}' file needs data_of "
                        f"(the .onnx file it belongs to) and no other role has one")
        if self.data_of is not None:
            check_file_name(self.data_of)

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "file") -> FileEntry:
        _check_dict(where, d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        missing = [k for k in ("role", "sha256", "bytes") if k not in d]
        if unknown or missing:
            problem = f"unknown fields {unknown}" if unknown else f"missing fields {missing}"
            raise _fail(f"{where}: {problem}; expected {sorted(known)}")
        kw = {k: v for k, v in d.items() if not (k in ("inputs", "outputs") and v is None)}
        try:
            return cls(**kw)
        except PackError as e:
            raise _fail(f"{where}: {e}") from None


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` holds. `model` is `ModelConfig.to_dict()`, `preprocessor` is
    `ImageProcessorConfig.to_dict()`; `validation` and `extra` are free-form. Treat the dicts as read-only: the
    pack fingerprint is computed from them."""

    format_version: int
    model: dict
    method: str
    preprocessor: dict
    prompt_template: dict
    opset: int
    created_by: dict
    files: dict  # file name (relative to the pack) -> FileEntry
    validation: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_version(self.format_version)
        for name in ("model", "preprocessor", "prompt_template", "created_by", "validation", "extra"):
            object.__setattr__(self, name, _json_copy(name, getattr(self, name)))
        bad = {k: v for k, v in self.created_by.items() if not (v is None or isinstance(v, str))}
        if bad:
            raise _fail(f"created_by: got {bad!r}; expected package name -> version string")
        if self.method not in METHODS:
            raise _fail(f"method: got {self.method!r}; expected one of {list(METHODS)}")
        expected = "retrv-r1" if self.model.get("icm") else "listwise"
        if self.method != expected:
            raise _fail(f"method: got {self.method!r}; expected {expected!r} for a model "
                        f"{'with' if self.model.get('icm') else 'without'} an ICM")
        if not _is_int(self.opset) or self.opset < 1:
            raise _fail(f"opset: got {self.opset!r}; expected a positive integer")
        _check_dict("files", self.files)
        roles: dict[str, str] = {}
        for name, entry in self.files.items():
            check_file_name(name)
            if not isinstance(entry, FileEntry):
                raise _fail(f"files[{name!r}]: got {type(entry).__name__}; expected a FileEntry")
            if entry.role in SINGLE_ROLES and entry.role in roles:
                raise _fail(f"files: role {entry.role!r} on both {roles[entry.role]!r} and {name!r}; expected one file")
            roles.setdefault(entry.role, name)
            if entry.data_of is not None and not (entry.data_of in self.files and entry.data_of.endswith(".onnx")):
                raise _fail(f"files[{name!r}].data_of: got {entry.data_of!r}; expected a listed .onnx file")
        object.__setattr__(self, "files", dict(self.files))

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "files"}
        d["files"] = {name: entry.to_dict() for name, entry in self.files.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Parse a manifest dict (as json.load gives it); `PackError` names the bad field."""
        _check_dict("manifest", d)
        # The version first: a newer manifest may have other fields, and "upgrade" is the useful message.
        if "format_version" not in d:
            raise _fail("missing field 'format_version'; expected a pack manifest")
        _check_version(d["format_version"])
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.name not in ("validation", "extra")]
        missing = [k for k in required if k not in d]
        if missing:
            raise _fail(f"missing fields {missing}; expected all of {required}")
        unknown = sorted(set(d) - known)
        if unknown:
            raise _fail(f"unknown fields {unknown}; expected {sorted(known)} (additive information goes in 'extra')")
        files = _check_dict("files", d["files"])
        entries = {name: FileEntry.from_dict(e, where=f"files[{name!r}]") for name, e in files.items()}
        return cls(**{**d, "files": entries})

    def canonical_json(self) -> bytes:
        """The manifest in one byte-exact form (sorted keys, no whitespace, ASCII): what `Pack.sha256` hashes, so
        reformatting manifest.json does not change the fingerprint but any change of content does."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")


def _check_version(v: Any) -> None:
    check_version(None, v, PACK_FORMAT_VERSION, PackError)


def describe_file(pack_dir: str | os.PathLike, name: str, role: str, **kw: Any) -> FileEntry:
    """A `FileEntry` for `pack_dir/name` with its size and sha256 computed; `kw` are the other FileEntry fields
    (precision, quantization, inputs, outputs, data_of)."""
    check_file_name(name)
    path = Path(pack_dir) / name
    if not path.is_file():
        raise _fail(f"{path}: file not found; expected it written before it is described")
    return FileEntry(role=role, sha256=sha256_file(path), bytes=path.stat().st_size, **kw)


def write_manifest(pack_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `pack_dir/manifest.json` atomically. Write it last: it vouches for the files already there.
    `Pack.open(pack_dir)` afterwards checks the result end to end."""
    path = Path(pack_dir) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_dict())
    return path


def _read_manifest(path: Path) -> Manifest:
    data = read_manifest(path, PackError, MAX_MANIFEST_BYTES, "the pack manifest", symlink_ok=True)
    try:
        return Manifest.from_dict(data)
    except PackError as e:
        raise _fail(f"{path}: {e}") from None


def _resolve_inside(root: Path, name: str) -> Path:
    """`root/name` with symlinks resolved, refused unless it is a regular file inside `root`."""
    return member(root, name, PackError, symlinks="inside", folder="pack directory")


DECODER_LAYOUTS = ("traced", "fused")
FUSED_DECODER_INPUTS = ("seqlens_k", "total_sequence_length", "cos_cache", "sin_cache")


def _check_decoder_layout(manifest_path: Path, manifest: Manifest) -> None:
    """`extra.decoder_layout` names a known layout and the decoder's recorded inputs are that layout's."""
    layout = manifest.extra.get("decoder_layout", "traced")
    if layout not in DECODER_LAYOUTS:
        raise _fail(f"{manifest_path} 'extra.decoder_layout': got {layout!r}; expected one of {list(DECODER_LAYOUTS)}")
    for name, entry in manifest.files.items():
        if entry.role == "decoder":
            fused = all(k in entry.inputs for k in FUSED_DECODER_INPUTS)
            if fused != (layout == "fused"):
                raise _fail(f"{manifest_path} {name}: inputs {sorted(entry.inputs)} do not match decoder_layout "
                            f"{layout!r}; expected {'the fused graph' if layout == 'fused' else 'the traced graph'}'s")


class Pack:
    """An opened, verified pack. Build it with `Pack.open`; the constructor assumes every check has passed."""

    def __init__(self, path: Path, manifest: Manifest, model_config: ModelConfig,
                 preprocessor: ImageProcessorConfig, fingerprint: str):
        self._path = path
        self._manifest = manifest
        self._model_config = model_config
        self._preprocessor = preprocessor
        self._sha256 = fingerprint

    @classmethod
    def open(cls, path: str | os.PathLike, verify: str = "full") -> Pack:
        """Open and verify a pack directory, or raise `PackError` naming the file and what was expected.

        `verify="full"` checks every listed file's size and sha256: it reads the whole pack (seconds per GB),
        and catches any modification. `verify="size"` checks only that every file exists with its listed size:
        instant, and it catches truncated, missing and replaced-by-another-size files, but NOT a modification
        that keeps the size (a flipped byte, a same-shape re-export). Use it to reopen a pack on a device that
        has verified it fully once and whose storage you trust. Either way the manifest itself, the model and
        preprocessor configs and every path are checked.
        """
        if verify not in VERIFY_MODES:
            raise InputError(f"verify: got {verify!r}; expected one of {list(VERIFY_MODES)}")
        given = Path(path)
        if not given.is_dir():
            raise _fail(f"{given}: pack directory not found; expected a directory written by `retrv export`")
        root = Path(os.path.realpath(given))
        manifest_path = root / MANIFEST_NAME
        if not os.path.lexists(manifest_path):
            raise _fail(f"{manifest_path}: file not found; expected the pack manifest")
        _resolve_inside(root, MANIFEST_NAME)
        manifest = _read_manifest(manifest_path)

        # Sizes of every file first (cheap), so a missing or truncated file is reported before GBs are hashed.
        verify_files(root, manifest.files, PackError, verify, symlinks="inside", folder="pack directory")

        from retrv.runtime.inputs.preprocess import ImageProcessorConfig  # here: it pulls in Pillow

        model_config = _parse_config(manifest_path, "model", manifest.model, ModelConfig)
        preprocessor = _parse_config(manifest_path, "preprocessor", manifest.preprocessor, ImageProcessorConfig)
        if "rerank" in manifest.extra:  # the listwise prompt / answer format the pack was exported with
            _parse_config(manifest_path, "extra.rerank", manifest.extra["rerank"], ListwiseFormat)
        if "embedder" in manifest.extra:  # a separate coarse-stage embedder's configs (export.pack_export)
            spec = manifest.extra["embedder"]
            if not isinstance(spec, dict):
                raise _fail(f"{manifest_path} 'extra.embedder': got {type(spec).__name__}; expected the embedder's "
                            f"model and preprocessor configs")
            from retrv.runtime.inputs.dual_encoder import OptimumEmbedderConfig, is_optimum_spec

            if is_optimum_spec(spec):  # an optimum export: CLIP / SigLIP / a text encoder
                parsed = _parse_config(manifest_path, "extra.embedder", spec, OptimumEmbedderConfig)
                roles = {e.role for e in manifest.files.values()}
                need = ["embedder_text", "embedder_tokenizer"] + (["embedder_image"] if parsed.image else [])
                if missing := [r for r in need if r not in roles]:
                    raise _fail(f"{manifest_path} 'extra.embedder': a {parsed.family} embedder without files of "
                                f"roles {missing}; expected {need}")
            else:
                _parse_config(manifest_path, "extra.embedder.model", spec.get("model"), ModelConfig)
                _parse_config(manifest_path, "extra.embedder.preprocessor", spec.get("preprocessor"),
                              ImageProcessorConfig)
        tables = [n for n, e in manifest.files.items() if e.role == "embed_tokens_nbits"]
        if tables:  # its layout record must fit the file now, not at the first lookup
            from retrv.runtime.inputs.table import QuantizedTable

            QuantizedTable(root / tables[0], manifest.files[tables[0]].quantization)
        _check_decoder_layout(manifest_path, manifest)
        fingerprint = hashlib.sha256(manifest.canonical_json()).hexdigest()
        return cls(root, manifest, model_config, preprocessor, fingerprint)

    @property
    def path(self) -> Path:
        """The pack directory, symlinks resolved."""
        return self._path

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    @property
    def preprocessor(self) -> ImageProcessorConfig:
        return self._preprocessor

    @property
    def sha256(self) -> str:
        """Fingerprint of the pack: sha256 of the canonical manifest JSON, which lists every file's sha256. An
        index records it to refuse being searched with another pack. (With verify="size" the files were not
        hashed, so the fingerprint is what the manifest claims.)"""
        return self._sha256

    @property
    def decoder_layout(self) -> str:
        """"traced" (standard ONNX ops, the key mask and a growing KV cache) or "fused" (ONNX Runtime contrib ops
        and a preallocated KV buffer: export/fused_decoder.py). Packs written before the field are traced."""
        return self._manifest.extra.get("decoder_layout", "traced")

    def has(self, role: str) -> bool:
        return any(e.role == role for e in self._manifest.files.values())

    def file(self, role: str) -> Path:
        """The path of the one file with `role`, e.g. `pack.file("decoder")`."""
        names = [n for n, e in self._manifest.files.items() if e.role == role]
        if len(names) != 1:
            have = sorted({e.role for e in self._manifest.files.values()})
            what = f"{len(names)} files {names}" if names else "no file"
            raise _fail(f"{self._path}: {what} with role {role!r}; expected one (roles present: {have})")
        return self._path / names[0]

    def __repr__(self) -> str:
        return f"Pack({str(self._path)!r}, method={self._manifest.method!r}, files={len(self._manifest.files)})"


def _parse_config(manifest_path: Path, key: str, d: Mapping, cls: type) -> Any:
    """Build a config dataclass from a manifest section at open time, so a bad one is refused now, not mid-run."""
    cls_name = cls.__name__
    try:
        return cls.from_dict(d)
    except RetrvError as e:  # CheckpointError / InputError from the dataclasses' own validation
        raise _fail(f"{manifest_path} '{key}': {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _fail(f"{manifest_path} '{key}': not a valid {cls_name} ({type(e).__name__}: {e})") from None
