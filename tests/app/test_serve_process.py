"""`retrv serve --workers 2` as a real subprocess: every request counted across the workers (prometheus-client's
multiprocess mode), index writes from either worker seen by both, and SIGTERM draining in-flight requests.

One server for the module (starting two workers costs seconds); the SIGTERM test stops it, so it runs last."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import _metric  # noqa: E402


def _gauge(text: str, name: str) -> float:
    """An unlabelled sample (`name value`), which test_serve's `_metric` (labelled samples) does not read."""
    import re

    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers2(tiny_pack, tiny_index, tmp_path_factory):
    import shutil

    index = tmp_path_factory.mktemp("served2") / "index"
    shutil.copytree(tiny_index, index)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from retrv.app.cli import main; raise SystemExit(main())",
                             "serve", str(index), "--pack", str(tiny_pack), "--port", str(port), "--workers", "2",
                             "--max-queue", "64"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    # one worker answering is not both: the other may still be opening the pack (it accepts nothing until then).
    # Fresh connections until each worker has answered one (its counter file appears with its first request).
    while len(_worker_files(_metrics_dir(proc))) < 2:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"only {_worker_files(_metrics_dir(proc))} of 2 workers answered"
        httpx.get(f"{url}/health", timeout=10, headers={"Connection": "close"})
    yield url, proc
    if proc.poll() is None:  # a test failed before the SIGTERM one: stop it the same way (a SIGKILL would orphan the
        proc.terminate()     # workers and leave the metrics folder behind)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=30)


def _metrics_dir(proc) -> str:
    """The folder the parent made for its workers, as a worker process sees it (Linux /proc)."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        children = f.read().split()
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        if b"PROMETHEUS_MULTIPROC_DIR" in env:
            return env[b"PROMETHEUS_MULTIPROC_DIR"].decode()
    raise AssertionError(f"no worker of {proc.pid} has PROMETHEUS_MULTIPROC_DIR")


def _worker_files(metrics_dir: str) -> list[str]:
    """Each worker's counter file (`counter_<pid>.db`), written from its first request on."""
    return sorted(f for f in os.listdir(metrics_dir) if f.startswith("counter_"))


def _reranks_per_worker(metrics_dir: str) -> dict[str, float]:
    """/v1/rerank requests each worker counted, read from its own file alone (prometheus-client's collector pointed at
    a folder holding just that file)."""
    import shutil
    import tempfile

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    counts = {}
    for name in _worker_files(metrics_dir):
        with tempfile.TemporaryDirectory() as one:
            shutil.copy(os.path.join(metrics_dir, name), one)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=one)
            counts[name] = sum(s.value for m in registry.collect() for s in m.samples
                               if s.name == "retrv_requests_total" and s.labels.get("endpoint") == "/v1/rerank")
    return counts


def test_a_burst_across_two_workers_is_counted_in_full(workers2):
    url, proc = workers2
    n = 32

    async def burst():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)  # a fresh connection each
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async def one(i):
                r = await client.post(f"{url}/v1/rerank", json={"query": "picture 1",
                                                                 "documents": [f"picture {i}", "picture 1"]})
                return r.status_code

            return await asyncio.gather(*(one(i) for i in range(n)))

    metrics_dir = _metrics_dir(proc)
    first = _reranks_per_worker(metrics_dir)
    assert len(first) == 2, first
    # which worker accepts a connection is the kernel's choice: one may take a whole burst. Bursts until both have
    # answered some (each burst counted in full, whichever workers took it); 8 bursts of 32 all on one is a fault.
    for _ in range(8):
        text = httpx.get(f"{url}/metrics").text
        before = _metric(text, "retrv_requests_total", endpoint="/v1/rerank")
        before_200 = _metric(text, "retrv_requests_total", endpoint="/v1/rerank", status="200")
        codes = asyncio.run(burst())
        assert set(codes) <= {200, 429} and codes.count(200) >= 1, codes
        text = httpx.get(f"{url}/metrics").text
        assert _metric(text, "retrv_requests_total", endpoint="/v1/rerank") - before == n
        assert _metric(text, "retrv_requests_total", endpoint="/v1/rerank", status="200") - before_200 \
            == codes.count(200)
        assert _gauge(text, "retrv_queue_depth") == 0
        now = _reranks_per_worker(metrics_dir)
        assert sum(now.values()) == _metric(text, "retrv_requests_total", endpoint="/v1/rerank")  # /metrics: the sum
        if all(now[w] > first[w] for w in first):
            break
    assert all(now[w] > first[w] for w in first), f"every burst went to one worker: {first} -> {now}"


def test_a_write_through_one_worker_is_seen_by_every_worker(workers2):
    url, _ = workers2
    r = httpx.post(f"{url}/v1/documents", json={"documents": [{"did": "w1", "txt": "written once"}]}, timeout=60)
    assert r.status_code == 200, r.text
    for _ in range(8):  # fresh connections land on either worker: each picks up the commit
        r = httpx.post(f"{url}/v1/search", json={"text": "written once", "rerank": False}, timeout=60,
                       headers={"Connection": "close"})
        assert "w1" in [x["did"] for x in r.json()["ranked"]]


def test_sigterm_drains_in_flight_requests_then_exits_0(workers2):
    url, proc = workers2
    metrics_dir = _metrics_dir(proc)
    slow = {"query": "picture 1", "documents": [f"picture {i} and some words" for i in range(1000)]}  # ~seconds

    async def timed_post(client):
        response = await client.post(f"{url}/v1/rerank", json=slow)
        return response, time.monotonic()

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            task = asyncio.create_task(timed_post(client))
            while _gauge((await client.get(f"{url}/metrics")).text, "retrv_queue_depth") < 1:
                assert not task.done(), "the slow request finished before SIGTERM; make it slower"
                await asyncio.sleep(0.02)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)  # uvicorn's supervisor passes SIGTERM on to its workers within 0.5 s
            refused = None
            try:
                async with httpx.AsyncClient(timeout=3) as fresh:
                    refused = (await fresh.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["a"]})).status_code
            except httpx.TransportError as e:
                refused = type(e).__name__
            answer, answered = await task
            return answer, answered - signalled, refused

    answer, after_signal, refused = asyncio.run(scenario())
    assert after_signal > 0  # in flight when SIGTERM came (a loaded machine may answer it within the second after)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 1000
    assert refused != 200, refused  # a new request after SIGTERM is not served
    assert proc.wait(timeout=60) == 0
    assert not os.path.exists(metrics_dir)  # the parent removed the metrics folder
