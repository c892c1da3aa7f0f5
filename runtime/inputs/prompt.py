"""Chat prompts as token ids, exactly as transformers' Qwen2.5-VL processor makes them, without transformers.

The processor renders the Jinja chat template to a string with one `<|image_pad|>` per image, repeats that
token once per merged vision patch of the image, and tokenizes. `ChatTemplate` reproduces the template in
Python for the message shapes the runtime sends; `PromptTokenizer.render` tokenizes the string with the
checkpoint's tokenizer.json and repeats each `<|image_pad|>` id. `<|image_pad|>` is an added token, so the text
around it tokenizes the same whether it is repeated before or after tokenization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from retrv.runtime.errors import CheckpointError, InputError

Message = dict[str, Any]


@dataclass(frozen=True)
class ChatTemplate:
    """Qwen2.5-VL-Instruct's chat format (its chat_template.json), as data.

    `render` gives the same string as the Jinja template for: string content or a list of text and image parts
    in any role; a default system message when the first message is not a system message; and
    `add_generation_prompt`. `default_system=None` leaves the default system message out (not what Qwen does;
    for checkpoints trained without it).
    """

    default_system: str | None = "You are a helpful assistant."
    turn_start: str = "<|im_start|>"
    turn_end: str = "<|im_end|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"
    add_vision_id: bool = False  # the template's option: "Picture 1: " before each image

    def __post_init__(self) -> None:
        for name in ("turn_start", "turn_end", "vision_start", "vision_end", "image_pad"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InputError(f"ChatTemplate.{name}: got {value!r}; expected a non-empty token string")
        if self.default_system is not None and not isinstance(self.default_system, str):
            raise InputError(f"ChatTemplate.default_system: got {self.default_system!r}; expected a string or None")

    @property
    def marker_tokens(self) -> tuple[str, ...]:
        """The tokens the template emits itself; each must be one token of the checkpoint's tokenizer."""
        return (self.turn_start, self.turn_end, self.vision_start, self.vision_end, self.image_pad)

    # -- the markup, piece by piece: every prompt of the runtime (generation, embedding, reranking, training) and
    # every turn a tool result opens is written with these, never by hand --------------------------------------
    def open_turn(self, role: str) -> str:
        """'<|im_start|>{role}\\n': the start of a turn whose content follows."""
        return f"{self.turn_start}{role}\n"

    def close_turn(self) -> str:
        """'<|im_end|>\\n': the end of the current turn."""
        return f"{self.turn_end}\n"

    def turn(self, role: str, content: str) -> str:
        """One whole turn with string content."""
        return self.open_turn(role) + content + self.close_turn()

    def handover(self, role: str) -> str:
        """Close the current turn and open one for `role` (a tool result as a user turn, then the assistant)."""
        return self.close_turn() + self.open_turn(role)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt string, one `image_pad` per image (as `processor.apply_chat_template(tokenize=False)`)."""
        return self._render(messages, add_generation_prompt)[0]

    def count_images(self, messages: Sequence[Message]) -> int:
        return self._render(messages, False)[1]

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> tuple[str, int]:
        if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
            raise InputError(f"messages: got {type(messages).__name__}; expected a list of message dicts")
        pieces: list[str] = []
        n_images = 0
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise InputError(f"messages[{i}]: got {message!r}; expected a dict with 'role' and 'content'")
            role = message["role"]
            if not isinstance(role, str) or not role:
                raise InputError(f"messages[{i}]['role']: got {role!r}; expected a non-empty string")
            if i == 0 and role != "system" and self.default_system is not None:
                pieces.append(self.turn("system", self.default_system))
            pieces.append(self.open_turn(role))
            content = message["content"]
            if isinstance(content, str):
                pieces.append(content)
            elif isinstance(content, (list, tuple)):
                for j, part in enumerate(content):
                    kind = self._part_kind(part, f"messages[{i}]['content'][{j}]")
                    if kind == "image":
                        n_images += 1
                        if self.add_vision_id:
                            pieces.append(f"Picture {n_images}: ")
                        pieces.append(f"{self.vision_start}{self.image_pad}{self.vision_end}")
                    else:
                        pieces.append(part["text"])
            else:
                raise InputError(
                    f"messages[{i}]['content']: got {type(content).__name__}; expected a string or a list of parts"
                )
            pieces.append(self.close_turn())
        if add_generation_prompt:
            pieces.append(self.open_turn("assistant"))
        return "".join(pieces), n_images

    @staticmethod
    def _part_kind(part: Any, where: str) -> str:
        # Same tests, in the same order, as the Jinja template.
        if not isinstance(part, dict):
            raise InputError(f"{where}: got {part!r}; expected a dict such as {{'type': 'text', 'text': ...}}")
        if part.get("type") == "image" or "image" in part or "image_url" in part:
            return "image"
        if part.get("type") == "video" or "video" in part:
            raise InputError(f"{where}: got a video part; the runtime supports text and image parts only")
        if "text" in part:
            if not isinstance(part["text"], str):
                raise InputError(f"{where}['text']: got {type(part['text']).__name__}; expected a string")
            return "text"
        # The template would drop such a part silently; a part that renders to nothing is a caller's bug.
        raise InputError(f"{where}: got {part!r}; expected an image part or a part with 'text'")


def image_token_count(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Number of `<|image_pad|>` tokens for one image: t*h*w patches, merge_size x merge_size merged into one."""
    if len(grid_thw) != 3:
        raise InputError(f"image_grid_thw: got {tuple(grid_thw)}; expected (t, h, w)")
    t, h, w = (int(x) for x in grid_thw)
    if min(t, h, w) < 1 or h % merge_size or w % merge_size:
        raise InputError(
            f"image_grid_thw: got ({t}, {h}, {w}); expected positive t and h, w multiples of merge_size={merge_size}"
        )
    return t * h * w // (merge_size * merge_size)


