"""The files of a checkpoint directory, opened as untrusted input. torch-free: the runtime uses it too.

- `checkpoint_file(root, name)`: the path of a file the checkpoint claims, refused with a one-line
  `CheckpointError` unless it is a regular file that resolves inside the checkpoint. A `tokenizer.json` that is a
  symlink to `/etc/passwd` (or a shard index naming `../../secret`) would otherwise be read, or copied into a
  pack that is then shipped. One layout is allowed to point outside: the Hugging Face hub cache, where
  `models--ORG--NAME/snapshots/REV/config.json` links to `models--ORG--NAME/blobs/SHA` (what
  `huggingface_hub.snapshot_download` leaves without `local_dir`).
- `read_json(path)`: a JSON object, or a one-line error for a missing, unreadable, non-UTF-8 or malformed file.
- `weight_files(root)`: the safetensors shards, from the index when there is one.
- `source_fingerprint(root)`: a cheap fingerprint of the checkpoint, recorded in a pack by the exporter so that the
  PyTorch backend can refuse a `--checkpoint` that is not the pack's source.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from retrv.runtime.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
ICM_NAME = "icm.safetensors"
# A config file is a few KB; the cap keeps a hostile multi-GB "config.json" from being read into memory.
MAX_JSON_BYTES = 64 << 20
# Fingerprint samples: the safetensors header (tensor names, dtypes, offsets) and this many evenly spaced chunks
# of the weights. A fine-tune of the same architecture keeps every name and size, so the header alone would not
# tell it from its base model; any sampled chunk of trained weights does. 16 x 64 KiB = 1 MiB read per shard:
# milliseconds, where hashing a 15 GB checkpoint whole would take about a minute at every open.
FINGERPRINT_CHUNKS = 16
FINGERPRINT_CHUNK_BYTES = 64 << 10
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


def _allowed_roots(root: Path) -> list[Path]:
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")  # the Hugging Face hub cache layout (module docstring)
    return roots


def checkpoint_file(root: str | os.PathLike, name: str, what: str = "checkpoint") -> Path:
    """`root/name`, symlinks resolved, refused unless it is a regular file inside the checkpoint directory."""
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{root}: file name {name!r}; expected a file name inside the {what} directory")
    path = root / name
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if not any(r == real or r in real.parents for r in _allowed_roots(real_root)):
        raise CheckpointError(f"{path}: resolves to {real}, outside the {what} directory; expected a file inside "
                              f"{real_root} (copy the file in rather than linking it)")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; expected it in the {what} directory") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a device never end
        raise CheckpointError(f"{path}: not a regular file; expected a file of the {what}")
    return path


def read_json(path: Path) -> dict:
    """A JSON object from `path`; every failure is a one-line CheckpointError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES} bytes; expected a JSON config file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # an integer of 5,000 digits, nesting deeper than the stack
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: got a JSON {type(data).__name__}; expected an object")
    return data


def weight_files(root: Path) -> list[Path]:
    """The checkpoint's safetensors shards (without icm.safetensors), each checked by `checkpoint_file`."""
    if os.path.lexists(root / INDEX_NAME):
        index = checkpoint_file(root, INDEX_NAME)
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' is {type(weight_map).__name__}; expected an object "
                                  f"of tensor name -> shard file name")
        names = set(weight_map.values())
        bad = [n for n in names if not isinstance(n, str) or not n or "/" in n or "\\" in n or n in (".", "..")]
        if bad:
            raise CheckpointError(f"{index}: names shard {bad[0]!r}; expected a file name in {root}")
        return [checkpoint_file(root, n) for n in sorted(names)]
    names = sorted(p.name for p in root.glob("*.safetensors") if p.name != ICM_NAME)
    if names:
        return [checkpoint_file(root, n) for n in names]
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root / pickles[0]}: a pickle file; expected safetensors (retrv never unpickles: convert with "
            f"safetensors.torch.save_file on a machine you trust)"
        )
    raise CheckpointError(f"{root}: no *.safetensors weights; expected model.safetensors or a sharded index")


def _sample_weights(path: Path, h: Any) -> None:
    """Feed `h` the safetensors header of `path` and FINGERPRINT_CHUNKS evenly spaced chunks after it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        start = 8 + min(n, MAX_SAFETENSORS_HEADER, max(0, size - 8))
        f.seek(0)
        h.update(f.read(start))
        span = max(0, size - start)
        for i in range(FINGERPRINT_CHUNKS):
            f.seek(start + span * i // FINGERPRINT_CHUNKS)
            h.update(f.read(FINGERPRINT_CHUNK_BYTES))


def source_fingerprint(root: str | os.PathLike) -> str:
    """sha256 over config.json, retrv_config.json, and each weight file's name, size, header and sampled chunks.

    Equal for the same checkpoint copied elsewhere; different for another architecture, another shard layout, or
    another training run of the same architecture (its weights differ in every sampled chunk). Not a proof of
    integrity: a same-size edit between samples keeps it (the pack's own sha256s cover the pack, not its source).
    """
    root = Path(root)
    h = hashlib.sha256(b"retrv-source-fingerprint-v1\0")
    for name in ("config.json", "retrv_config.json"):
        if name == "config.json" or os.path.lexists(root / name):
            h.update(name.encode() + b"\0" + checkpoint_file(root, name).read_bytes() + b"\0")
    files = weight_files(root)
    if os.path.lexists(root / ICM_NAME):
        files.append(checkpoint_file(root, ICM_NAME))
    for path in files:
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        try:
            _sample_weights(path, h)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    return h.hexdigest()
