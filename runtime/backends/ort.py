"""ONNX Runtime backend: sessions created lazily per sub-model, options set on purpose, KV cache kept as OrtValues.

- Providers: `auto` takes CUDA when this onnxruntime build has it, else CPU; or a name ("cpu", "cuda").
- Threads: intra-op = the physical cores this process may run on (`physical_cores`: the affinity mask, so a
  container's cpuset counts, one per hyper-threaded pair, capped by a cgroup CPU quota); inter-op = 1, sequential
  execution: a decoder step is a chain of ops with nothing to run beside it. Callers can override both
  (`--threads`, `--inter-op-threads`); docs/BENCHMARKS.md ("Threads") has the measurements behind the defaults.
- Graph optimisation: the first open writes the optimised model to a cache keyed by the file's sha256, the ORT
  version and the provider; later opens load it and skip the (for a 7B decoder, many-second) optimisation.
- KV cache, traced layout: `present_*` outputs are bound with IO binding and stay OrtValues on the provider's
  device; the next step binds them as `past_*` without a round trip through numpy.
- KV cache, fused layout (export/fused_decoder.py, CPU): one preallocated buffer per layer and state
  (`fused.FusedCache`), bound by pointer as both `past_*` and `present_*` once; a step binds only the new embeddings,
  `seqlens_k` and `total_sequence_length` (the rotary rows are written into bound buffers) and copies out the logits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from retrv.runtime.backends.base import DecoderState
from retrv.runtime.backends.fused import FusedCache, check_unpadded, mrope_angles
from retrv.runtime.backends.graph import GraphBackend
from retrv.runtime.backends.runner import Runner, check_feed
from retrv.runtime.errors import InputError, require

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def choose_providers(provider: str = "auto") -> list[str]:
    ort = require("onnxruntime", "runtime")
    available = ort.get_available_providers()
    if provider == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if provider not in PROVIDERS:
        raise InputError(f"provider: got {provider!r}; expected one of {['auto', *PROVIDERS]}")
    if PROVIDERS[provider] not in available:
        raise InputError(f"provider: {provider!r} is not in this onnxruntime build; available: {available}")
    return [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])


MAX_THREADS = 1024  # far above any CPU this runs on; a typo such as 10000 is refused rather than spawned
CPU_ROOT = Path("/sys/devices/system/cpu")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs' worth of time a cgroup v2 quota allows (ceil(quota / period)); None without a quota or the file."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def physical_cores(cpu_root: Path = CPU_ROOT, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: the CPUs of its affinity mask (a container's cpuset counts) with hyper-threaded
    siblings counted once (a second thread on a core's sibling mostly competes for the same units in these
    matmul-bound kernels), capped by the cgroup CPU quota (a container limited to 2 CPUs of a 64-core host gets 2)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            topo = cpu_root / f"cpu{cpu}" / "topology"
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:  # no topology exposed: count the CPU
            cores.add(("cpu", str(cpu)))
    n = max(1, len(cores))
    quota = cgroup_cpu_limit(cpu_max)
    return min(n, quota) if quota else n


def check_threads(name: str, value, allow_none: bool = True) -> int | None:
    """A thread count from a caller: None (the default) or an integer in [1, MAX_THREADS]."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_THREADS:
        raise InputError(f"{name}: got {value!r}; expected an integer from 1 to {MAX_THREADS}")
    return value


def default_cache_dir() -> Path:
    return Path(os.environ.get("RETRV_CACHE", Path.home() / ".cache" / "retrv"))


# The decoder's session: the intra-op pool hands out a decode step's small kernels in dynamically shrinking blocks
# (ONNX Runtime's `dynamic_block_base`) rather than one static share per thread. Measured on the SmolLM2 graft, two
# threads, raw sessions interleaved in one process (4 pairs): int8-weight decode 3-10% faster, INT4 7-15%, fp32 and
# prefill unchanged; one thread has no pool to schedule. A caller's `session_config` overrides it.
DECODER_SESSION_CONFIG = {"session.dynamic_block_base": "4"}


class OrtRunner(Runner):
    """One sub-model in an ONNX Runtime session: `runner.infer(feed)` checks the feed against the manifest spec,
    then runs."""

    def __init__(self, path: Path, spec: dict, sha256: str, providers: list[str], threads: int | None,
                 cache_dir: Path | None, session_config: dict[str, str] | None = None, cpu_arena: bool = True,
                 inter_op_threads: int = 1) -> None:
        super().__init__(path.name, spec)
        ort = require("onnxruntime", "runtime")
        self.path, self.providers = path, providers
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
        # One inter-op thread: sequential execution. More: ORT runs independent branches of a graph in parallel on
        # a pool of that size (the vision tower's and ICM's graphs have a few; a decode step has none).
        opts.inter_op_num_threads = inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if inter_op_threads == 1 else \
            ort.ExecutionMode.ORT_PARALLEL
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = cpu_arena
        for key, value in (session_config or {}).items():
            opts.add_session_config_entry(key, value)
        source = path
        if cache_dir is not None:
            tag = f"{path.stem}-{sha256[:16]}-ort{ort.__version__}-{providers[0].replace('ExecutionProvider', '').lower()}"
            cached = cache_dir / "ort" / f"{tag}.onnx"
            if cached.exists():
                source = cached
                # Already optimised to the extended level; the layout (ALL) passes still run, and are cheap.
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            else:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
                # EXTENDED, not ALL: ALL adds layout transforms specific to this CPU, unsafe to cache.
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                opts.optimized_model_filepath = str(tmp)
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", tmp.name + ".data"
                )
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", str(1 << 20)
                )
                self.session = ort.InferenceSession(str(path), opts, providers=providers)
                self._publish(tmp, cached)
                return
        else:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(source), opts, providers=providers)

    @staticmethod
    def _publish(tmp: Path, cached: Path) -> None:
        """Rename the freshly written optimised model into place; its external data keeps its temp name (the
        model file refers to it by that name), so only the small graph file is renamed, last."""
        if tmp.exists():
            os.replace(tmp, cached)

    def close(self) -> None:
        self.session = None

    def infer_impl(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.session.run(outputs, feed)))


