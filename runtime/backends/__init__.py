"""Backends behind one interface, opened by one function, `open_backend(pack, name)`.

ONNX Runtime (`ort`) and TensorRT (`trt`) live here, both `graph.GraphBackend`s over runners (`runner.Runner`:
named numpy inputs -> named numpy outputs, checked against the pack manifest). The PyTorch fallback registers itself
as "torch" from `retrv.export.torch_backend` (it needs the model, above the runtime); a scripted model for tests
lives in tests/. Importing this package imports neither onnxruntime nor tensorrt: `open_backend` does, for the
backend it opens.
"""

from __future__ import annotations

from pathlib import Path

from retrv.runtime.backends.base import Backend, registered_backend
from retrv.runtime.errors import InputError, MissingDependencyError

BACKENDS = ("auto", "ort", "trt", "torch")


def open_backend(pack, name: str = "auto", checkpoint: str | Path | None = None, provider: str = "auto",
                 threads: int | None = None, cache_dir="default", inter_op_threads: int = 1) -> Backend:
    """The backend `name` for an open `pack`.

    auto: TensorRT where the pack has engines built for this very device, else ONNX Runtime when installed, else
    the PyTorch fallback (which needs the source `checkpoint`). `provider`, `threads`, `inter_op_threads` and
    `cache_dir` are ONNX Runtime's (see `ort.OrtBackend`)."""
    if name not in BACKENDS:
        raise InputError(f"--backend: got {name!r}; expected one of {list(BACKENDS)}")
    if name == "trt" or (name == "auto" and _trt_ready(pack)):
        from retrv.runtime.backends.trt import TrtBackend

        return TrtBackend(pack)  # refuses engines whose fingerprint does not match this device
    if name == "auto":
        try:
            import onnxruntime  # noqa: F401

            name = "ort"
        except ImportError:
            name = "torch"
    if name == "ort":
        from retrv.runtime.backends.ort import OrtBackend

        return OrtBackend(pack, provider=provider, threads=threads, cache_dir=cache_dir,
                          inter_op_threads=inter_op_threads)
    factory = registered_backend("torch")
    if factory is None:  # the PyTorch fallback lives above the runtime (it needs the model): the app layer loads it
        raise MissingDependencyError("--backend torch: the PyTorch fallback is not loaded; expected `import "
                                     "retrv.export.torch_backend` first (pip install 'retrv-edge[export]')")
    return factory(pack, checkpoint)


def _trt_ready(pack) -> bool:
    """auto picks TensorRT only where this pack has engines built for this very device (never raises)."""
    if not any(e.role.startswith("trt_") for e in pack.manifest.files.values()):
        return False
    if pack.has("embedder_image") or pack.has("embedder_text"):
        # an optimum embedder's graphs have no engines yet (`retrv build-engine` does not build them): auto keeps
        # the whole pack on ONNX Runtime rather than pick TensorRT and fail at the first embedding
        return False
    from retrv.runtime.backends.trt import engines_match

    return engines_match(pack)


__all__ = ["BACKENDS", "Backend", "open_backend"]
