"""Everything under tests/gpu needs CUDA: marked `gpu`, and skipped with the reason when CUDA is unavailable."""

import pytest


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed; the GPU tests drive CUDA through it"
    if not torch.cuda.is_available():
        return f"CUDA is not available (torch {torch.__version__}, cuda build {torch.version.cuda}); needs an NVIDIA GPU"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_reason()
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
