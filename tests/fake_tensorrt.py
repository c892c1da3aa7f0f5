"""TensorRT and the CUDA driver replaced by recording fakes that run on the CPU, so the real TensorRT backend code
(`runtime/backends/trt.py`: EngineRunner, optimization profiles, the ping-pong KV cache in device buffers) runs
without a GPU.

- `RecordingBuilder` stands in for `export.trt.TrtBuilder` (`build_engines(..., builder_factory=RecordingBuilder)`):
  it records what it was asked to build, and its "engine" is the ONNX graph itself with the profiles in a header.
- `FakeDriver` stands in for `CudaDriver`: device memory is host bytes keyed by fake pointers.
- `FakeTensorRT` stands in for the `tensorrt` module (`install(monkeypatch)` puts both in place): a deserialized engine
  runs its graph with ONNX Runtime on the CPU, reading inputs from and writing outputs to the fake device memory
  at the addresses the backend bound, and records every execution (engine, profile, input shapes).

    trt = install(monkeypatch)
    pack = build_engines(pack_dir, fingerprint=fingerprint(trt.driver), builder_factory=RecordingBuilder)
    backend = TrtBackend(pack)  # trt.executions records every engine run
"""

from __future__ import annotations

import json

import numpy as np

MAGIC = b"RETRV-FAKE-TRT\n"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class RecordingBuilder:
    """`TrtBuilder`'s interface: `build(onnx_path, profiles, plugins)` -> engine bytes; `timing_cache()`."""

    made: list = []

    def __init__(self, cache: bytes, workspace_mb: int) -> None:
        self.cache_in, self.calls = cache, []
        RecordingBuilder.made.append(self)

    def build(self, onnx_path, profiles, plugins=False) -> bytes:
        self.calls.append((onnx_path.name, profiles, plugins))
        header = json.dumps({"graph": onnx_path.name, "profiles": profiles}).encode()
        return MAGIC + header + b"\n" + onnx_path.read_bytes()

    def timing_cache(self) -> bytes:
        return b"fake timing cache"


class FakeDriver:
    """`CudaDriver`'s interface over host memory: pointers are keys of `memory`, never real addresses."""

    def __init__(self, gpu: str = "Fake GPU (CPU)", cc: str = "9.0") -> None:
        self.gpu, self.cc = gpu, cc
        self.memory: dict[int, bytearray] = {}
        self.freed: list[int] = []
        self._next = 1 << 20
        self.stream = 7  # any handle: the fake runs synchronously

    def name(self) -> str:
        return self.gpu

    def compute_capability(self) -> str:
        return self.cc

    def activate(self) -> None:
        pass

    def alloc(self, nbytes: int) -> int:
        ptr, self._next = self._next, self._next + max(int(nbytes), 256) + 256
        self.memory[ptr] = bytearray(max(int(nbytes), 256))
        return ptr

    def free(self, ptr: int) -> None:
        self.memory.pop(ptr, None)
        self.freed.append(ptr)

    def upload(self, dst: int, array: np.ndarray) -> None:
        if not array.nbytes:  # as CudaDriver: an empty tensor copies nothing (and may sit at address 0)
            return
        self.memory[dst][:array.nbytes] = np.ascontiguousarray(array).tobytes()

    def download(self, array: np.ndarray, src: int) -> None:
        array[...] = self.read(src, array.shape, array.dtype)

    def read(self, ptr: int, shape, dtype) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        if not count:
            return np.zeros(shape, dtype)
        return np.frombuffer(bytes(self.memory[ptr]), dtype=dtype, count=count).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        if not array.nbytes:
            return
        buf = self.memory[ptr]
        if array.nbytes > len(buf):
            raise AssertionError(f"fake device: writing {array.nbytes} bytes into a {len(buf)}-byte buffer")
        buf[:array.nbytes] = np.ascontiguousarray(array).tobytes()

    def sync(self) -> None:
        pass


class _IOMode:
    INPUT, OUTPUT = "input", "output"


class _Logger:
    WARNING = 2

    def __init__(self, level) -> None:
        self.level = level


