"""Load a Hugging Face Qwen2.5-VL checkpoint directory (and a Retrv-R1 ICM) into `Qwen2_5_VL`.

Safetensors only, never pickle, never remote code. The module is built on the meta device and the tensors are
assigned, not copied, so a 7B checkpoint costs its size in memory once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from retrv.model.config import ModelConfig, read_config
from retrv.model.files import ICM_NAME, checkpoint_file, weight_files
from retrv.model.qwen import Qwen2_5_VL
from retrv.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

# Checkpoint name prefixes -> this module's. transformers 4.x (every released Qwen2.5-VL, V-Retrver-7B) saves the
# LM under `model.` and the tower under `visual.`; transformers 5.x under `model.language_model.`/`model.visual.`.
# Longest prefix first.
_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("model.", "language_model."),
    ("visual.", "visual."),
    ("lm_head.", "lm_head."),
)


def hf_to_module_name(name: str) -> str | None:
    for src, dst in _PREFIXES:
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def module_to_hf_name(name: str) -> str:
    """The transformers 4.x name every released checkpoint uses (what `retrv.model.tiny` writes)."""
    if name.startswith("language_model."):
        return "model." + name[len("language_model."):]
    return name


def _read_tensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).to(dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    return out


def read_tensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, converted to `dtype` (a shard or icm.safetensors)."""
    return _read_tensors(path, dtype)


def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    for name, t in tensors.items():
        want = expected.get(name)
        if want is not None and tuple(want.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(t.shape)}; expected {tuple(want.shape)}"
            )
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{source}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        log.warning("%s: ignoring %d tensors this model does not use, e.g. %s", source, len(unexpected), unexpected[0])
    module.load_state_dict({n: tensors[n] for n in expected}, strict=True, assign=True)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Qwen2_5_VL:
    """A Hugging Face Qwen2.5-VL directory -> `Qwen2_5_VL` in eval mode (with the ICM if `icm.safetensors` is there)."""
    root = Path(path)
    cfg: ModelConfig = read_config(root)
    icm_file = root / ICM_NAME
    if cfg.icm is not None and not os.path.lexists(icm_file):
        raise CheckpointError(f"{root}: retrv_config.json declares an ICM but icm.safetensors is missing")
    if cfg.icm is None and os.path.lexists(icm_file):
        raise CheckpointError(f"{icm_file}: present but retrv_config.json has no 'icm' section describing it")

    with torch.device("meta"):
        model = Qwen2_5_VL(cfg)

    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(root):
        for name, t in _read_tensors(file, dtype).items():
            mapped = hf_to_module_name(name)
            tensors[mapped if mapped is not None else name] = t
    if "lm_head.weight" not in tensors and cfg.text.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors.get("language_model.embed_tokens.weight")
        if tensors["lm_head.weight"] is None:
            raise CheckpointError(f"{root}: tensor 'model.embed_tokens.weight' is missing")
    base = {n: t for n, t in tensors.items() if not n.startswith("icm.")}
    _assign(_WithoutICM(model), base, str(root))
    if model.icm is not None:
        _assign(model.icm, _read_tensors(checkpoint_file(root, ICM_NAME), dtype), str(icm_file))
    return model.to(device).eval()


class _WithoutICM(torch.nn.Module):
    """A view of the model's parameters minus the ICM, which loads from its own file."""

    def __init__(self, model: Qwen2_5_VL) -> None:
        super().__init__()
        self.visual, self.language_model, self.lm_head = model.visual, model.language_model, model.lm_head
