"""The PyTorch fallback's bitsandbytes INT8/NF4 Linear layers, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")

from retrv.calibration.torch_quant import quantize_linears_bnb  # noqa: E402
from retrv.model import load_checkpoint  # noqa: E402
from retrv.model.tiny import write_tiny_checkpoint  # noqa: E402
from retrv.export.torch_backend import TorchBackend  # noqa: E402
from retrv.runtime.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bnb") / "ckpt", seed=5)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, None, None, torch.ones_like(ids)).logits[0].numpy()  # (S, V)


@pytest.mark.parametrize("mode, min_cos", [("int8", 0.999), ("nf4", 0.95)])
def test_bnb_linears_replace_the_decoder_projections(ckpt, mode, min_cos):
    import bitsandbytes as bnb

    ref = load_checkpoint(ckpt)
    model = load_checkpoint(ckpt)
    counts = quantize_linears_bnb(model, mode)
    layers = model.cfg.text.num_hidden_layers
    assert counts == {"quantized": 7 * layers, "lm_head_kept": True}  # q, k, v, o, gate, up, down
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert isinstance(model.language_model.layers[0].mlp.down_proj, kind)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.language_model.layers[0].self_attn.q_proj.weight.dtype in (torch.int8, torch.uint8)

    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 31]])
    a, b = _logits(ref, ids), _logits(model, ids)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > min_cos

    backend = TorchBackend(model)  # the quantized model serves the runtime's loop as is
    state = backend.start(1)
    logits = backend.step(state, np.zeros((1, 3, model.cfg.text.hidden_size), np.float32),
                          np.broadcast_to(np.arange(3), (3, 1, 3)).astype(np.int64).copy(), np.ones((1, 3), np.int64))
    assert logits.shape == (1, model.cfg.text.vocab_size) and np.isfinite(logits).all()


def test_bnb_mode_is_validated(ckpt):
    with pytest.raises(InputError, match="expected one of"):
        quantize_linears_bnb(load_checkpoint(ckpt), "fp8")
