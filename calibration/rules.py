"""What stays in float: the exclusion rule, derived from each graph rather than from a hand-kept list of names.

Only `MatMul` nodes with a constant weight are candidates (after ORT's Gemm -> MatMul + Add rewrite, so the vision
tower's Linear layers are MatMuls too). Everything else stays in float by op type, because it is never handed to
the quantizer: RMSNorm (Pow, ReduceMean, Sqrt, Div, Mul), the rotary math (Cos, Sin, Neg, Mul, Concat, Slice),
Softmax, the masks. Among the MatMuls, these are kept:

- `activation_matmul`: a MatMul with no initializer input, i.e. the attention scores Q.K^T and context P.V.
  Both sides are activations (rotated keys, softmax probabilities) whose ranges change with every prompt, and
  they hold no weights, so quantizing them saves no bytes.
- `lm_head`: node name contains `/lm_head/` (decoder): the logits the answer is read from. Never given to the mode's
  quantizer: it stays fp32 or becomes MatMulNBits by the config's own `lm_head` setting (`head.quantize_head`).
- `icm_attention`: node name contains `/attn/` (or `/attn_N/`, a module called again) in `icm_content` / `icm_relation`: the ICM's learned-query pooling
  and cross-attention, whose two tokens per candidate carry everything the LM learns about it.

The rule's patterns, the counts of quantized and kept MatMuls and the kept node names go into the file's
`quantization` entry in the manifest.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

QUANTIZED_OP_TYPES = ("MatMul",)
FLOAT_BY_OP_TYPE = "RMSNorm (Pow/ReduceMean/Sqrt/Div/Mul), rotary (Cos/Sin/Neg/Mul/Concat), Softmax, masks: op " \
                   "types never given to the quantizer"
PATTERNS = {
    "activation_matmul": "MatMul without a constant (initializer) input: attention Q.K^T and P.V",
    "lm_head": "MatMul named */lm_head/* (decoder): not the mode's quantizer's; fp32 or MatMulNBits per --lm-head",
    "icm_attention": "MatMul named */attn/* in icm_content/icm_relation: the ICM's pooling and cross-attention",
    "sensitive": "MatMul named */<name>/* for a name in the mode's keep_matmuls (decoder): measured sensitive",
}
ICM_ROLES = ("icm_content", "icm_relation")


@dataclass(frozen=True)
class Plan:
    """The MatMuls of one graph split into those to quantize and those kept in float (name -> reason)."""

    role: str
    quantize: tuple[str, ...]
    keep: dict[str, str] = field(default_factory=dict)

    @property
    def exclude(self) -> list[str]:
        return sorted(self.keep)

    def to_dict(self) -> dict:
        reasons = Counter(self.keep.values())
        return {
            "op_types_quantized": list(QUANTIZED_OP_TYPES),
            "float_by_op_type": FLOAT_BY_OP_TYPE,
            "excluded_patterns": {r: PATTERNS[r] for r in sorted(reasons)},
            "matmuls_quantized": len(self.quantize),
            "matmuls_kept": len(self.keep),
            "kept_by_reason": dict(sorted(reasons.items())),
            "kept_nodes": self.exclude,
        }


# the ICM's attention modules, and a second call of one (the tracer names it /attn_1/)
ICM_ATTENTION = re.compile(r"/attn(_\d+)?/")


def of_projection(name: str, projections: tuple[str, ...]) -> bool:
    """Whether node `name` (e.g. /language_model/layers.3/mlp/down_proj/MatMul) belongs to one of `projections`."""
    return any(f"/{p}/" in name for p in projections)


def plan_graph(model, role: str, keep_matmuls: tuple[str, ...] = ()) -> Plan:
    """Classify every MatMul of `model` (an onnx.ModelProto, Gemm already rewritten) for the graph `role`."""
    constants = {t.name for t in model.graph.initializer}
    quantize, keep = [], {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES:
            continue
        name = node.name
        if not any(i in constants for i in node.input):
            keep[name] = "activation_matmul"
        elif role == "decoder" and "/lm_head/" in name:
            keep[name] = "lm_head"
        elif role in ICM_ROLES and ICM_ATTENTION.search(name):
            keep[name] = "icm_attention"
        elif role == "decoder" and of_projection(name, keep_matmuls):
            keep[name] = "sensitive"
        else:
            quantize.append(name)
    return Plan(role=role, quantize=tuple(quantize), keep=keep)
