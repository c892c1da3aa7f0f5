"""PyTorch fallback quantization with bitsandbytes: the decoder's Linear layers swapped for bnb's INT8 or NF4 ones,
for the PyTorch backend (`TorchBackend(model)`) where ONNX Runtime is missing, and for QLoRA-style training.

    model = load_checkpoint(ckpt)
    counts = quantize_linears_bnb(model, "nf4")      # in place; {"quantized": n, "lm_head_kept": True}
    backend = TorchBackend(model)

Same rule as the ONNX path: only the decoder's projections are quantized; the LM head stays in float by default,
and the vision tower and the ICM are left as they are. Checked on CPU with bitsandbytes 0.50 (its CPU backend):
`Linear8bitLt(threshold=0)` is plain int8 weights with per-row scales, `Linear4bit(quant_type="nf4")` is 4-bit
NormalFloat with 64-element blocks, computing in `compute_dtype`.
"""

from __future__ import annotations

import logging

from retrv.runtime.errors import InputError, require

log = logging.getLogger(__name__)

BNB_MODES = ("int8", "nf4")


def _swap(linear, mode: str):
    bnb = require("bitsandbytes", "train")
    torch = require("torch", "train")
    weight = linear.weight.detach().float().cpu().clone()
    has_bias = linear.bias is not None
    if mode == "int8":
        # threshold=0: no fp16 outlier decomposition (LLM.int8's mixed path), i.e. plain int8 weights.
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=0.0)
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                compute_dtype=torch.float32, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        new.bias = torch.nn.Parameter(linear.bias.detach().float().cpu().clone(), requires_grad=False)
    return new.to("cpu")  # bnb quantizes on the move to a device


def quantize_linears_bnb(model, mode: str = "int8", keep_lm_head: bool = True) -> dict:
    """Swap the decoder's nn.Linear layers of a `retrv.model` Qwen2_5_VL for bitsandbytes ones, in place.
    Returns how many Linear layers were swapped and whether the LM head was kept."""
    if mode not in BNB_MODES:
        raise InputError(f"bitsandbytes mode: got {mode!r}; expected one of {list(BNB_MODES)}")
    torch = require("torch", "train")
    require("bitsandbytes", "train")
    if next(model.parameters()).device.type != "cpu":
        raise InputError("quantize_linears_bnb: got a model on a GPU; expected it on the CPU (bnb quantizes on "
                         "the move to a device: move the quantized model afterwards)")
    quantized = 0
    for parent in list(model.language_model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, _swap(child, mode))
                quantized += 1
    if not keep_lm_head:
        model.lm_head = _swap(model.lm_head, mode)
        quantized += 1
    log.info("bitsandbytes %s: %d Linear layers quantized (LM head kept: %s)", mode, quantized, keep_lm_head)
    return {"quantized": quantized, "lm_head_kept": keep_lm_head}