class OrtBackend(GraphBackend):
    name = "ort"

    def __init__(self, pack, provider: str = "auto", threads: int | None = None,
                 cache_dir: Path | None | str = "default", session_config: dict[str, str] | None = None,
                 cpu_arena: bool = True, inter_op_threads: int = 1) -> None:
        """`threads`: intra-op threads (default: `physical_cores()`); `inter_op_threads`: 1 (default) runs each
        graph's nodes sequentially, more runs independent nodes in parallel. `session_config`: ONNX Runtime
        session config entries (e.g. {"session.disable_prepacking": "1"}, as `--verify` sets to keep one copy of
        each weight); `cpu_arena=False`: no CPU memory arena."""
        self.threads = check_threads("--threads", threads)
        self.inter_op_threads = check_threads("--inter-op-threads", inter_op_threads, allow_none=False)
        super().__init__(pack)
        self.session_config, self.cpu_arena = dict(session_config or {}), cpu_arena
        self.providers = choose_providers(provider)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.cache_dir = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)

    def open_runner(self, role: str) -> OrtRunner:
        path = self.pack.file(role)
        entry = self.pack.manifest.files[path.name]
        config = {**DECODER_SESSION_CONFIG, **self.session_config} if role == "decoder" else self.session_config
        return OrtRunner(path, {"inputs": entry.inputs, "outputs": entry.outputs}, entry.sha256,
                         self.providers, self.threads, self.cache_dir, config, self.cpu_arena,
                         self.inter_op_threads)

    @property
    def fused(self) -> bool:
        return self.pack.decoder_layout == "fused"

    # -- decoder with the cache kept in OrtValues ---------------------------------------------------------------
    def start(self, batch: int) -> DecoderState:
        if self.fused:
            return self._fused_start(batch)
        ort = require("onnxruntime", "runtime")
        kv_dtype = self.runner("decoder").spec["inputs"]["past_key_0"]["dtype"]
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=kv_dtype)
        past = [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in range(2 * self.num_layers)]
        return DecoderState(batch=batch, attention_mask=np.zeros((batch, 0), dtype=np.int64), cache=past)

    def extend(self, state, inputs_embeds, position_ids, mask):
        if self.fused:
            return self._fused_run(state, inputs_embeds, position_ids, mask, "logits")
        runner = self.runner("decoder")
        past_names = [n for n in runner.spec["inputs"] if n.startswith("past_")]
        feed = runner.conform({"inputs_embeds": inputs_embeds, "position_ids": position_ids, "attention_mask": mask})
        runner.check(feed, on_device=past_names)  # the past is bound as OrtValues below
        io = runner.session.io_binding()
        for name, value in feed.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(past_names, state.cache):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        present_names = [n for n in runner.spec["outputs"] if n.startswith("present_")]
        for name in present_names:
            io.bind_output(name, self.device)  # ORT allocates; stays on device for the next step
        runner.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        state.cache = list(outputs[1:])
        return outputs[0].numpy()

    # -- the fused layout ---------------------------------------------------------------------------------------
    def _fused_start(self, batch: int, capacity: int | None = None) -> DecoderState:
        if self.device != "cpu":
            raise InputError(f"provider {self.providers[0]}: a fused-layout pack runs on the CPU provider; expected "
                             f"--provider cpu, or a pack exported with --decoder traced")
        kv_dtype = self.runner("decoder").spec["inputs"]["past_key_0"]["dtype"]
        limit = int(self.pack.model_config.text.max_position_embeddings)
        cache = FusedCache.allocate(batch, self.num_layers, self.kv_heads, self.head_dim, np.dtype(kv_dtype), limit,
                                    **({"capacity": capacity} if capacity else {}))
        return DecoderState(batch=batch, attention_mask=np.zeros((batch, 0), dtype=np.int64), cache=cache)

    def _fused_run(self, state: DecoderState, inputs_embeds, position_ids, mask, output: str) -> np.ndarray:
        """One fused-graph run over the new positions; returns `output` ("logits" or "embedding") as (B, N)."""
        runner = self.runner("decoder")
        cache: FusedCache = state.cache
        embeds = np.ascontiguousarray(runner.conform({"inputs_embeds": inputs_embeds})["inputs_embeds"])
        spec = runner.spec["inputs"]["inputs_embeds"]
        check_feed(runner.name, "inputs_embeds", embeds, spec["dtype"], tuple(spec["shape"]))
        # position_ids is the step's contract, not a graph input here (the runtime turns it into rotary rows)
        check_feed(runner.name, "position_ids", position_ids, "int64", (3, "batch", "seq"))
        b, s = embeds.shape[:2]
        if b != state.batch or position_ids.shape[1:] != (b, s) or mask.shape != (b, state.length + s):
            raise InputError(f"{runner.name}: got inputs_embeds {embeds.shape}, position_ids {position_ids.shape}, "
                             f"mask {mask.shape} for a state of batch {state.batch} holding {state.length}; expected "
                             f"({state.batch}, S, H), (3, {state.batch}, S), ({state.batch}, {state.length} + S)")
        check_unpadded(mask)
        if b > 1 and s > 1 and state.length > 0:  # GroupQueryAttention's CPU kernel refuses this case
            raise InputError(f"{runner.name}: got {s} new positions for a batch of {b} with a cache; the fused "
                             f"decoder extends a batched cache one position at a time (or a pack exported with "
                             f"--decoder traced)")
        past, total = state.length, state.length + s
        cache.reserve(past, total)
        cache.write_rotary(past, mrope_angles(position_ids, self.pack.model_config.text))
        io = self._fused_binding(runner, cache)
        width = runner.spec["outputs"][output]["shape"][-1]
        if s == 1 and output == "logits":  # a decode step: write into the buffers bound once (`_step_buffers`)
            buf = self._step_buffers(io, cache, b, embeds.shape[-1], embeds.dtype, width)
            buf["inputs_embeds"][...] = embeds
            buf["seqlens_k"][...] = total - 1
            buf["total_sequence_length"][...] = total
            runner.session.run_with_iobinding(io)
            return buf["logits"].copy()  # the buffer is the next step's; the caller keeps its own
        cache.step_bound = None  # the inputs below replace the step buffers' bindings
        io.bind_cpu_input("inputs_embeds", embeds)
        io.bind_cpu_input("seqlens_k", np.full((b,), total - 1, np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        out = np.empty((b, width), np.float32)
        io.bind_output(output, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        runner.session.run_with_iobinding(io)
        return out

    @staticmethod
    def _step_buffers(io, cache: FusedCache, batch: int, hidden: int, dtype, vocab: int) -> dict:
        """The one-token step's input and logits buffers of `cache`, bound by pointer to `io` (again only when the
        binding is new: a regrown cache, or a multi-token call in between)."""
        buf = cache.step
        if not buf or buf["inputs_embeds"].dtype != dtype:
            buf.clear()
            buf.update(inputs_embeds=np.zeros((batch, 1, hidden), dtype), seqlens_k=np.zeros((batch,), np.int32),
                       total_sequence_length=np.zeros((), np.int32), logits=np.zeros((batch, vocab), np.float32))
            cache.step_bound = None
        if cache.step_bound is not io:
            for name in ("inputs_embeds", "seqlens_k", "total_sequence_length"):
                a = buf[name]
                io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
            io.bind_output("logits", "cpu", 0, np.float32, list(buf["logits"].shape), buf["logits"].ctypes.data)
            cache.step_bound = io
        return buf

    def _fused_binding(self, runner: OrtRunner, cache: FusedCache):
        """The state's IO binding with every layer's buffer bound as past and present (rebound after growth)."""
        if cache.binding is None or cache.bound_capacity != cache.capacity:
            io = runner.session.io_binding()
            for kind, bufs in (("key", cache.keys), ("value", cache.values)):
                for i, buf in enumerate(bufs):
                    for role in ("past", "present"):
                        bind = io.bind_input if role == "past" else io.bind_output
                        bind(f"{role}_{kind}_{i}", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            for name, buf in (("cos_cache", cache.cos), ("sin_cache", cache.sin)):
                io.bind_input(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            cache.binding, cache.bound_capacity = io, cache.capacity
        return cache.binding

    def embed(self, inputs_embeds, position_ids, attention_mask):
        """The fused graph has no key mask: a padded embedder batch runs row by row, each without its padding
        (its M-RoPE positions are explicit, so dropping padding changes nothing the real tokens see)."""
        if not self.fused or self.pack.has("embedder"):
            return super().embed(inputs_embeds, position_ids, attention_mask)
        rows = []
        for r in range(inputs_embeds.shape[0]):
            keep = np.asarray(attention_mask[r]) > 0
            n = int(keep.sum())
            if n == 0:
                raise InputError(f"attention_mask row {r}: no real token; expected at least one 1")
            state = self._fused_start(1, capacity=n)
            ones = np.ones((1, n), np.int64)
            rows.append(self._fused_run(state, inputs_embeds[r:r + 1, keep], position_ids[:, r:r + 1, keep], ones,
                                        "embedding"))
        return np.concatenate(rows, axis=0)
