"""TensorRT backend: the pack's engines (`retrv build-engine`) behind the `Backend` interface, KV cache on the GPU.

- Refusal first: the manifest records the fingerprint the engines were built for (TensorRT version, GPU name,
  compute capability). `TrtBackend(pack)` compares it with this device before any engine file is read; a mismatch
  raises `EngineMismatchError`, one line naming both fingerprints. TensorRT engines are not portable across
  TensorRT versions or GPUs, and deserializing a foreign one is undefined at best.
- No torch, no pycuda: device queries, device memory and the stream go through the CUDA driver API (`libcuda.so.1`,
  present wherever a driver is) with ctypes, so the runtime's dependency list only grows by tensorrt.
- Decoder: two optimization profiles (0 = prefill/extension, 1 = one-token decode), one execution context each.
  The KV cache lives in device buffers allocated once per sequence batch at `start` for the engine's maximum
  length, two per layer and per K/V (ping-pong): a step reads `past` from one and the engine writes `present` into
  the other, so the cache never travels through the host and is never reallocated. Only the last position's
  logits (B, V) come back each step.
- An engine built from the ICM plugin graphs (`--icm-plugin`) needs `retrv.kernels.trt_plugin.register_plugins()`
  (torch, and triton for its TRITON tactic) in this process; it is called before such an engine is deserialized.

`engines_match(pack)` says, without raising, whether this device can run the pack's engines (for
`--backend auto`). `import retrv.runtime.backends.trt` imports neither tensorrt nor anything heavy.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import weakref

import numpy as np

from retrv.runtime.backends.base import DecoderState
from retrv.runtime.backends.graph import GraphBackend
from retrv.runtime.backends.runner import Runner
from retrv.runtime.errors import InputError, RetrvError, require

log = logging.getLogger(__name__)

FINGERPRINT_KEYS = ("tensorrt", "gpu", "compute_capability")
# graph role -> its engine's role in the manifest (`retrv build-engine` builds one engine per graph of the pack)
ENGINE_ROLES = {"vision": "trt_vision", "decoder": "trt_decoder", "embedder_vision": "trt_embedder_vision",
                "embedder": "trt_embedder", "icm_content": "trt_icm_content", "icm_relation": "trt_icm_relation"}
PREFILL, DECODE = 0, 1  # the decoder engine's optimization profiles
MIN_ALLOC = 256  # an empty tensor (past of length 0) still needs a valid, aligned address


class NoGpuError(RetrvError):
    """No usable CUDA device (no driver, no GPU, or the driver refuses)."""


class EngineMismatchError(RetrvError):
    """A pack's TensorRT engines were built for another TensorRT version or GPU."""