class _Engine:
    def __init__(self, trt: "FakeTensorRT", data: bytes) -> None:
        import onnxruntime as ort

        header, graph = data[len(MAGIC):].split(b"\n", 1)
        meta = json.loads(header)
        self.trt, self.graph, self.profiles = trt, meta["graph"], meta["profiles"]
        self.session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        self.modes = {i.name: _IOMode.INPUT for i in self.session.get_inputs()}
        self.modes.update({o.name: _IOMode.OUTPUT for o in self.session.get_outputs()})
        self.dtypes = {t.name: np.dtype(_ORT_TYPES[t.type]) for t in
                       self.session.get_inputs() + self.session.get_outputs()}
        self.names = list(self.modes)

    num_io_tensors = property(lambda self: len(self.names))
    num_optimization_profiles = property(lambda self: len(self.profiles))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str):
        return self.modes[name]

    def get_tensor_dtype(self, name: str):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name: str, profile: int):
        lo, opt, hi = self.profiles[profile][name]
        return tuple(lo), tuple(opt), tuple(hi)

    def create_execution_context(self) -> "_Context":
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine, self.profile = engine, None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self._outputs: dict[str, np.ndarray] | None = None

    def set_optimization_profile_async(self, index: int, stream) -> None:
        self.profile = index

    def set_input_shape(self, name: str, shape) -> None:
        self.shapes[name], self._outputs = tuple(shape), None

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr
        if self.engine.modes[name] == _IOMode.INPUT:
            self._outputs = None

    def _run(self) -> dict[str, np.ndarray]:
        """Outputs are computed when their shapes are first asked for (TensorRT infers them from the input shapes;
        the fake has to run the graph), from the inputs at their bound addresses."""
        if self._outputs is None:
            driver, e = self.engine.trt.driver, self.engine
            feed = {n: driver.read(self.addresses[n], self.shapes[n], e.dtypes[n])
                    for n, m in e.modes.items() if m == _IOMode.INPUT}
            names = [n for n, m in e.modes.items() if m == _IOMode.OUTPUT]
            self._outputs = dict(zip(names, e.session.run(names, feed)))
        return self._outputs

    def get_tensor_shape(self, name: str):
        if self.engine.modes[name] == _IOMode.INPUT:
            return self.shapes[name]
        return self._run()[name].shape

    def execute_async_v3(self, stream) -> bool:
        outputs, e = self._run(), self.engine
        for name, value in outputs.items():
            self.engine.trt.driver.write(self.addresses[name], value.astype(e.dtypes[name], copy=False))
        e.trt.executions.append({"graph": e.graph, "profile": self.profile,
                                 "inputs": {n: self.shapes[n] for n, m in e.modes.items() if m == _IOMode.INPUT}})
        self._outputs = None
        return True


class _Runtime:
    def __init__(self, trt: "FakeTensorRT", logger) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, data: bytes):
        return _Engine(self.trt, data) if data.startswith(MAGIC) else None


class FakeTensorRT:
    """What `runtime/backends/trt.py` uses of the `tensorrt` module."""

    __version__ = "10.99.0-fake"
    TensorIOMode = _IOMode
    Logger = _Logger

    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver
        self.executions: list[dict] = []

    def Runtime(self, logger) -> _Runtime:  # noqa: N802 - tensorrt's name
        return _Runtime(self, logger)

    @staticmethod
    def nptype(dtype):
        return dtype


def fingerprint(driver: FakeDriver) -> dict:
    """The fingerprint `TrtBackend(pack, driver=driver)` computes with the fake installed."""
    return {"tensorrt": FakeTensorRT.__version__, "gpu": driver.name(),
            "compute_capability": driver.compute_capability()}


def install(monkeypatch) -> FakeTensorRT:
    """Make the TensorRT backend's `require("tensorrt", ...)` return the fake and its `CudaDriver()` the fake
    driver (so `engines_match` and `open_backend(pack, "auto")` see the fake device); returns the fake module.
    Not through sys.modules: torch probes for a real `tensorrt` there."""
    from retrv.runtime.backends import trt

    fake = FakeTensorRT(FakeDriver())
    real_require = trt.require
    monkeypatch.setattr(trt, "require", lambda module, extra: fake if module == "tensorrt" else
                        real_require(module, extra))
    monkeypatch.setattr(trt, "CudaDriver", lambda ordinal=0: fake.driver)
    return fake
