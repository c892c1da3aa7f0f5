"""What the benchmarks share: percentiles, memory readings, and worker processes that each serve ONE configuration.

Why workers: peak memory (the high-water resident set size) is a property of a process, so every configuration
(transformers baseline, PyTorch fallback, ONNX Runtime fp32/INT8/INT4) lives in its own process and its peak never
mixes with another's. Why interleaving: this machine is shared, and load from other jobs comes and goes; the
orchestrator sends query i to every worker in turn (rotating who goes first) before query i+1, so a busy spell
falls on all configurations alike instead of on whichever happened to run then. Only one worker computes at a
time; the others wait on their pipe.

Protocol: one JSON object per line on the worker's stdin, one reply per line on its stdout (the worker moves its
own fd 1 to stderr first, so a library that prints cannot corrupt the stream). A reply with "error" fails that
call only; the orchestrator records the row as missing with the message.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORKER = BENCH_DIR / "_worker.py"
SOURCE_DIRS = ("model", "export", "calibration", "runtime", "train")  # what built artifacts depend on


# ------------------------------------------------------------------------------------------------------- memory
def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """High-water resident set size of this process's address space (Linux VmHWM).

    Not getrusage's ru_maxrss: Linux carries the PARENT's high-water mark across fork + exec into it, so a worker
    started by an orchestrator that once held 700 MB would report at least 700 MB whatever it did itself."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # elsewhere: the best there is
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


# ------------------------------------------------------------------------------------------------------ numbers
def summarize(samples_ms: Iterable[float]) -> dict:
    """{"n", "mean", "min", "p50", "p95"} with numpy's linear interpolation. With few samples p95 is close to the
    max; "min" is the sample least disturbed by other jobs on a shared machine."""
    x = np.asarray(list(samples_ms), dtype=np.float64)
    if x.size == 0:
        return {"n": 0}
    p50, p95 = np.percentile(x, [50, 95])
    return {"n": int(x.size), "mean": float(x.mean()), "min": float(x.min()), "p50": float(p50), "p95": float(p95)}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(v, spec: str = ".0f", missing: str = "n/a") -> str:
    return missing if v is None else format(v, spec)


def source_fingerprint() -> str:
    """sha256 over the project's source files: a cached artifact built by other code is rebuilt, never reused."""
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for p in sorted((REPO / d).rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


# The x86 extensions that pick ONNX Runtime's and llama.cpp's kernels (int8 dot products above all): a VM may hide
# some of what its CPU has, so the flags the guest sees are recorded, not the model name's.
SIMD_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                        "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})


def machine() -> dict:
    def load() -> list[float] | None:
        try:
            return [round(x, 2) for x in os.getloadavg()]
        except OSError:
            return None

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info: dict[str, str] = {}  # the first CPU's fields
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            info.setdefault(key, value)
    except OSError:
        pass
    cpu, family = info.get("model name") or platform.processor() or None, info.get("cpu family")
    simd = sorted(set(info["flags"].split()) & SIMD_FLAGS) if "flags" in info else None
    return {"cpu": cpu, "cpu_family": family, "simd": simd, "cores": cores, "memory_gib": mem, "loadavg": load(),
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("torch", "transformers", "onnxruntime", "onnx", "hnswlib", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ------------------------------------------------------------------------------------------------------ workers
class WorkerError(RuntimeError):
    pass


class Worker:
    """One configuration in its own process. `init` is sent at once; `ready()` waits for its reply, so several
    workers load in parallel (loading is not measured)."""

    def __init__(self, name: str, init: dict, log_dir: Path) -> None:
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"worker-{name}.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1, env=env, cwd=str(REPO))
        self.error: str | None = None
        self.info: dict = {}
        self._send({"op": "init", **init})

    def _send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def _recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise WorkerError(f"worker {self.name} exited with code {self.proc.returncode}: {self.stderr_tail()}")
        return json.loads(line)

    def stderr_tail(self, n: int = 400) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return " | ".join(text[-n:].splitlines()[-4:])

    def ready(self) -> dict:
        reply = self._recv()
        if "error" in reply:
            self.error = reply["error"]
        self.info = reply
        return reply

    def call(self, msg: dict) -> dict:
        if self.error:
            raise WorkerError(self.error)
        self._send(msg)
        reply = self._recv()
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send({"op": "exit"})
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # this process started it; nothing else is touched
        self._log.close()


def start_workers(specs: dict[str, dict], log_dir: Path) -> dict[str, Worker]:
    workers = {name: Worker(name, init, log_dir) for name, init in specs.items()}
    for w in workers.values():
        try:
            w.ready()
        except WorkerError as e:
            w.error = str(e)
    return workers


# Pause before each timed run of an interleaved benchmark (run_interleaved here, bench/decode.py's rounds): ONNX
# Runtime's (and OpenMP's) idle pool threads spin for milliseconds after a run, and on 2 cores the next
# configuration would share the CPU with them. Measured on the SmolLM2 graft, 2 threads, one process: llama.cpp's
# 94-token prefill 217 ms right after a retrv decode, 184 ms 10 ms later, 173-177 ms from 50 ms on; int8-weight's
# 120 ms right after retrv fp32's decode, 89 ms 200 ms later. libllama's threads do not spin after a call.
SETTLE_S = 0.2


def run_interleaved(workers: dict[str, Worker], queries: list[dict], warmup: list[dict],
                    errors: dict[str, str], only: dict[str, bool] | None = None, loads: list[dict] | None = None,
                    log: Callable[[str], None] | None = None, settle_s: float = SETTLE_S) -> dict[str, list[dict]]:
    """Warm-up queries first (discarded), then query i on every worker in turn, the first worker rotating each
    round, each timed query sent `settle_s` after the previous reply (the previous worker's pool has stopped
    spinning). A worker that fails is dropped from the rest of the run and its error kept in `errors`. `loads`:
    gets, per timed query, the 1-minute load average read just before each configuration ran it (`log` prints
    it)."""
    live = [n for n, w in workers.items() if not w.error and (only is None or only.get(n, True))]
    for n, w in workers.items():
        if w.error:
            errors.setdefault(n, w.error)
    out: dict[str, list[dict]] = {n: [] for n in live}

    def ask(name: str, q: dict) -> dict | None:
        try:
            return workers[name].call(q)
        except WorkerError as e:
            errors[name] = str(e)
            live.remove(name)
            out.pop(name, None)
            return None

    for q in warmup:
        for n in list(live):
            ask(n, q)
    for i, q in enumerate(queries):
        order = list(live)
        order = order[i % max(1, len(order)):] + order[: i % max(1, len(order))]
        before: dict[str, float] = {}
        for n in order:
            if n in live:
                time.sleep(settle_s)
                before[n] = load_1min()
                reply = ask(n, q)
                if reply is not None:
                    out[n].append(reply)
        if loads is not None:
            loads.append(before)
        if log is not None:
            log(f"    query {i + 1}/{len(queries)}, 1-min load before each: "
                + ", ".join(f"{n} {v:.2f}" for n, v in before.items()))
    return out


def load_1min() -> float:
    """os.getloadavg()'s 1-minute figure (-1 where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return -1.0


def memory(workers: dict[str, Worker]) -> dict[str, dict]:
    out = {}
    for n, w in workers.items():
        if not w.error:
            try:
                out[n] = w.call({"op": "mem"})
            except WorkerError:
                pass
    return out


def close_all(workers: dict[str, Worker]) -> None:
    for w in workers.values():
        w.close()