# ------------------------------------------------------------------------------------------- CUDA driver (ctypes)
class CudaDriver:
    """The few CUDA driver calls the backend needs. Raises `NoGpuError` when there is no usable GPU."""

    _ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_{MAJOR,MINOR}

    def __init__(self, ordinal: int = 0) -> None:
        name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError as e:
            raise NoGpuError(f"no CUDA GPU found ({name} cannot be loaded: {e}); TensorRT needs an NVIDIA GPU "
                             f"and its driver") from None
        lib = self.lib
        u64, vp, sz = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), sz]
        lib.cuMemFree_v2.argtypes = [u64]
        lib.cuMemcpyHtoDAsync_v2.argtypes = [u64, vp, sz, vp]
        lib.cuMemcpyDtoHAsync_v2.argtypes = [vp, u64, sz, vp]
        lib.cuStreamSynchronize.argtypes = [vp]
        lib.cuCtxSetCurrent.argtypes = [vp]
        rc = lib.cuInit(0)
        if rc != 0:
            raise NoGpuError(f"no CUDA GPU found (cuInit: {self._err(rc)}); TensorRT needs an NVIDIA GPU")
        count = ctypes.c_int()
        self.check(lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if count.value <= ordinal:
            raise NoGpuError(f"no CUDA GPU found (the driver reports {count.value} devices; expected device "
                             f"{ordinal}); TensorRT needs an NVIDIA GPU")
        self.device = ctypes.c_int()
        self.check(lib.cuDeviceGet(ctypes.byref(self.device), ordinal), "cuDeviceGet")
        self._ctx = None
        self._stream = None

    def _err(self, rc: int) -> str:
        s = ctypes.c_char_p()
        self.lib.cuGetErrorName(rc, ctypes.byref(s))
        return (s.value or b"CUDA error %d" % rc).decode()

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RetrvError(f"CUDA {what} failed: {self._err(rc)}")

    def name(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.check(self.lib.cuDeviceGetName(buf, 256, self.device), "cuDeviceGetName")
        return buf.value.decode()

    def compute_capability(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(major), self._ATTR_CC_MAJOR, self.device), "attr")
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(minor), self._ATTR_CC_MINOR, self.device), "attr")
        return f"{major.value}.{minor.value}"

    # -- memory and stream, in the device's primary context (the one TensorRT's runtime API uses)
    def activate(self) -> None:
        if self._ctx is None:
            ctx = ctypes.c_void_p()
            self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self.device), "cuDevicePrimaryCtxRetain")
            self._ctx = ctx
        self.check(self.lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    @property
    def stream(self) -> int:
        if self._stream is None:
            self.activate()
            s = ctypes.c_void_p()
            self.check(self.lib.cuStreamCreate(ctypes.byref(s), 0), "cuStreamCreate")
            self._stream = s
        return self._stream.value or 0

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), max(int(nbytes), MIN_ALLOC)), f"cuMemAlloc({nbytes})")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cuMemFree_v2(ptr)

    def upload(self, dst: int, array: np.ndarray) -> None:
        if array.nbytes:
            self.check(self.lib.cuMemcpyHtoDAsync_v2(dst, array.ctypes.data, array.nbytes, self.stream), "HtoD")

    def download(self, array: np.ndarray, src: int) -> None:
        if array.nbytes:
            self.check(self.lib.cuMemcpyDtoHAsync_v2(array.ctypes.data, src, array.nbytes, self.stream), "DtoH")

    def sync(self) -> None:
        self.check(self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")


# ---------------------------------------------------------------------------------------------------- fingerprints
def device_fingerprint(driver: CudaDriver | None = None) -> dict:
    """{"tensorrt": version, "gpu": name, "compute_capability": "8.7"} of this device. The GPU is checked first, so
    a machine without one says so even when tensorrt is missing too."""
    driver = driver or CudaDriver()
    gpu, cc = driver.name(), driver.compute_capability()
    trt = require("tensorrt", "gpu")
    return {"tensorrt": str(trt.__version__), "gpu": gpu, "compute_capability": cc}


def describe(fp: dict) -> str:
    return f"TensorRT {fp.get('tensorrt')} on '{fp.get('gpu')}' (compute {fp.get('compute_capability')})"


def fingerprint_mismatch(recorded, current: dict) -> str | None:
    """None when the engines' recorded fingerprint equals this device's; else the one-line reason."""
    if not isinstance(recorded, dict) or any(not isinstance(recorded.get(k), str) for k in FINGERPRINT_KEYS):
        return f"no valid TensorRT fingerprint recorded (got {recorded!r}); expected {list(FINGERPRINT_KEYS)}"
    diff = [k for k in FINGERPRINT_KEYS if recorded[k] != current.get(k)]
    if not diff:
        return None
    return (f"engines built for {describe(recorded)}; this device has {describe(current)} "
            f"(differs in {', '.join(diff)})")


def check_engines(pack, current: dict) -> dict:
    """The manifest's TensorRT record, or `EngineMismatchError` (one line, both fingerprints) when the engines were
    built elsewhere, or `InputError` when the pack has none."""
    record = pack.manifest.extra.get("tensorrt")
    if not isinstance(record, dict) or not any(pack.has(r) for r in ENGINE_ROLES.values()):
        raise InputError(f"{pack.path}: no TensorRT engines in this pack; expected `retrv build-engine "
                         f"{pack.path}` run on this device first")
    reason = fingerprint_mismatch(record.get("fingerprint"), current)
    if reason:
        raise EngineMismatchError(f"{pack.path}: refusing to load its TensorRT engines: {reason}; rebuild them "
                                  f"here with `retrv build-engine {pack.path}`")
    return record


def engines_match(pack) -> bool:
    """True when the pack has a decoder engine whose fingerprint equals this device's (GPU present, tensorrt
    importable). Never raises: `--backend auto` uses it to choose TensorRT over ONNX Runtime."""
    try:
        if not pack.has(ENGINE_ROLES["decoder"]):
            return False
        check_engines(pack, device_fingerprint())
        return True
    except (RetrvError, OSError, KeyError, TypeError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------------------- engines
class _Buffer:
    """A grow-only device allocation."""

    def __init__(self, driver: CudaDriver) -> None:
        self.driver, self.ptr, self.nbytes = driver, 0, 0

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            if self.ptr:
                self.driver.free(self.ptr)
            self.ptr, self.nbytes = self.driver.alloc(nbytes), max(int(nbytes), MIN_ALLOC)
        return self.ptr

    def release(self) -> None:
        if self.ptr:
            self.driver.free(self.ptr)
            self.ptr, self.nbytes = 0, 0


class EngineRunner(Runner):
    """One deserialized engine, one execution context per optimization profile, device buffers reused per tensor.
    `spec` is the engine's manifest I/O record (its source graph's): feeds are checked against it first."""

    def __init__(self, trt, runtime, path, driver: CudaDriver, spec: dict) -> None:
        super().__init__(path.name, spec)
        self.trt, self.path, self.driver = trt, path, driver
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RetrvError(f"{path}: TensorRT could not deserialize this engine; expected one written by "
                             f"`retrv build-engine` with this TensorRT")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.contexts = []
        for i in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, driver.stream)
            self.contexts.append(ctx)
        self.buffers = {n: _Buffer(driver) for n in names}

    def check_shape(self, profile: int, name: str, shape: tuple) -> None:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, profile)
        if len(lo) != len(shape) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise InputError(f"{self.path.name} input '{name}': got shape {tuple(shape)}; expected between "
                             f"{tuple(lo)} and {tuple(hi)} (the engine's profile {profile}; rebuild with larger "
                             f"limits, see `retrv build-engine --help`)")

    def infer_impl(self, feed: dict[str, np.ndarray], outputs: list[str], profile: int = 0,
                   device: dict | None = None) -> dict[str, np.ndarray]:
        """Upload `feed` (numpy), bind `device` ({name: (ptr, shape)}, tensors already on the GPU, in or out),
        run on `profile`'s context, and download the `outputs` not bound in `device`."""
        self.driver.activate()
        ctx, device = self.contexts[profile], device or {}
        staged = []  # host arrays stay alive until the stream is synchronised
        for name in self.inputs:
            if name in device:
                ptr, shape = device[name]
            else:
                if name not in feed:
                    raise InputError(f"{self.path.name}: input '{name}' is missing; expected {self.inputs}")
                arr = np.ascontiguousarray(feed[name], dtype=self.dtypes[name])
                ptr, shape = self.buffers[name].reserve(arr.nbytes), arr.shape
                self.driver.upload(ptr, arr)
                staged.append(arr)
            self.check_shape(profile, name, tuple(shape))
            ctx.set_input_shape(name, tuple(int(s) for s in shape))
            ctx.set_tensor_address(name, ptr)
        host = {}
        wanted = [n for n in outputs if n not in device]
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if name in device:
                ptr = device[name][0]
            else:
                nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize
                ptr = self.buffers[name].reserve(nbytes)
                if name in wanted:
                    host[name] = np.empty(shape, dtype=self.dtypes[name])
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(self.driver.stream):
            raise RetrvError(f"{self.path.name}: TensorRT execution failed (see the TensorRT log above)")
        for name, arr in host.items():
            self.driver.download(arr, self.buffers[name].ptr)
        self.driver.sync()
        return host

    def close(self) -> None:
        for buf in self.buffers.values():
            buf.release()
        self.contexts.clear()
        self.engine = None


