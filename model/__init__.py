"""retrv.model: the PyTorch definition of Qwen2.5-VL (+ Retrv-R1's ICM), written for export. Imports torch."""

from retrv.model.config import ICMConfig, ModelConfig, TextConfig, VisionConfig, read_config
from retrv.model.loading import load_checkpoint
from retrv.model.qwen import ModelOutput, Qwen2_5_VL

__all__ = [
    "ICMConfig", "ModelConfig", "ModelOutput", "Qwen2_5_VL", "TextConfig", "VisionConfig", "load_checkpoint",
    "read_config",
]
