"""retrv.model: the PyTorch definition of Qwen2.5-VL (+ Retrv-R1's ICM), written for export.

The names below load lazily (PEP 562) so that `retrv.model.config`, which is torch-free, can be read by the
runtime without importing torch.
"""

import importlib

_EXPORTS = {
    "ICMConfig": "retrv.model.config",
    "ModelConfig": "retrv.model.config",
    "TextConfig": "retrv.model.config",
    "VisionConfig": "retrv.model.config",
    "read_config": "retrv.model.config",
    "load_checkpoint": "retrv.model.loading",
    "ModelOutput": "retrv.model.qwen",
    "Qwen2_5_VL": "retrv.model.qwen",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'retrv.model' has no attribute {name!r}")