class _KvCache:
    """Ping-pong device buffers for every layer's keys and values: slot [s][i] holds tensor i (key_0, value_0, ...)."""

    def __init__(self, driver: CudaDriver, count: int, nbytes: int) -> None:
        self.slots = [[driver.alloc(nbytes) for _ in range(count)] for _ in range(2)]
        self.current = 0  # the slot holding the cache written by the last step
        self._finalizer = weakref.finalize(self, _free_all, driver, [p for s in self.slots for p in s])


def _kv_names(num_layers: int, kind: str) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... as `export.graphs.kv_names` names them (no torch import here)."""
    return [f"{kind}_{t}_{i}" for i in range(num_layers) for t in ("key", "value")]


def _free_all(driver: CudaDriver, ptrs: list[int]) -> None:
    for p in ptrs:
        driver.free(p)


class TrtBackend(GraphBackend):
    name = "trt"

    def __init__(self, pack, driver: CudaDriver | None = None) -> None:
        from retrv.runtime.backends.fused import refuse_fused

        refuse_fused(pack, "TensorRT backend")  # before CUDA is touched
        self.driver = driver or CudaDriver()
        self.record = check_engines(pack, device_fingerprint(self.driver))  # refuse before reading any engine
        super().__init__(pack)
        self.trt = require("tensorrt", "gpu")
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = None

    def open_runner(self, role: str) -> EngineRunner:
        if role not in ENGINE_ROLES:
            raise InputError(f"{self.pack.path}: no graph role {role!r}; expected one of {list(ENGINE_ROLES)}")
        engine_role = ENGINE_ROLES[role]
        if not self.pack.has(engine_role):
            raise InputError(f"{self.pack.path}: no TensorRT engine for '{role}'; expected `retrv build-engine` "
                             f"to have built one (the pack has {role}: {self.pack.has(role)})")
        if self.record.get("engines", {}).get(role, {}).get("icm_plugin"):
            from retrv.kernels.trt_plugin import register_plugins

            register_plugins()
        if self._runtime is None:
            self.driver.activate()
            self._runtime = self.trt.Runtime(self._logger)
        path = self.pack.file(engine_role)
        entry = self.pack.manifest.files[path.name]
        return EngineRunner(self.trt, self._runtime, path, self.driver,
                            {"inputs": entry.inputs, "outputs": entry.outputs})

    # -- decoder, KV cache in device buffers --------------------------------------------------------------------
    def max_length(self) -> int:
        """The longest cache (past + new) the decoder engine's profiles allow."""
        runner = self.runner("decoder")
        return int(runner.engine.get_tensor_profile_shape("attention_mask", PREFILL)[2][1])

    def start(self, batch: int) -> DecoderState:
        runner = self.runner("decoder")
        itemsize = runner.dtypes["past_key_0"].itemsize
        nbytes = batch * self.kv_heads * self.max_length() * self.head_dim * itemsize
        cache = _KvCache(self.driver, 2 * self.num_layers, nbytes)
        return DecoderState(batch=batch, attention_mask=np.zeros((batch, 0), dtype=np.int64), cache=cache)

    def extend(self, state, inputs_embeds, position_ids, mask):
        runner = self.runner("decoder")
        b, s = inputs_embeds.shape[0], inputs_embeds.shape[1]
        past, total = state.length, mask.shape[1]
        if total > self.max_length():
            raise InputError(f"decoder.plan: got {total} cached + new positions; expected <= {self.max_length()} "
                             f"(the engine's profile; rebuild with a larger --max-total)")
        cache: _KvCache = state.cache
        src, dst = cache.slots[cache.current], cache.slots[1 - cache.current]
        kv_shape = (b, self.kv_heads, past, self.head_dim)
        out_shape = (b, self.kv_heads, total, self.head_dim)
        device = {}
        for i, (p_name, o_name) in enumerate(zip(_kv_names(self.num_layers, "past"),
                                                 _kv_names(self.num_layers, "present"))):
            device[p_name] = (src[i], kv_shape)  # slot i holds layer i//2's key (even) or value (odd)
            device[o_name] = (dst[i], out_shape)
        profile = DECODE if s == 1 and len(runner.contexts) > DECODE else PREFILL
        feed = {"inputs_embeds": inputs_embeds, "position_ids": position_ids, "attention_mask": mask}
        logits = runner.infer(feed, ["logits"], profile=profile, device=device)["logits"]
        cache.current = 1 - cache.current
        return logits
