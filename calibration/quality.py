"""Quality of a pack on real text: perplexity and teacher-forced top-1 agreement with its fp32 source.

The text is tokenized with the pack's tokenizer, cut into `sequences` rows of `seq_len` tokens, and run through
the pack's decoder one position at a time (batch = the rows, on the KV cache: the decoder graph returns the last
position's logits only, so each step scores one position of every row). Every position after the first of each
row is predicted:

- perplexity = exp(mean negative log-likelihood of the true next token);
- the argmax at each position, so two packs' predictions compare position by position on the same (true) prefix:
  `top1_agreement(ref, quant)` is the fraction of positions where they choose the same next token.

No torch: onnxruntime and numpy only, so the same measure runs on a device.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrv.runtime.errors import InputError

# The repository's own prose for CI: real English, shipped with the project (never the shared captions).
REPO_TEXT_FILES = ("README.md", "docs/ARCHITECTURE.md")


@dataclass(frozen=True)
class TextScores:
    nll: np.ndarray  # (rows, seq_len - 1) negative log-likelihood of each true next token
    argmax: np.ndarray  # (rows, seq_len - 1) the pack's predicted next token

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.astype(np.float64).mean()))

    @property
    def positions(self) -> int:
        return int(self.nll.size)


def token_rows(token_ids: list[int], sequences: int, seq_len: int) -> np.ndarray:
    """The first sequences x seq_len tokens as (rows, seq_len); refused when the text is too short."""
    if sequences < 1 or seq_len < 2:
        raise InputError(f"sequences/seq_len: got {sequences}/{seq_len}; expected >= 1 and >= 2")
    need = sequences * seq_len
    if len(token_ids) < need:
        raise InputError(f"quality text: got {len(token_ids)} tokens; expected at least {need} "
                         f"({sequences} rows of {seq_len})")
    return np.asarray(token_ids[:need], np.int64).reshape(sequences, seq_len)


def score_pack(pack_dir: str | Path, rows: np.ndarray, provider: str = "cpu") -> TextScores:
    """Teacher-forced next-token scores of `rows` (B, S) through the pack at `pack_dir`."""
    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.generate import Generator
    from retrv.runtime.pack import Pack

    pack = Pack.open(pack_dir)
    gen = Generator.from_pack(pack, OrtBackend(pack, provider=provider, cache_dir=None))
    vocab = pack.model_config.text.vocab_size
    if rows.min() < 0 or rows.max() >= vocab:
        raise InputError(f"token ids: got range {rows.min()}..{rows.max()}; expected 0..{vocab - 1} ({pack_dir})")
    b, s = rows.shape
    state = gen.backend.start(b)
    nll = np.zeros((b, s - 1), np.float32)
    arg = np.zeros((b, s - 1), np.int64)
    ones = np.ones((b, 1), np.int64)
    for t in range(s - 1):
        embeds = gen.lookup(rows[:, t]).reshape(b, 1, -1)  # (B, 1, H)
        logits = gen.backend.step(state, embeds, np.full((3, b, 1), t, np.int64), ones).astype(np.float64)  # (B, V)
        m = logits.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        nll[:, t] = logz - logits[np.arange(b), rows[:, t + 1]]
        arg[:, t] = logits.argmax(-1)
    return TextScores(nll=nll, argmax=arg)


def top1_agreement(ref: TextScores, other: TextScores) -> float:
    if ref.argmax.shape != other.argmax.shape:
        raise InputError(f"top-1 agreement: got shapes {ref.argmax.shape} and {other.argmax.shape}; expected equal")
    return float((ref.argmax == other.argmax).mean())


def repo_text(root: str | Path | None = None) -> str:
    """The project's README and architecture notes, markdown code blocks and tables dropped: English prose."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    paras = []
    for name in REPO_TEXT_FILES:
        path = root / name
        if not path.is_file():
            raise InputError(f"{path}: missing; expected the project's own text for the quality gate")
        in_code = False
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                in_code = not in_code
                continue
            if in_code or line.startswith(("|", "#", "<", "!")) or not line.strip():
                continue
            paras.append(line.strip())
    return " ".join(paras)


def caption_text(captions_csv: str | os.PathLike, limit: int | None = None) -> str:
    """Captions from a Flickr8k-style `captions.csv` (header image,caption), one per line, in file order."""
    path = Path(captions_csv)
    if not path.is_file():
        raise InputError(f"{path}: not a file; expected captions.csv with the header image,caption")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "caption" not in reader.fieldnames:
            raise InputError(f"{path}: header {reader.fieldnames}; expected image,caption")
        caps = [row["caption"].strip() for row in reader]
    return "\n".join(caps[:limit])
