"""The reranker's prompt: pieces of text, image tokens and ICM slots turned into decoder inputs.

Retrv-R1 released no prompt, so the wording is ours and lives in one frozen dataclass that the training path uses
too (a model trained on one wording is served with the same wording). A window's prompt, as the decoder sees it:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\nQuery: [query image] {query text}\\nCandidates:\\n
    [1] <slot><slot>\\n[2] <slot><slot>\\n ...            (ICM mode: t_con, t_rel of each candidate)
    [1] <|vision_start|>{image tokens}<|vision_end|> {caption}\\n ...   (full mode: no ICM in the model)
    {instruction}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from retrv.runtime.inputs import positions
from retrv.runtime.errors import InputError
from retrv.runtime.inputs.prompt import ChatTemplate

SLOT_TOKEN = "<|vision_pad|>"  # an id Qwen2.5-VL reserves and never emits; carries t_con / t_rel embeddings


@dataclass(frozen=True)
class RerankTemplate:
    system: str = "You are a helpful assistant."
    query_prefix: str = "Query: "
    candidates_header: str = "\nCandidates:\n"
    candidate_label: str = "[{i}] "
    instruction: str = (
        "Which candidate matches the query best? Think step by step. To look closely at candidate i, write "
        "<inspection-index-start>i<inspection-index-end>. Give the final answer as <answer>i</answer>."
    )
    # V-Retrver (listwise with tools). The system prompt is the released one word for word: `system_prompt` of
    # verl-tool/examples/data_preprocess/pixel_reasoner/prepare_lamra_train.py, the variant `process_lamra_data`
    # writes into the data and the one the evaluation path (sliding_window_processor.py) keeps, rewriting only the
    # candidates of the user turn. (The crop_image line is one "}" short of valid JSON in the release; kept as is:
    # it is what the model was trained on.) `ListwiseFormat` picks the guideline and the target_image wording.
    listwise_system: str = (
        "You are a helpful assistant for multimodal retrieval tasks.\n\n# Tools\n\nYou may call one or more "
        "functions to assist with the user query.\n\nYou are provided with function signatures within "
        "<tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "crop_image", "description": "Zoom in on the image based on the '
        'bounding box coordinates.", "parameters": {"type": "object", "properties": {"bbox_2d": {"type": "array", '
        '"description": "coordinates for bounding box of the area you want to zoom in. minimum value is 0 and maximum '
        'value is the width/height of the image.", "items": {"type": "number"}}, "target_image": {"type": "number", '
        '"description": "The index of the image to crop. Index from 1 to the number of images. Choose 1 to operate '
        'on original image."}}, "required": ["bbox_2d", "target_image"]}}\n'
        '{"type": "function", "function": {"name": "select_images", "description": "Select exactly one candidate '
        'image for detailed analysis from the provided candidate list.", "parameters": {"type": "object", '
        '"properties": {"target_images": {"type": "array", "description": "List containing exactly one candidate '
        'image index to select for detailed analysis (e.g., [3] to select candidate 3).", "items": {"type": '
        '"integer", "description": "Candidate image index from 1 to the number of candidates."}, "minItems": 1, '
        '"maxItems": 1}}, "required": ["target_images"]}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call>"
    )
    # target_image as the released prompt describes it (1-based over the images shown), and as the released tool
    # server serves it (0 = the query image): `ListwiseFormat.target_image_base` 1 keeps the first, 0 swaps in the
    # second so that prompt and tool agree either way.
    target_image_base1: str = "Index from 1 to the number of images. Choose 1 to operate on original image."
    target_image_base0: str = ("Choose 0 to operate on the query image, or 1 to the number of candidates to operate "
                                "on that candidate's image.")
    listwise_candidate_label: str = "({i}) "  # then "<image>{text}", back to back, as the release lays them out
    # The released guideline (`guideline` in prepare_lamra_train.py) asks for one number; the released evaluation
    # merger reads a ranked list. answer_format "index" renders the first verbatim, "list" (the default) the same
    # guideline asking for the list.
    listwise_guidelines_index: str = (
        "Guidelines: You are given a query (which can be text, image, or both) and multiple candidate items (which "
        "can be text, image, or both). Your task is to evaluate each candidate against the query and select the "
        "best match. Determine if it is beneficial to employ the given visual operations (tools). You can use the "
        "following tools:\n1. `crop_image`: Zoom in on specific areas of the query image or selected candidate "
        "images for detailed analysis\n2. `select_images`: Select specific candidate images from the provided list "
        "for detailed comparison\n\nAnalyze the visual and textual features step by step and provide your final "
        "answer in the format:\n<think>Your reasoning process here</think><answer>Directly answer with the most "
        "matching number</answer>"
    )
    listwise_guidelines: str = (
        "Guidelines: You are given a query (which can be text, image, or both) and multiple candidate items (which "
        "can be text, image, or both). Your task is to evaluate each candidate against the query and rank them from "
        "the best match to the worst. Determine if it is beneficial to employ the given visual operations (tools). "
        "You can use the following tools:\n1. `crop_image`: Zoom in on specific areas of the query image or "
        "selected candidate images for detailed analysis\n2. `select_images`: Select specific candidate images from "
        "the provided list for detailed comparison\n\nAnalyze the visual and textual features step by step and "
        "provide your final answer in the format:\n<think>Your reasoning process here</think><answer>[the candidate "
        "numbers from the best match to the worst, separated by commas]</answer>"
    )
    # Prepended to the observation of a call the tool server refused, as the released agent loop does
    # (llm_agent/manager.py).
    invalid_action: str = "Your action is not valid, please check the format and try again."
    tool_open: str = "<tool_call>"
    tool_close: str = "</tool_call>"
    # A tool result re-enters the conversation as a user turn, then the assistant continues: the chat template's
    # markup (`PromptBuilder.observation`), not this template's wording.
    marker_tool_budget: str = "Tool budget exhausted; answer with what you have."
    think_open: str = "<think>\n"
    think_close: str = "</think>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"
    inspected_prefix: str = "\n[{i}] "
    marker_no_candidate: str = "\n(no candidate {i})\n"
    marker_repeat: str = "\n(candidate {i} already inspected)\n"
    marker_inspect_budget: str = "\n(inspection budget exhausted)\n"
    marker_token_budget: str = "\n(token budget exhausted)\n"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Piece:
    """A run of the prompt: token ids, optionally with embeddings that replace the table's (image tokens, ICM
    slots), and for image tokens the grid (t, h, w) that gives them M-RoPE image positions."""

    ids: list[int]
    embeds: np.ndarray | None = None  # (len(ids), H)
    grid: tuple[int, int, int] | None = None


@dataclass
class QueryInput:
    text: str | None
    image_tokens: np.ndarray | None = None  # (M, H) merged vision tokens
    grid: tuple[int, int, int] | None = None
    image: object = None  # the source image (path or PIL), for tools that crop it


@dataclass
class CandidateInput:
    did: str
    text: str | None
    image_tokens: np.ndarray | None = None  # (L, H), dequantized from the token cache
    grid: tuple[int, int, int] | None = None
    t_con: np.ndarray | None = None  # (H,) from the cache (Retrv-R1)
    score: float = 0.0  # coarse-stage similarity
    image: object = None  # the source image (path or PIL), for tools that crop it


class PromptBuilder:
    def __init__(self, tokenizer, cfg, embed_table: np.ndarray, template: RerankTemplate | None = None) -> None:
        self.tok, self.cfg, self.table = tokenizer, cfg, embed_table
        self.t = template or RerankTemplate()
        self.chat: ChatTemplate = getattr(tokenizer, "template", None) or ChatTemplate()  # all chat markup
        ids = cfg.tokens
        self.image_id = ids.image_token_id
        self.vision_start, self.vision_end = ids.vision_start_token_id, ids.vision_end_token_id
        self.slot_id = tokenizer.token_id(SLOT_TOKEN)
        self.merge = cfg.vision.spatial_merge_size

    # -- pieces ---------------------------------------------------------------------------------------------------
    def text(self, s: str) -> Piece:
        return Piece(self.tok.encode_text(s))

    def image(self, tokens: np.ndarray, grid) -> list[Piece]:
        t, h, w = (int(x) for x in grid)
        if tokens.shape[0] != t * h * w // self.merge**2:
            raise InputError(f"image tokens: got {tokens.shape[0]}; expected t*h*w/merge^2 = "
                             f"{t * h * w // self.merge ** 2} for grid {[t, h, w]}")
        return [Piece([self.vision_start]), Piece([self.image_id] * tokens.shape[0], tokens, (t, h, w)),
                Piece([self.vision_end])]

    def query(self, q: QueryInput) -> list[Piece]:
        pieces = [self.text(self.t.query_prefix)]
        if q.image_tokens is not None:
            pieces += self.image(q.image_tokens, q.grid)
        if q.text:
            pieces.append(self.text((" " if q.image_tokens is not None else "") + q.text))
        return pieces

    def full_candidate(self, c: CandidateInput) -> list[Piece]:
        pieces = []
        if c.image_tokens is not None and len(c.image_tokens):
            pieces += self.image(c.image_tokens, c.grid)
        if c.text:
            pieces.append(self.text((" " if pieces else "") + c.text))
        return pieces

    def window_prompt(self, q: QueryInput, cands: list[CandidateInput], icm: np.ndarray | None) -> list[Piece]:
        """Retrv-R1's window: `icm` (n, 2, H) [t_con, t_rel] per candidate, or None for full tokens."""
        t = self.t
        pieces = [self.text(self.chat.turn("system", t.system) + self.chat.open_turn("user"))]
        pieces += self.query(q)
        pieces.append(self.text(t.candidates_header))
        for i, c in enumerate(cands, 1):
            pieces.append(self.text(t.candidate_label.format(i=i)))
            if icm is not None:
                pieces.append(Piece([self.slot_id, self.slot_id], np.asarray(icm[i - 1], dtype=np.float32)))
            else:
                pieces += self.full_candidate(c)
            pieces.append(self.text("\n"))
        pieces.append(self.text(t.instruction + self.chat.handover("assistant") + t.think_open))
        return pieces

    def listwise_system(self, target_image_base: int = 1) -> str:
        t = self.t
        return t.listwise_system if target_image_base == 1 else t.listwise_system.replace(t.target_image_base1,
                                                                                          t.target_image_base0)

    def listwise_prompt(self, q: QueryInput, cands: list[CandidateInput], fmt=None) -> list[Piece]:
        """V-Retrver's window as the released code lays it out: the system prompt, then "Query: ...", then
        "Candidates:(1) <image>{text}(2) <image>{text}..." back to back, "\n\n" and the guideline; no pre-opened
        <think>. Text between images is encoded as one run (a tokenizer splits it exactly as the release's does).
        `fmt`: a `ListwiseFormat` (None: the defaults)."""
        t = self.t
        base = 1 if fmt is None else fmt.target_image_base
        guideline = t.listwise_guidelines_index if fmt is not None and fmt.answer_format == "index" \
            else t.listwise_guidelines
        parts: list = [self.chat.turn("system", self.listwise_system(base)) + self.chat.open_turn("user")
                       + t.query_prefix]
        if q.image_tokens is not None:
            parts += self.image(q.image_tokens, q.grid)
        if q.text:
            parts.append((" " if q.image_tokens is not None else "") + q.text)
        parts.append("\nCandidates:")
        for i, c in enumerate(cands, 1):
            parts.append(t.listwise_candidate_label.format(i=i))
            if c.image_tokens is not None and len(c.image_tokens):
                parts += self.image(c.image_tokens, c.grid)
            parts.append(c.text or "")
        parts.append(f"\n\n{guideline}" + self.chat.handover("assistant"))
        return self.runs(parts)

    def runs(self, parts: list) -> list[Piece]:
        """Strings and pieces -> pieces, adjacent strings joined and encoded as one."""
        pieces, text = [], ""
        for part in parts:
            if isinstance(part, str):
                text += part
                continue
            if text:
                pieces.append(self.text(text))
                text = ""
            pieces.append(part)
        if text:
            pieces.append(self.text(text))
        return pieces

    def observation(self, text: str) -> str:
        """A tool result's text as it re-enters the conversation: a user turn, after which the assistant goes on
        (`text` may be split where images go: the first part carries the opening, `observation_end` the close)."""
        return self.chat.handover("user") + text

    def observation_end(self) -> str:
        return self.chat.handover("assistant")

    # -- pieces -> decoder inputs ----------------------------------------------------------------------------------
    def assemble(self, pieces: list[Piece], start_position: int) -> tuple[list[int], np.ndarray, np.ndarray]:
        """-> (ids, embeds (S, H) float32, position_ids (3, 1, S)), positions starting at `start_position`."""
        ids = [i for p in pieces for i in p.ids]
        embeds = np.asarray(self.table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)
        at, grids = 0, []
        for p in pieces:
            if p.embeds is not None:
                embeds[at:at + len(p.ids)] = p.embeds
            if p.grid is not None:
                grids.append(p.grid)
            at += len(p.ids)
        # Only pieces that carry a grid are images: a model can write <|image_pad|> in its own text, and that token
        # must get a text position, so image runs are marked by piece, not by matching the id.
        marked = np.asarray([i if p.grid is not None else -1 for p in pieces for i in p.ids], dtype=np.int64)
        pos, _ = positions.rope_index(
            marked[None], np.asarray(grids, dtype=np.int64) if grids else None, None,
            image_token_id=self.image_id, spatial_merge_size=self.merge,
        )
        return ids, embeds, pos + start_position

    def query_tokens(self, q: QueryInput) -> np.ndarray:
        """T_q for the ICM's relation step: the query's text embeddings and image tokens, (Lq, H)."""
        parts = []
        if q.image_tokens is not None:
            parts.append(np.asarray(q.image_tokens, dtype=np.float32))
        if q.text:
            parts.append(np.asarray(self.table[np.asarray(self.tok.encode_text(q.text))], dtype=np.float32))
        if not parts:
            raise InputError("query: got neither text nor image; expected at least one")
        return np.concatenate(parts, axis=0)

    def candidate_tokens(self, c: CandidateInput) -> np.ndarray:
        """T_c: the candidate's image tokens then its caption's embeddings, (L, H)."""
        parts = []
        if c.image_tokens is not None and len(c.image_tokens):
            parts.append(np.asarray(c.image_tokens, dtype=np.float32))
        if c.text:
            parts.append(np.asarray(self.table[np.asarray(self.tok.encode_text(c.text))], dtype=np.float32))
        if not parts:
            raise InputError(f"candidate {c.did!r}: no image tokens and no text; expected at least one")
        return np.concatenate(parts, axis=0)


def pad_batch(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length (L_i, H) -> (n, L_max, H) and an int64 (n, L_max) mask."""
    n, h = len(seqs), seqs[0].shape[1]
    longest = max(s.shape[0] for s in seqs)
    out = np.zeros((n, longest, h), dtype=np.float32)
    mask = np.zeros((n, longest), dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return out, mask
