"""Synthetic chain of thought in Retrv-R1's four phases, written from the ground truth of a window of candidates.

    beige: yellow cross bottom stripe.            (1) imagine the ideal result
    1+ 2- 3+ 4- 5- 6- 7- 8- 9- 10-                (2) eliminate the clear negatives (-), keep look-alikes (+)
    <inspection-index-start>1<inspection-index-end>[candidate 1's full tokens]
    beige: yellow cross left stripe. no                                          (3) inspect the hard ones:
    <inspection-index-start>3<inspection-index-end>[candidate 3's full tokens]       describe what the full
    beige: yellow cross bottom stripe. yes                                           tokens show, compare
    </think><answer>3</answer>                    (4) the index

Phase 2 gives every candidate a verdict, in window order, rather than listing the dropped ones: each verdict is a
local decision (the index just written names the candidate to read, as its label does in the prompt), where a
list of drops asks the model to scan for the next dropped index, and run 1's model never learned that scan (it
wrote "drop 1 2 4 ..." and answered 1). Phase 2 drops every candidate whose scene differs from the target in what two compressed tokens can carry: the
background and which objects are present (their shapes and colours). Where an object is and its few-pixel mark
are what the compressed tokens cannot carry: the ICM pools a candidate's tokens with attention that has no
positional encoding, so `t_con`/`t_rel` are blind to layout, and the detail is a few pixels of one token by the
dataset's design. (An earlier cut that dropped position negatives too left the model nothing to inspect: the
trained embedder already separates details, and position and shape look-alikes were what the coarse stage
confused, median rank 2 on validation.) The survivors differ from the target at most in position or detail,
and phase 3 inspects them in coarse-rank order until it reaches the target, so the reasoning costs one
inspection per look-alike ranked above the target, none when the target is the only survivor. The text is short
on purpose: every token is a decoder step the runtime pays per query.

After each inspection the reasoning describes the candidate in the words of phase 1 and says whether it is the
one: the comparison becomes text against text (the description against the ideal, word by word), and describing
an image is what captioning pretraining taught the model. A bare "next inspection or answer" decision asks the
model to compare the query's words with image tokens directly, which run 1's model never learned.

When the inspection budget runs out (the runtime answers an inspection with a marker instead of the tokens), the
reasoning stops inspecting and answers: training on that case teaches the model to answer from the compressed
tokens alone rather than to stall, which is what a budget of 0 asks of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from retrv.runtime.rerank.answer import parse_index
from retrv.runtime.rerank.prompt import RerankTemplate
from retrv.train.scene import Scene

INSPECT_START, INSPECT_END = "<inspection-index-start>", "<inspection-index-end>"


def coarse_key(scene: Scene) -> tuple:
    """What a scene is without its layout and fine detail: the background and the objects present."""
    return (scene.background,) + tuple(sorted((o.shape, o.colour) for o in scene.objects))


def ideal_text(scene: Scene) -> str:
    """Phase 1: the ideal result in a few words, e.g. 'beige: yellow cross bottom stripe, red star left.'"""
    objs = [f"{o.colour} {o.shape} {o.position}" + (f" {o.detail}" if o.detail else "") for o in scene.objects]
    return f"{scene.background}: " + ", ".join(objs) + "."


@dataclass(frozen=True)
class CotPlan:
    ideal: str
    drop: tuple[int, ...]  # 1-based window indices eliminated in phase 2
    inspect: tuple[int, ...]  # 1-based, in the order inspected
    answer: int  # 1-based
    size: int  # candidates in the window
    seen: tuple[str, ...] = ()  # phase 3: the description of each inspected candidate, as `ideal_text` words it

    @property
    def keep(self) -> tuple[bool, ...]:
        """Per candidate in window order: survives phase 2 (a look-alike of the target, or the target)."""
        return tuple(i not in self.drop for i in range(1, self.size + 1))

    def __post_init__(self) -> None:
        if self.answer in self.drop:
            raise ValueError(f"CoT plan: answer {self.answer} is also dropped ({list(self.drop)})")


INSPECT_ORDERS = ("survivors", "coarse")


def plan_cot(target: Scene, window: list[Scene], answer: int, order: str = "survivors") -> CotPlan:
    """`window`: the scenes of the candidates in window order; `answer`: 1-based index of the target in it.
    `order`: phase 3 inspects phase 2's survivors in coarse order ("survivors", the paper's reading), or every
    candidate in coarse order ("coarse": phase 2's verdicts are written but do not choose what is inspected)."""
    if order not in INSPECT_ORDERS:
        raise ValueError(f"CoT plan: inspect order {order!r}; expected one of {INSPECT_ORDERS}")
    if not 1 <= answer <= len(window) or window[answer - 1].key() != target.key():
        raise ValueError(f"CoT plan: candidate {answer} of {len(window)} is not the target")
    key = coarse_key(target)
    survivors = [i for i, s in enumerate(window, 1) if coarse_key(s) == key]
    drop = tuple(i for i in range(1, len(window) + 1) if i not in survivors)
    if order == "coarse":
        inspect = tuple(range(1, answer + 1)) if len(survivors) > 1 else ()
    else:
        inspect = tuple(survivors[:survivors.index(answer) + 1]) if len(survivors) > 1 else ()
    return CotPlan(ideal_text(target), drop, inspect, answer, len(window),
                   tuple(ideal_text(window[i - 1]) for i in inspect))


def cot_events(plan: CotPlan, inspect_budget: int | None = None) -> list[tuple]:
    """What the model writes and what the runtime appends, in order:
    ("write", text) | ("inspect", i, granted): the model writes the inspection markup for candidate i; the
    runtime appends its full tokens (granted) or the inspection-budget marker (not granted)."""
    budget = len(plan.inspect) if inspect_budget is None else inspect_budget
    verdicts = " ".join(f"{i}{'+' if kept else '-'}" for i, kept in enumerate(plan.keep, 1))
    events: list[tuple] = [("write", f"{plan.ideal}\n{verdicts}\n")]
    for n, i in enumerate(plan.inspect):
        events.append(("inspect", i, n < budget))
        if n >= budget:
            break
        if plan.seen:
            events.append(("write", f"{plan.seen[n]} {'yes' if i == plan.answer else 'no'}\n"))
    events.append(("write", f"</think><answer>{plan.answer}</answer>"))
    return events


def cot_text(events: list[tuple], template: RerankTemplate | None = None, shown=lambda i: "") -> str:
    """The whole reasoning as text (the model's tokens and, via `shown(i)`, a stand-in for appended tokens)."""
    t = template or RerankTemplate()
    out = []
    for ev in events:
        if ev[0] == "write":
            out.append(ev[1])
        else:
            _, i, granted = ev
            appended = t.inspected_prefix.format(i=i) + shown(i) + "\n" if granted else t.marker_inspect_budget
            out.append(f"{INSPECT_START}{i}{INSPECT_END}{appended}")
    return "".join(out)


def own_text(events: list[tuple]) -> str:
    """Only what the model itself writes (no appended tokens, no budget markers): what the format reward reads."""
    return "".join(ev[1] if ev[0] == "write" else f"{INSPECT_START}{ev[1]}{INSPECT_END}" for ev in events)


_ANSWER = re.compile(r"</think>\s*<answer>(.*?)</answer>\s*$", re.S)
_INSPECTION = re.compile(re.escape(INSPECT_START) + r"(.*?)" + re.escape(INSPECT_END), re.S)


def parse_cot(text: str) -> tuple[list[int | None], int | None]:
    """-> (inspected indices, answer) read back with the runtime's `parse_index`; None where unparsable."""
    m = _ANSWER.search(text)
    return [parse_index(s) for s in _INSPECTION.findall(text)], (parse_index(m.group(1)) if m else None)