class PromptTokenizer:
    """A checkpoint's tokenizer.json plus its chat template: text, ids and whole prompts.

    >>> tok = PromptTokenizer("pack/tokenizer.json")
    >>> ids = tok.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], [64])
    """

    def __init__(self, tokenizer_json: str | Path, template: ChatTemplate | None = None):
        self.path = Path(tokenizer_json)
        if not self.path.is_file():
            raise CheckpointError(f"tokenizer file: {self.path} does not exist; expected a tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"tokenizer file {self.path}: cannot be loaded ({e})") from None
        self._init(tokenizer, template or ChatTemplate())

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, template: ChatTemplate | None = None) -> PromptTokenizer:
        """Wrap an in-memory `tokenizers.Tokenizer` (tests, the tiny tokenizer)."""
        self = cls.__new__(cls)
        self.path = Path("<in-memory>")
        self._init(tokenizer, template or ChatTemplate())
        return self

    def _init(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        self._tok = tokenizer
        self.template = template
        missing = [t for t in template.marker_tokens if tokenizer.token_to_id(t) is None]
        if missing:
            raise CheckpointError(
                f"tokenizer {self.path}: missing the chat-template tokens {missing}; expected a Qwen2.5-VL tokenizer"
            )
        self.image_pad_id = tokenizer.token_to_id(template.image_pad)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (may be less than the model's embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int:
        """The id of a single token, e.g. '<|im_end|>'. Raises InputError if `name` is not one token."""
        i = self._tok.token_to_id(name)
        if i is None:
            raise InputError(f"token {name!r}: not in the vocabulary of {self.path}; expected a single token")
        return i

    def encode_text(self, text: str) -> list[int]:
        """Ids of a text fragment, no special tokens around it (added tokens written in the text still match)."""
        if not isinstance(text, str):
            raise InputError(f"text: got {type(text).__name__}; expected a string")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render(
        self,
        messages: Sequence[Message],
        image_token_counts: Sequence[int],
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The input_ids the Qwen2.5-VL processor gives for `messages` and their images.

        `image_token_counts[k]` is the number of `<|image_pad|>` tokens of the k-th image in message order,
        t*h*w / merge_size**2 of its grid (`image_token_count`). Like the processor, a `<|image_pad|>` written
        literally in a text part counts as an image placeholder.
        """
        text = self.template.render(messages, add_generation_prompt)
        counts = [int(c) for c in image_token_counts]
        if any(c < 1 for c in counts):
            raise InputError(f"image_token_counts: got {counts}; expected positive counts")
        # add_special_tokens=True as the processor's tokenizer call (Qwen's post-processor adds nothing).
        ids = self._tok.encode(text, add_special_tokens=True).ids
        n_pads = ids.count(self.image_pad_id)
        if n_pads != len(counts):
            raise InputError(
                f"image_token_counts: got {len(counts)} counts; the prompt has {n_pads} "
                f"{self.template.image_pad} placeholders (one per image part)"
            )
        if not counts:
            return ids
        out: list[int] = []
        k = 0
        for i in ids:
            if i == self.image_pad_id:
                out.extend([i] * counts[k])
                k += 1
            else:
                out.append(i)
        return out
