"""The ICM attention cores as ONNX custom-domain ops and as TensorRT plugins (TensorRT's Python plugin API,
`tensorrt.plugin`, "quickly deployable plugins", TensorRT >= 10.6).

Three ops, one per core of `kernels/reference.py`, in the ONNX domain `retrv`:

| op (= plugin name)      | inputs                                        | output      | in the exported ICM graphs |
| ----------------------- | --------------------------------------------- | ----------- | -------------------------- |
| `IcmPoolAttention`      | q (K,C), k (K,L,C), v (K,L,C), mask (K,L)     | (K, C)      | every ATT1 / ATT1' layer   |
| `IcmCrossAttention`     | q (K,L,C), k (Lq,C), v (Lq,C), mask (Lq,)     | (K, L, C)   | every ATT2 layer           |
| `IcmRelationPool`       | q, k, v, query_mask, pool_q (K,C), cand_mask  | (K, C)      | none: see kernels/split.py |

Attributes: `num_heads` (int) and `plugin_namespace = "retrv"`, which is how TensorRT's ONNX parser maps a node
to a registered plugin (op type = plugin name). Masks enter as floats of the activation dtype (a Cast in the graph),
so every plugin I/O is FP32 or FP16 and one AutoTuneCombination covers it.

TensorRT side: `register_plugins()` registers shape functions (`@trtp.register`), type/tactic choices
(`@trtp.autotune`: tactic TORCH = the reference cores, TRITON = the Triton kernel; TensorRT times both at build
time) and a JIT implementation (`@trtp.impl`, a Python callback on TensorRT's stream). An engine holding these
plugins needs `register_plugins()` called (and torch, plus triton for the TRITON tactic) in the process that
deserializes it; an AOT implementation (`@trtp.aot_impl`, PTX embedded in the engine, no Python at run time) is
not written yet. tensorrt is imported on first use; a missing one raises `MissingDependencyError` with the hint.
"""

# No `from __future__ import annotations`: tensorrt.plugin reads the decorated functions' annotations as objects.

import numpy as np
import torch

from retrv.kernels import reference
from retrv.runtime.errors import MissingDependencyError

NAMESPACE = "retrv"  # ONNX domain and TensorRT plugin namespace
POOL_OP, CROSS_OP, RELATION_POOL_OP = "IcmPoolAttention", "IcmCrossAttention", "IcmRelationPool"
TACTIC_TORCH, TACTIC_TRITON = 1, 2
_REGISTERED = False


