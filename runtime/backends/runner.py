"""The runner protocol (Polygraphy's shape): one graph, named numpy inputs -> named numpy outputs.

    with OrtRunner(...) as runner:
        outputs = runner.infer({"patches": patches, ...})  # {"image_tokens": array}

Every runner checks a feed against the graph's I/O record in the pack manifest (what `GraphSpec` wrote:
`{"inputs": {name: {"dtype", "shape"}}, "outputs": {...}}`) before it runs, so a wrong feed fails with one line
naming the graph, the input, what came and what was expected, whatever executes it (ONNX Runtime, TensorRT).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from retrv.runtime.errors import InputError


def check_feed(owner: str, name: str, array: np.ndarray, dtype: str, shape: tuple) -> None:
    """Raise a one-line InputError unless `array` has `dtype` and a shape matching `shape` (ints fixed, strings
    free): `decoder.onnx input 'position_ids': got shape (1, 7); expected (3, batch, seq)`."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"{owner} input '{name}': got {type(array).__name__}; expected a numpy array")
    if array.dtype != np.dtype(dtype):
        raise InputError(f"{owner} input '{name}': got dtype {array.dtype}; expected {dtype}")
    want = "(" + ", ".join(str(d) for d in shape) + ")"
    if array.ndim != len(shape) or any(isinstance(d, int) and a != d for a, d in zip(array.shape, shape)):
        raise InputError(f"{owner} input '{name}': got shape {tuple(array.shape)}; expected {want}")


class Runner(ABC):
    """One graph behind `infer(feed) -> outputs`. `name` is the graph's file name (it starts every error);
    `spec` its manifest I/O record. Subclasses implement `infer_impl`, which runs a feed already checked."""

    def __init__(self, name: str, spec: dict) -> None:
        self.name, self.spec = name, spec

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - a runner that holds nothing has nothing to release
        pass

    @property
    def input_names(self) -> list[str]:
        return list(self.spec["inputs"])

    @property
    def output_names(self) -> list[str]:
        return list(self.spec["outputs"])

    def conform(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float arrays converted to the float type the graph declares (fp16 packs take fp16); nothing else is
        converted, so a wrong integer type or shape still fails `check` with a message."""
        out = {}
        for name, value in feed.items():
            ts = self.spec["inputs"].get(name)
            if ts is not None and isinstance(value, np.ndarray) and value.dtype.kind == "f":
                value = value.astype(ts["dtype"], copy=False)
            out[name] = value
        return out

    def check(self, feed: dict[str, np.ndarray], on_device=()) -> None:
        """Every declared input present with its dtype and shape; names in `on_device` are bound by the caller
        (a KV cache already on the device) and checked by the executor instead."""
        for name, ts in self.spec["inputs"].items():
            if name in on_device:
                continue
            if name not in feed:
                raise InputError(f"{self.name}: input '{name}' is missing; expected inputs {self.input_names}")
            check_feed(self.name, name, feed[name], ts["dtype"], tuple(ts["shape"]))

    def infer(self, feed: dict[str, np.ndarray], outputs: list[str] | None = None, **options) -> dict:
        """Named inputs -> the named outputs (default: all the graph's), after `conform` and `check`.
        `options` are the executor's own (TensorRT: `profile`, `device`)."""
        feed = self.conform(feed)
        self.check(feed, on_device=options.get("device") or ())
        return self.infer_impl(feed, list(outputs) if outputs else self.output_names, **options)

    @abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray], outputs: list[str], **options) -> dict[str, np.ndarray]:
        """Run a checked feed; return {name: array} for `outputs`."""
