"""`retrv serve`: the reranker and the index behind a Cohere-compatible HTTP API (FastAPI + uvicorn, the `serve`
extra).

    POST /v1/rerank   Cohere v1: query, documents, top_n, return_documents, model -> {id, results, meta}
    POST /v2/rerank   Cohere v2 (what cohere.ClientV2.rerank sends): query, documents, top_n, model
    POST /v1/search   a text and/or data-URL image query against the index -> what `retrv search --json` prints
    POST /v1/documents    add M-BEIR candidate rows (images inline as data URLs) to the index
    DELETE /v1/documents  delete candidates by did
    GET  /health      200 once the pack (and index) are open
    GET  /metrics     Prometheus text: requests by endpoint and status, queue depth, latencies, tokens, refusals

Concurrency (docs/ARCHITECTURE.md, "Serving"): `--workers N` uvicorn processes (default 1), each with its own
pack, index and ONNX Runtime session (threads = cores / N unless --threads). In each, the event loop only parses,
checks and answers; the model work runs in a pool of `slots` threads (default 1; ONNX Runtime's `run()` is
thread-safe and each request builds its own decode session). Admission is a counter on each worker's event loop:
at most `slots` running plus `max_queue` waiting; the next request is answered 429 with Retry-After at once, never
queued without bound. With N workers, /metrics sums every worker (prometheus-client's multiprocess mode).

Order of checks per request, cheapest first, before any model work: API key (401), body size (413), schema
(422), document count and text lengths (422), the queue (429); then in the worker thread, before the model, the
images (URLs 400, pixels 422): decoding them off the event loop keeps the loop free to refuse at once.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' body types (classes local to create_app)
# from their live annotations.
import asyncio
import contextlib
import hmac
import json
import logging
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Union

from retrv.app.serve_engine import Engine, RequestRefused, ServeLimits, decode_image, parse_document
from retrv.runtime.errors import RetrvError
from retrv.runtime.rerank.budget import DEFAULT_K, DEFAULT_STRIDE, DEFAULT_WINDOW, Budget
from retrv.runtime.rerank.deadline import MAX_DEADLINE_MS

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a full queue drains in about one request's time on 2 cores; clients back off and retry
OPEN_PATHS = ("/health",)  # reachable without the API key: a load balancer's probe carries none


def _one_line(text: object, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode: set by `serve` for N workers


class Metrics:
    """prometheus-client collectors in a registry of this app's own (several apps in one process do not clash).

    With several worker processes (`PROMETHEUS_MULTIPROC_DIR` set before they start), every process writes its
    values to files in that folder and `/metrics`, whichever worker answers it, sums them over all workers."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = r = CollectorRegistry()
        self.requests = Counter("retrv_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.queue = Gauge("retrv_queue_depth", "requests admitted and not yet finished (running + waiting)",
                           registry=r, multiprocess_mode="livesum")  # summed over the live workers
        self.latency = Histogram("retrv_request_latency_seconds", "request latency, arrival to answer", ["endpoint"],
                                 registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.stage = Histogram("retrv_stage_latency_seconds", "time per stage of a request", ["stage"], registry=r,
                               buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tokens = Histogram("retrv_tokens_per_query", "decoder tokens per reranked query", registry=r,
                                buckets=(16, 64, 256, 1024, 4096, 16384, 65536))
        self.exhausted = Counter("retrv_budget_exhausted", "queries that ran out of a budget", ["budget"],
                                 registry=r)
        self.refusals = Counter("retrv_refusals", "requests refused before any model work", ["reason"], registry=r)

    def text(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        every = CollectorRegistry()
        MultiProcessCollector(every)  # reads every worker's files
        return generate_latest(every)

    def close(self) -> None:
        """This worker is stopping: its live gauges (queue depth) leave the sum."""
        if self.multiprocess:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(os.getpid())


class Gate:
    """Pure ASGI middleware, outermost: counts and times every request, then checks the API key and the body size
    before the app reads anything (so a refused request does no work)."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, started, status = scope["path"], time.perf_counter(), [500]
        scope["retrv.arrived"] = started  # a deadline counts from here: reading and parsing the body included

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope, path)
            if refusal is not None:
                code, reason, detail = refusal
                self.metrics.refusals.labels(reason).inc()
                await _send_json(send_status, code, {"message": detail},
                                 [(b"www-authenticate", b"Bearer")] if code == 401 else [])
            else:
                await self.app(scope, self._counted(receive), send_status)
        except _TooLarge:
            self.metrics.refusals.labels("body_size").inc()
            await _send_json(send_status, 413, {"message": f"request body: over {self.max_body:,} bytes; expected "
                                                           f"at most {self.max_body:,}"})
        finally:
            endpoint = path if path in _ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def _refuse(self, scope, path: str):
        headers = dict(scope["headers"])
        if self.expected is not None and path not in OPEN_PATHS:
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):  # constant time in the key's length
                return 401, "auth", "authorization: missing or wrong API key; expected 'Authorization: Bearer KEY'"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return 413, "body_size", (f"request body: got {length.decode('latin-1')[:20]} bytes; expected at most "
                                      f"{self.max_body:,}")
        return None

    def _counted(self, receive):
        """A chunked body carries no length: count it as it arrives."""
        seen = [0]

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    raise _TooLarge()
            return message

        return wrapped


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict, headers=()) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": raw})


_ENDPOINTS = ("/v1/rerank", "/v2/rerank", "/v1/search", "/v1/documents", "/health", "/metrics")


def create_app(pack, index=None, *, model_name: str | None = None, api_key: str | None = None, slots: int = 1,
               max_queue: int = 8, threads: int | None = None, inter_op_threads: int = 1, backend: str = "auto",
               limits: ServeLimits | None = None, engine: Engine | None = None, cors_origins: tuple = ()):
    """The FastAPI app (one worker process) over an open `pack` (a Pack or its path) and optional `index` (an Index
    or its path). The engine is opened (and the per-token cost measured) here, before the app is returned.
    `slots`: requests whose model work runs at once in this process (threads sharing its ONNX Runtime session);
    `max_queue`: requests admitted to wait beyond them."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field

    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack

    for name, v in (("slots", slots), ("max_queue", max_queue)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "slots" else 0):
            raise RetrvError(f"{name}: got {v!r}; expected an integer >= {1 if name == 'slots' else 0}")
    for origin in cors_origins:
        if not isinstance(origin, str) or not (origin == "*" or origin.startswith(("http://", "https://"))):
            raise RetrvError(f"cors origin: got {origin!r}; expected '*' or a scheme://host[:port] origin")
    limits = limits or ServeLimits()
    if engine is None:
        pack = pack if isinstance(pack, Pack) else Pack.open(pack)
        if index is not None and not isinstance(index, Index):
            index = Index.open(index, pack=pack)
        engine = Engine(pack, index, backend=backend, threads=threads, inter_op_threads=inter_op_threads,
                        limits=limits)
    metrics = Metrics()
    pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="retrv-serve")
    admitted = [0]  # running + waiting; touched only on the event loop, so no lock
    capacity = slots + max_queue

    class RerankV1(BaseModel):
        query: str
        documents: list[Union[str, dict[str, Any]]]
        top_n: int | None = Field(None, ge=1)
        return_documents: bool = False
        model: str | None = None
        deadline_ms: float | None = Field(None, gt=0, le=MAX_DEADLINE_MS)
        max_chunks_per_doc: int | None = None  # Cohere's; accepted, documents are never chunked here

    class RerankV2(BaseModel):
        query: str
        documents: list[Union[str, dict[str, Any]]]
        top_n: int | None = Field(None, ge=1)
        model: str | None = None
        return_documents: bool = False
        max_tokens_per_doc: int | None = None  # Cohere's; accepted, a document's length is bounded by the context
        deadline_ms: float | None = Field(None, gt=0, le=MAX_DEADLINE_MS)

    class SearchBody(BaseModel):
        text: str | None = None
        image: str | None = None  # a data:image/...;base64, URL
        k: int = Field(DEFAULT_K, ge=1, le=1_000_000)
        window: int = Field(DEFAULT_WINDOW, ge=1)
        stride: int = Field(DEFAULT_STRIDE, ge=1)
        think_budget: int = Field(Budget.think, ge=0)
        inspect_budget: int = Field(Budget.inspect, ge=0)
        tool_budget: int = Field(Budget.tool, ge=0)
        token_budget: int | None = Field(None, ge=1)
        rerank: bool = True
        deadline_ms: float | None = Field(None, gt=0, le=MAX_DEADLINE_MS)

    class DocumentRow(BaseModel):
        """An M-BEIR candidate row; its image inline as a data URL (the service reads no path)."""
        model_config = ConfigDict(extra="forbid")
        did: str = Field(min_length=1, max_length=1024)
        txt: str | None = None
        modality: str | None = None
        image: str | None = None  # data:image/(png|jpeg|webp);base64,...

    class AddBody(BaseModel):
        documents: list[DocumentRow]

    class DeleteBody(BaseModel):
        dids: list[str] = Field(min_length=1)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown(wait=True)  # uvicorn has stopped accepting and let in-flight requests finish
        metrics.close()

    app = FastAPI(title="retrv", version="0.1.0", lifespan=lifespan,
                  description="Cohere-compatible reasoning reranker and multimodal search (retrv-edge)")
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.refusals.labels("schema").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse({"message": _one_line(f"{where or 'body'}: {first.get('msg', 'invalid')}")}, 422)

    @app.exception_handler(_TooLarge)  # a chunked body past the limit, found while the app reads it
    async def _too_large(request: Request, exc: Exception):
        metrics.refusals.labels("body_size").inc()
        return JSONResponse({"message": f"request body: over {limits.max_body_bytes:,} bytes; expected at most "
                                        f"{limits.max_body_bytes:,}"}, 413)

    @app.exception_handler(RetrvError)
    async def _refused(request: Request, exc: RetrvError):
        status = getattr(exc, "status", 422)
        metrics.refusals.labels({400: "bad_input", 404: "not_found", 409: "conflict", 413: "body_size"}
                                .get(status, "limits")).inc()
        return JSONResponse({"message": _one_line(exc)}, status)

    class Admission:
        """At most `capacity` requests admitted (running + waiting); the next is refused 429 at once."""

        async def __aenter__(self):
            if admitted[0] >= capacity:
                metrics.refusals.labels("queue_full").inc()
                raise _QueueFull()
            admitted[0] += 1
            metrics.queue.set(admitted[0])

        async def __aexit__(self, *exc):
            admitted[0] -= 1
            metrics.queue.set(admitted[0])

    class _QueueFull(Exception):
        pass

    @app.exception_handler(_QueueFull)
    async def _full(request: Request, exc: Exception):
        return JSONResponse({"message": f"queue full: capacity {capacity} ({slots} running + {max_queue} "
                                        f"waiting); retry after {RETRY_AFTER_S} s"},
                            429, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def run(fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args, **kwargs))

    def check_model(model: str | None) -> None:
        if model_name is not None and model != model_name:
            raise RequestRefused(f"model: got {model!r}; expected {model_name!r}", 400)

    def record(meta: dict) -> None:
        for stage, ms in meta["timings_ms"].items():
            metrics.stage.labels(stage).observe(ms / 1e3)
        metrics.tokens.observe(meta["tokens"]["total_tokens"])
        for b in meta["tokens"]["budget_exhausted"]:
            metrics.exhausted.labels(b).inc()

    def arrival(request: Request) -> float:
        return request.scope.get("retrv.arrived", time.perf_counter())

    async def rerank(body, version: int, arrived: float):
        check_model(body.model)
        if not body.documents or len(body.documents) > limits.max_documents:
            raise RequestRefused(f"documents: got {len(body.documents):,}; expected 1 to {limits.max_documents:,}")
        if len(body.query) > limits.max_text_chars:
            raise RequestRefused(f"query: got {len(body.query):,} characters; expected at most "
                                 f"{limits.max_text_chars:,}")
        def work():  # in a worker thread: decoding the images keeps the event loop (and its 429s) responsive
            docs = [parse_document(i, d, limits) for i, d in enumerate(body.documents)]
            return engine.rerank(body.query, docs, Budget(), deadline_ms=body.deadline_ms, arrived=arrived)

        async with Admission():
            out = await run(work)
        record(out["meta"])
        n = len(out["order"]) if body.top_n is None else min(body.top_n, len(out["order"]))
        results = []
        for i, score in zip(out["order"][:n], out["scores"][:n]):
            r = {"index": i, "relevance_score": score}
            if body.return_documents:
                d = body.documents[i]
                r["document"] = {"text": d} if isinstance(d, str) else d
            results.append(r)
        meta = {"api_version": {"version": str(version)},
                "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": out["meta"]["tokens"]["prefill_tokens"],
                           "output_tokens": out["meta"]["tokens"]["think_tokens"]},
                "retrv": out["meta"]}
        return {"id": str(uuid.uuid4()), "results": results, "meta": meta}

    @app.post("/v1/rerank")
    async def rerank_v1(body: RerankV1, request: Request):
        """Cohere v1 rerank. A document is a string (a data:image/...;base64, string is an image) or
        {"text", "image"}."""
        return await rerank(body, 1, arrival(request))

    @app.post("/v2/rerank")
    async def rerank_v2(body: RerankV2, request: Request):
        """Cohere v2 rerank (cohere.ClientV2)."""
        return await rerank(body, 2, arrival(request))

    @app.post("/v1/search")
    async def search(body: SearchBody, request: Request):
        """The same JSON as `retrv search --json` (plus "deadline" when deadline_ms was given)."""
        arrived = arrival(request)
        if engine.retriever is None:
            raise RequestRefused("/v1/search: this server has no index; expected `retrv serve INDEX --pack PACK`",
                                 404)
        if body.text is None and body.image is None:
            raise RequestRefused("search: got neither text nor image; expected at least one")
        budget = Budget(think=body.think_budget, inspect=body.inspect_budget, tool=body.tool_budget,
                        token=body.token_budget)
        def work():
            image = decode_image(body.image, "image", limits)[0] if body.image is not None else None
            return engine.search(body.text, image, k=body.k, budget=budget, window=body.window, stride=body.stride,
                                 rerank=body.rerank, deadline_ms=body.deadline_ms, arrived=arrived)

        async with Admission():
            out = await run(work)
        if out.get("tokens"):
            metrics.tokens.observe(out["tokens"]["total_tokens"])
        return out

    @app.post("/v1/documents")
    async def add_documents(body: AddBody):
        """Add candidates to the index (crash-safe: a new generation, committed atomically). 409 if a did is
        already there; nothing is added then."""
        if engine.index is None:
            raise RequestRefused("/v1/documents: this server has no index; expected `retrv serve INDEX --pack PACK`",
                                 404)
        async with Admission():
            return await run(engine.add_documents, [d.model_dump() for d in body.documents])

    @app.delete("/v1/documents")
    async def delete_documents(body: DeleteBody):
        """Delete candidates by did. 404 if one is not in the index; nothing is deleted then."""
        if engine.index is None:
            raise RequestRefused("/v1/documents: this server has no index; expected `retrv serve INDEX --pack PACK`",
                                 404)
        async with Admission():
            return await run(engine.delete_documents, body.dids)

    @app.get("/health")
    async def health():
        return {"status": "ok", "pack": str(engine.pack.path),
                "index": None if engine.index is None else str(engine.index.path),
                "queue": admitted[0], "capacity": capacity}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    outer = gate = Gate(app, metrics, api_key, limits.max_body_bytes)
    if cors_origins:
        # Outside the gate: a browser's preflight carries no API key, and a 401/429 must still be readable by the
        # page. Without --cors-origin no CORS header is sent, so browsers keep other origins out.
        from starlette.middleware.cors import CORSMiddleware

        outer = CORSMiddleware(gate, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                               allow_headers=["authorization", "content-type"], expose_headers=["retry-after"])
    outer.fastapi, outer.engine, outer.metrics, outer.pool = app, engine, metrics, pool
    return outer


CONFIG_ENV = "RETRV_SERVE_CONFIG"  # the parent's arguments, as JSON, for `worker_app` in each worker process


def serve(pack, index=None, *, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
          threads: int | None = None, **kwargs) -> None:
    """Serve until SIGINT/SIGTERM: uvicorn stops accepting, lets in-flight requests finish (they answer 200), then
    the process exits 0.

    `workers` = 1: this process, with the pack and index already open. `workers` = N > 1: N uvicorn worker
    processes, each opening its own pack, index and ONNX Runtime session with `threads` intra-op threads (default:
    cores / N, so the workers do not oversubscribe the cores); metrics are shared through a fresh
    PROMETHEUS_MULTIPROC_DIR, removed at exit. Index writes from several workers are serialised by the index's
    writer lock, and each worker's readers pick up the others' commits (auto-refresh)."""
    import uvicorn

    if workers == 1:
        uvicorn.run(create_app(pack, index, threads=threads, **kwargs), host=host, port=port, log_level="warning")
        return
    from retrv.runtime.backends.ort import physical_cores

    config = {"pack": str(getattr(pack, "path", pack)),
              "index": None if index is None else str(getattr(index, "path", index)),
              "threads": threads or max(1, physical_cores() // workers),
              **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}}
    with tempfile.TemporaryDirectory(prefix="retrv-metrics-") as metrics_dir:
        saved = {k: os.environ.get(k) for k in (MULTIPROC_ENV, CONFIG_ENV)}
        os.environ[MULTIPROC_ENV], os.environ[CONFIG_ENV] = metrics_dir, json.dumps(config)
        try:
            uvicorn.run("retrv.app.serve:worker_app", factory=True, workers=workers, host=host, port=port,
                        log_level="warning")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def worker_app():
    """uvicorn's factory in each worker process: the app over the parent's arguments (CONFIG_ENV)."""
    config = json.loads(os.environ[CONFIG_ENV])
    if "cors_origins" in config:
        config["cors_origins"] = tuple(config["cors_origins"])
    return create_app(config.pop("pack"), config.pop("index"), **config)