def require_trt_plugin():
    """`tensorrt.plugin`, or `MissingDependencyError` naming what to install."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "tensorrt is not installed; install it with: pip install 'retrv-edge[gpu]' (on Jetson use JetPack's "
            "system TensorRT, see docs/JETSON.md)"
        ) from None
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        import tensorrt

        raise MissingDependencyError(
            f"tensorrt {tensorrt.__version__} has no Python plugin API (tensorrt.plugin, TensorRT >= 10.6); build "
            f"the ICM engines without --icm-plugin, or upgrade TensorRT"
        ) from None
    return trtp


# ------------------------------------------------------------------------------------------------ ONNX export side
def _custom(g, op: str, out_like, *inputs, num_heads: int):
    out = g.op(f"{NAMESPACE}::{op}", *inputs, num_heads_i=num_heads, plugin_namespace_s=NAMESPACE)
    out.setType(out_like.type())
    return out


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, num_heads):
        return reference.pool(q, k, v, mask, num_heads)

    @staticmethod
    def symbolic(g, q, k, v, mask, num_heads):
        return _custom(g, POOL_OP, q, q, k, v, mask, num_heads=num_heads)


class _Cross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, num_heads):
        return reference.cross(q, k, v, mask, num_heads)

    @staticmethod
    def symbolic(g, q, k, v, mask, num_heads):
        return _custom(g, CROSS_OP, q, q, k, v, mask, num_heads=num_heads)


class _RelationPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, query_mask, pool_q, cand_mask, num_heads):
        return reference.relation_pool(q, k, v, query_mask, pool_q, cand_mask, num_heads)

    @staticmethod
    def symbolic(g, q, k, v, query_mask, pool_q, cand_mask, num_heads):
        return _custom(g, RELATION_POOL_OP, pool_q, q, k, v, query_mask, pool_q, cand_mask, num_heads=num_heads)


class OnnxPluginCores:
    """Cores that compute with the reference in eager mode and export as one `retrv::` node each under
    `torch.onnx.export(..., dynamo=False)`. Compose with `kernels.split` to export the ICM graphs for TensorRT."""

    name = "onnx-plugin"

    @staticmethod
    def pool(q, k, v, mask, num_heads):
        return _Pool.apply(q, k, v, mask.to(q.dtype), num_heads)

    @staticmethod
    def cross(q, k, v, mask, num_heads):
        return _Cross.apply(q, k, v, mask.to(q.dtype), num_heads)

    @staticmethod
    def relation_pool(q, k, v, query_mask, pool_q, cand_mask, num_heads):
        return _RelationPool.apply(q, k, v, query_mask.to(q.dtype), pool_q, cand_mask.to(q.dtype), num_heads)


def onnx_reference_ops() -> list:
    """numpy implementations of the three ops for `onnx.reference.ReferenceEvaluator(model, new_ops=...)`: a second,
    independent implementation, so an exported plugin graph is checked on a machine without TensorRT."""
    from onnx.reference.op_run import OpRun

    def softmax_pool(scores, values, axis_sum):
        scores = scores - scores.max(-1, keepdims=True)
        p = np.exp(scores)
        return np.einsum(axis_sum, p / p.sum(-1, keepdims=True), values)

    def heads(x, h):
        return x.astype(np.float32).reshape(*x.shape[:-1], h, x.shape[-1] // h)

    def bias(mask):
        return np.where(mask > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)

    def np_pool(q, k, v, mask, h):
        qh, kh, vh = heads(q, h), heads(k, h), heads(v, h)
        s = np.einsum("khd,klhd->khl", qh, kh) * qh.shape[-1] ** -0.5 + bias(mask)[:, None, :]
        return softmax_pool(s, vh, "khl,klhd->khd").reshape(q.shape)

    def np_cross(q, k, v, mask, h):
        qh, kh, vh = heads(q, h), heads(k, h), heads(v, h)
        s = np.einsum("klhd,jhd->klhj", qh, kh) * qh.shape[-1] ** -0.5 + bias(mask)
        return softmax_pool(s, vh, "klhj,jhd->klhd").reshape(q.shape)

    class IcmPoolAttention(OpRun):
        op_domain = NAMESPACE

        def _run(self, q, k, v, mask, num_heads=None, plugin_namespace=None):
            return (np_pool(q, k, v, mask, num_heads).astype(q.dtype),)

    class IcmCrossAttention(OpRun):
        op_domain = NAMESPACE

        def _run(self, q, k, v, mask, num_heads=None, plugin_namespace=None):
            return (np_cross(q, k, v, mask, num_heads).astype(q.dtype),)

    class IcmRelationPool(OpRun):
        op_domain = NAMESPACE

        def _run(self, q, k, v, query_mask, pool_q, cand_mask, num_heads=None, plugin_namespace=None):
            r = np_cross(q, k, v, query_mask, num_heads)
            return (np_pool(pool_q, r, r, cand_mask, num_heads).astype(pool_q.dtype),)

    return [IcmPoolAttention, IcmCrossAttention, IcmRelationPool]


# ------------------------------------------------------------------------------------------------- TensorRT side
def _tactics() -> list[int]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return [TACTIC_TORCH]
    return [TACTIC_TORCH, TACTIC_TRITON]


def _run_core(fn, inputs, outputs, stream: int, tactic) -> None:
    """Wrap TensorRT's device buffers as torch tensors (zero copy) and run `fn(cores, tensors)` on TensorRT's stream."""
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tensors = [torch.as_tensor(t, device="cuda") for t in inputs]
        out = torch.as_tensor(outputs[0], device="cuda")
        if tactic == TACTIC_TRITON:
            from retrv.kernels.triton_icm import TritonCores as cores
        else:
            cores = reference.TorchCores
        out.copy_(fn(cores, tensors))


def _combination(trtp, n_io: int) -> list:
    c = trtp.AutoTuneCombination()
    c.pos(list(range(n_io)), "FP32|FP16")  # every input and the output share one float type
    c.tactics(_tactics())
    return [c]


def register_plugins() -> None:
    """Register the three plugins with TensorRT (idempotent). Call before building from a plugin graph and before
    deserializing an engine built from one."""
    global _REGISTERED
    if _REGISTERED:
        return
    trtp = require_trt_plugin()
    from typing import Tuple

    TensorDesc, Tensor = trtp.TensorDesc, trtp.Tensor

    # -- IcmPoolAttention
    @trtp.register(f"{NAMESPACE}::{POOL_OP}")
    def _pool_desc(q: TensorDesc, k: TensorDesc, v: TensorDesc, mask: TensorDesc, num_heads: int) -> TensorDesc:
        return q.like()  # (K, C)

    @trtp.autotune(f"{NAMESPACE}::{POOL_OP}")
    def _pool_tune(q, k, v, mask, num_heads, outputs):
        return _combination(trtp, 5)

    @trtp.impl(f"{NAMESPACE}::{POOL_OP}")
    def _pool_impl(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, num_heads: int, outputs: Tuple[Tensor],
                   stream: int, tactic: int) -> None:
        _run_core(lambda c, t: c.pool(*t, num_heads), (q, k, v, mask), outputs, stream, tactic)

    # -- IcmCrossAttention
    @trtp.register(f"{NAMESPACE}::{CROSS_OP}")
    def _cross_desc(q: TensorDesc, k: TensorDesc, v: TensorDesc, mask: TensorDesc, num_heads: int) -> TensorDesc:
        return q.like()  # (K, L, C)

    @trtp.autotune(f"{NAMESPACE}::{CROSS_OP}")
    def _cross_tune(q, k, v, mask, num_heads, outputs):
        return _combination(trtp, 5)

    @trtp.impl(f"{NAMESPACE}::{CROSS_OP}")
    def _cross_impl(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, num_heads: int, outputs: Tuple[Tensor],
                    stream: int, tactic: int) -> None:
        _run_core(lambda c, t: c.cross(*t, num_heads), (q, k, v, mask), outputs, stream, tactic)

    # -- IcmRelationPool (the fused relation step; R stays in registers with the TRITON tactic)
    @trtp.register(f"{NAMESPACE}::{RELATION_POOL_OP}")
    def _rp_desc(q: TensorDesc, k: TensorDesc, v: TensorDesc, query_mask: TensorDesc, pool_q: TensorDesc,
                 cand_mask: TensorDesc, num_heads: int) -> TensorDesc:
        return pool_q.like()  # (K, C)

    @trtp.autotune(f"{NAMESPACE}::{RELATION_POOL_OP}")
    def _rp_tune(q, k, v, query_mask, pool_q, cand_mask, num_heads, outputs):
        return _combination(trtp, 7)

    @trtp.impl(f"{NAMESPACE}::{RELATION_POOL_OP}")
    def _rp_impl(q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor, pool_q: Tensor, cand_mask: Tensor,
                 num_heads: int, outputs: Tuple[Tensor], stream: int, tactic: int) -> None:
        _run_core(lambda c, t: c.relation_pool(*t, num_heads), (q, k, v, query_mask, pool_q, cand_mask), outputs,
                  stream, tactic)

    _REGISTERED = True
