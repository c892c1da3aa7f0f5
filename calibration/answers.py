"""The gate's third figure: does the quantized pack's reranker pick what the fp32 pack's picks?

A small query set is made from held-out corpus items: every captioned item's caption is a query over the items'
images (the window holds them all), reranked by the runtime's own loop on ONNX Runtime under a short think budget.
The answers (the index ranked first) of the two packs are compared item by item.
"""

from __future__ import annotations

from pathlib import Path

from retrv.calibration.gates import AnswerFn
from retrv.calibration.readers import CalibItem
from retrv.runtime.rerank.budget import Budget

THINK = 24  # the gate compares decisions, not essays: a short budget, forced answers are constrained and valid
MAX_CANDIDATES = 8


def reranker_answers(items: list[CalibItem], think: int = THINK) -> AnswerFn | None:
    """An `answer_agreement` callable over `items`, or None when they hold fewer than two images or no caption."""
    images = [it.image for it in items if it.image][:MAX_CANDIDATES]
    queries = [it.text for it in items if it.text]
    if len(images) < 2 or not queries:
        return None

    def answers(pack_dir: Path) -> list[int]:
        from retrv.runtime.backends.ort import OrtBackend
        from retrv.runtime.pack import Pack
        from retrv.runtime.rerank.loop import Reranker
        from retrv.runtime.rerank.prompt import CandidateInput, QueryInput
        from retrv.runtime.retriever import Components

        pack = Pack.open(pack_dir)
        comps = Components(pack, OrtBackend(pack, cache_dir=None))
        encoded = comps.vision(images)
        cands = [CandidateInput(f"c{i}", None, tokens, grid, image=img)
                 for i, ((tokens, grid), img) in enumerate(zip(encoded, images))]
        rr = Reranker(comps.backend, comps.tokenizer, comps.cfg, comps.table, method=pack.manifest.method,
                      image_encoder=comps.vision, fmt=pack.manifest.extra.get("rerank"))
        budget = Budget(think=think, inspect=1, tool=1)
        return [rr.rerank(QueryInput(q), cands, budget, window=len(cands), stride=len(cands)).order[0]
                for q in queries]

    return answers
