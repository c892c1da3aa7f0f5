"""Which prompt and answer format a listwise (V-Retrver) pack speaks, as recorded in its manifest.

The released V-Retrver code disagrees with itself in two places, and a pack says which side it takes:

- the answer: the evaluation merger (`sliding_window_processor.py`) reads a ranked list `<answer>[4, 1, 3]</answer>`,
  while the released guideline of the training prompt (`prepare_lamra_train.py`, `guideline`) asks for one number.
  `answer_format="list"` (the default) asks for the list; `"index"` renders the released guideline verbatim. The
  reader accepts either whatever the pack says (a single number is a one-entry list, completed in coarse order).
- `target_image` of `crop_image`: the released system prompt says "Index from 1 to the number of images. Choose 1 to
  operate on original image", the released tool server maps 0 to the query image and 1..N to the candidates.
  `target_image_base=1` (the default) keeps the released prompt word for word and makes the tool agree with it:
  images are numbered from 1 in the order the prompt shows them (the query image first when there is one);
  `target_image_base=0` follows the tool server and rewrites that one description to say so.

Stored under the manifest's `extra["rerank"]` (additive: no format-version bump); a pack without it gets the
defaults, which are what packs exported before it was recorded were served with, except the prompt wording.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from retrv.runtime.errors import InputError

PROMPTS = ("v-retrver-released",)  # the released `system_prompt` of prepare_lamra_train.py (the eval path's)
ANSWER_FORMATS = ("list", "index")
TARGET_IMAGE_BASES = (0, 1)


@dataclass(frozen=True)
class ListwiseFormat:
    prompt: str = "v-retrver-released"
    answer_format: str = "list"
    target_image_base: int = 1

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise InputError(f"rerank.prompt: got {self.prompt!r}; expected one of {list(PROMPTS)}")
        if self.answer_format not in ANSWER_FORMATS:
            raise InputError(f"rerank.answer_format: got {self.answer_format!r}; expected one of "
                             f"{list(ANSWER_FORMATS)}")
        base = self.target_image_base
        if isinstance(base, bool) or base not in TARGET_IMAGE_BASES:
            raise InputError(f"rerank.target_image_base: got {base!r}; expected 0 or 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ListwiseFormat":
        """A manifest's `extra["rerank"]` (None or absent: the defaults)."""
        if d is None:
            return cls()
        if isinstance(d, ListwiseFormat):
            return d
        if not isinstance(d, dict):
            raise InputError(f"rerank format: got {type(d).__name__}; expected a dict like {cls().to_dict()}")
        unknown = sorted(set(d) - set(cls().to_dict()))
        if unknown:
            raise InputError(f"rerank format: unknown keys {unknown}; expected {sorted(cls().to_dict())}")
        return cls(**d)
