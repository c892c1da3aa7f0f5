"""`retrv serve` over real HTTP: uvicorn on a free loopback port in a thread, the stock cohere clients and httpx.

One Engine (the tiny pack and index, opened once for the module) is shared by the apps under test; each test builds
the app it needs around it (API key, queue size, limits)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Running:
    """uvicorn.Server in a daemon thread on 127.0.0.1, port chosen by the OS."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def engine(tiny_pack, tiny_index):
    from retrv.app.serve_engine import Engine
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack

    pack = Pack.open(tiny_pack)
    return Engine(pack, Index.open(tiny_index, pack=pack))


@pytest.fixture(scope="module")
def server(engine):
    from retrv.app.serve import create_app

    with Running(create_app(None, engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def picture(tiny_corpus):
    from PIL import Image

    return _data_url(Image.open(tiny_corpus / "3.png"))


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _check_ranking(results, n_docs, top_n=None):
    assert len(results) == (top_n or n_docs)
    assert len({r.index for r in results}) == len(results)
    assert all(0 <= r.index < n_docs for r in results)
    scores = [r.relevance_score for r in results]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(a > b for a, b in zip(scores, scores[1:]))  # strictly decreasing with our rank


def test_cohere_v1_client_reranks_text_and_image_documents(server, picture):
    cohere = pytest.importorskip("cohere")
    co = cohere.Client(api_key="unused", base_url=server, timeout=60, client_name="retrv-test")
    docs = ["picture 1", "a caption without a picture", picture, "picture 3", "something else"]
    r = co.rerank(model="retrv", query="picture 3", documents=docs, return_documents=True)
    _check_ranking(r.results, len(docs))
    assert {x.document.text for x in r.results if x.index != 2} == {d for i, d in enumerate(docs) if i != 2}
    top = co.rerank(model="retrv", query="picture 3", documents=docs, top_n=2)
    _check_ranking(top.results, len(docs), top_n=2)
    assert [x.index for x in top.results] == [x.index for x in r.results[:2]]  # deterministic (greedy)
    assert r.meta.tokens.input_tokens > 0


def test_cohere_v2_client_reranks(server, picture):
    cohere = pytest.importorskip("cohere")
    co = cohere.ClientV2(api_key="unused", base_url=server, timeout=60)
    docs = [picture, "picture 1", "picture 2"]
    r = co.rerank(model="retrv", query="picture 3", documents=docs)
    _check_ranking(r.results, len(docs))


def test_raw_http_object_documents_meta_and_cache(server, picture, engine):
    docs = [{"text": "picture 3", "image": picture}, {"text": "plain text"}, "picture 9"]
    body = {"query": "picture 3", "documents": docs, "return_documents": True}
    first = httpx.post(f"{server}/v1/rerank", json=body, timeout=60).json()
    assert sorted(r["index"] for r in first["results"]) == [0, 1, 2]
    assert first["results"][0]["document"] in docs
    meta = first["meta"]["retrv"]
    assert meta["tokens"]["total_tokens"] > 0 and meta["timings_ms"]["total"] > 0
    hits = engine.cache.hits
    again = httpx.post(f"{server}/v1/rerank", json=body, timeout=60).json()
    assert engine.cache.hits == hits + 1  # the repeated image was not re-encoded
    assert [r["index"] for r in again["results"]] == [r["index"] for r in first["results"]]


def test_deadline_sets_a_token_budget_and_reports_it(server):
    body = {"query": "picture 1", "documents": [f"picture {i}" for i in range(6)], "deadline_ms": 1}
    r = httpx.post(f"{server}/v1/rerank", json=body, timeout=60)
    assert r.status_code == 200
    plan = r.json()["meta"]["retrv"]["deadline"]
    assert plan["deadline_ms"] == 1 and plan["budget"]["token"] >= 1 and plan["ms_per_token"] > 0
    assert sorted(x["index"] for x in r.json()["results"]) == list(range(6))  # a ranking even when it runs out


@pytest.mark.parametrize("query", [{"text": "picture 1"}, {"text": "picture 3", "image": "3.png"}])
def test_search_equals_the_cli(server, tiny_pack, tiny_index, tiny_corpus, capsys, query):
    from PIL import Image

    from retrv.app.cli import main

    argv = ["search", str(tiny_index), "--pack", str(tiny_pack), "--text", query["text"], "--json"]
    body = {"text": query["text"]}
    if "image" in query:
        argv += ["--image", str(tiny_corpus / query["image"])]
        body["image"] = _data_url(Image.open(tiny_corpus / query["image"]))
    assert main(argv) == 0
    cli = json.loads(capsys.readouterr().out)
    got = httpx.post(f"{server}/v1/search", json=body, timeout=60).json()
    assert set(got) == set(cli)
    assert [r["did"] for r in got["ranked"]] == [r["did"] for r in cli["ranked"]]
    assert [r["score"] for r in got["ranked"]] == pytest.approx([r["score"] for r in cli["ranked"]], abs=1e-5)
    assert got["answer"] == cli["answer"] and got["tokens"] == cli["tokens"]


def test_health_and_image_url_refused(server):
    assert httpx.get(f"{server}/health").status_code == 200
    for url in ("http://example.com/a.png", "file:///etc/passwd"):
        r = httpx.post(f"{server}/v1/rerank", json={"query": "q", "documents": ["a", {"image": url}]})
        assert r.status_code == 400, r.text
        assert "\n" not in r.json()["message"]
    r = httpx.post(f"{server}/v1/rerank", json={"query": "q", "documents": ["https://example.com/x.jpg"]})
    assert r.status_code == 400


def test_api_key_required_and_no_work_done(engine, monkeypatch):
    from retrv.app.serve import create_app

    calls = []
    real = engine.rerank
    monkeypatch.setattr(engine, "rerank", lambda *a, **k: calls.append(1) or real(*a, **k))
    body = {"query": "picture 1", "documents": ["picture 1", "picture 2"]}
    with Running(create_app(None, engine=engine, api_key="s3cret")) as url:
        assert httpx.post(f"{url}/v1/rerank", json=body).status_code == 401
        assert httpx.post(f"{url}/v1/rerank", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert calls == []
        assert httpx.get(f"{url}/health").status_code == 200
        ok = httpx.post(f"{url}/v1/rerank", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200 and calls == [1]
        cohere = pytest.importorskip("cohere")
        with pytest.raises(cohere.errors.UnauthorizedError):
            cohere.Client(api_key="nope", base_url=url, timeout=30).rerank(query="q", documents=["a"], model="m")
        assert len(cohere.Client(api_key="s3cret", base_url=url, timeout=60).rerank(
            query="q", documents=["a", "b"], model="m").results) == 2


def test_limits_refused_with_one_line(engine):
    from PIL import Image

    from retrv.app.serve import create_app
    from retrv.app.serve_engine import ServeLimits

    limits = ServeLimits(max_body_bytes=20_000, max_documents=3, max_text_chars=100, max_image_pixels=32 * 32)
    big = _data_url(Image.new("RGB", (64, 64), (200, 10, 10)))
    with Running(create_app(None, engine=engine, limits=limits, model_name="retrv-tiny")) as url:
        def post(body, **kw):
            r = httpx.post(f"{url}/v1/rerank", timeout=60, **kw, json={"model": "retrv-tiny", **body})
            if r.status_code != 200:
                assert "\n" not in r.json()["message"] and r.json()["message"]
            return r.status_code

        assert post({"query": "q", "documents": ["x" * 30_000]}) == 413
        assert post({"query": "q", "documents": ["a", "b", "c", "d"]}) == 422
        assert post({"query": "q", "documents": ["a" * 101]}) == 422
        assert post({"query": "q" * 101, "documents": ["a"]}) == 422
        assert post({"query": "q", "documents": [big]}) == 422
        assert post({"query": "q", "documents": []}) == 422
        assert post({"query": "q"}) == 422  # schema: documents missing
        assert post({"query": "q", "documents": ["a"], "model": "other"}) == 400
        assert post({"query": "q", "documents": ["a", "b"]}) == 200


def test_burst_is_answered_200_or_429_and_counted(engine, monkeypatch):
    from retrv.app.serve import create_app

    real = engine.rerank

    def slow(*a, **k):  # every admitted request holds its worker a while, so the burst overflows the queue
        time.sleep(0.05)
        return real(*a, **k)

    monkeypatch.setattr(engine, "rerank", slow)
    n = 48
    with Running(create_app(None, engine=engine, slots=1, max_queue=2)) as url:
        async def burst():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
                async def one(i):
                    t0 = time.perf_counter()
                    r = await client.post(f"{url}/v1/rerank",
                                          json={"query": "picture 1", "documents": [f"picture {i}", "picture 1"]})
                    return r, time.perf_counter() - t0

                async def probe():
                    await asyncio.sleep(0.02)
                    return (await client.get(f"{url}/health")).status_code

                return await asyncio.gather(*(one(i) for i in range(n))), await probe()

        answers, health_during = asyncio.run(burst())
        codes = [r.status_code for r, _ in answers]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(200) >= 1 and codes.count(429) >= 1
        assert all(r.headers["retry-after"] == "1" for r, _ in answers if r.status_code == 429)
        assert all(dt < 5 for r, dt in answers if r.status_code == 429)  # refused at once, not after a wait
        assert health_during == 200 and httpx.get(f"{url}/health").status_code == 200
        text = httpx.get(f"{url}/metrics").text
        assert _metric(text, "retrv_requests_total", endpoint="/v1/rerank") == n
        assert _metric(text, "retrv_requests_total", endpoint="/v1/rerank", status="429") == codes.count(429)
        assert _metric(text, "retrv_refusals_total", reason="queue_full") == codes.count(429)
        assert "retrv_queue_depth 0.0" in text
        assert "retrv_request_latency_seconds_bucket" in text and "retrv_tokens_per_query_count" in text


def test_search_without_index_is_404_and_openapi_lists_endpoints(tiny_pack):
    from retrv.app.serve import create_app

    with Running(create_app(tiny_pack)) as url:
        assert httpx.post(f"{url}/v1/search", json={"text": "x"}).status_code == 404
        paths = httpx.get(f"{url}/openapi.json").json()["paths"]
        assert {"/v1/rerank", "/v2/rerank", "/v1/search", "/health", "/metrics"} <= set(paths)
        r = httpx.post(f"{url}/v1/rerank", json={"query": "picture 1", "documents": ["picture 1", "x"]}, timeout=60)
        assert r.status_code == 200


def test_cli_serve_flags_env_key_and_demo(monkeypatch, capsys, tiny_pack, tiny_index):
    import retrv.app.demo
    import retrv.app.serve
    from retrv.app.cli import main
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack

    calls = []
    monkeypatch.setattr(retrv.app.serve, "serve", lambda pack, index, **kw: calls.append((pack, index, kw)))
    assert main(["serve"]) == 2
    assert main(["serve", "--demo", "--pack", "p"]) == 2
    assert "expected `retrv serve [INDEX] --pack PACK` or `retrv serve --demo`" in capsys.readouterr().err
    monkeypatch.setenv("RETRV_API_KEY", "from-env")
    assert main(["serve", str(tiny_index), "--pack", str(tiny_pack), "--port", "0", "--max-queue", "3"]) == 0
    pack, index, kw = calls[-1]
    assert (pack.path, index.path, kw["api_key"], kw["host"], kw["max_queue"], kw["workers"]) == \
        (Pack.open(tiny_pack).path, tiny_index, "from-env", "127.0.0.1", 3, 1)  # opened and verified first
    assert main(["serve", "--pack", str(tiny_pack), "--api-key", "flag"]) == 0 and calls[-1][2]["api_key"] == "flag"
    n = len(calls)
    assert main(["serve", "nowhere", "--pack", str(tiny_pack)]) == 2 and len(calls) == n  # refused before serving
    assert "nowhere: index directory not found" in capsys.readouterr().err
    demo_pack, demo_index = Pack.open(tiny_pack), Index.open(tiny_index)
    monkeypatch.setattr(retrv.app.demo, "build_demo",
                        lambda cache_dir, *a: ("root", "data", demo_pack, "be", demo_index, {}))
    assert main(["serve", "--demo"]) == 0 and calls[-1][:2] == (demo_pack, demo_index)
    monkeypatch.setattr(retrv.app.demo, "build_demo", lambda cache_dir, *a: None)
    assert main(["serve", "--demo"]) == 2


def test_cors_headers_only_for_the_origins_named(engine):
    from retrv.app.serve import create_app
    from retrv.runtime.errors import RetrvError

    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with Running(create_app(None, engine=engine)) as url:
        r = httpx.get(f"{url}/health", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in httpx.options(f"{url}/v1/rerank", headers=preflight).headers
    with Running(create_app(None, engine=engine, api_key="k", cors_origins=("https://app.example",))) as url:
        r = httpx.options(f"{url}/v1/rerank", headers=preflight)  # a preflight carries no key: answered anyway
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["a"]},
                       headers={"Origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.get(f"{url}/health", headers={"Origin": "https://other.example"})
        assert "access-control-allow-origin" not in r.headers
    with pytest.raises(RetrvError, match="cors origin: got 'app.example'; expected"):
        create_app(None, engine=engine, cors_origins=("app.example",))


def test_cli_search_deadline_reports_the_budget_it_chose(tiny_pack, tiny_index, capsys):
    from retrv.app.cli import main

    argv = ["search", str(tiny_index), "--pack", str(tiny_pack), "--text", "picture 1"]
    assert main(argv + ["--deadline-ms", "5000", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    plan = d["deadline"]
    assert plan["deadline_ms"] == 5000 and plan["ms_per_token"] > 0 and plan["total_ms"] > 0
    assert plan["budget"]["token"] >= 1 and plan["budget"]["think"] == 128
    assert main(argv + ["--deadline-ms", "0.001", "--json"]) == 0  # too tight for any prompt: the coarse order
    tight = json.loads(capsys.readouterr().out)
    assert tight["deadline"]["budget"]["token"] == 1 and tight["tokens"]["budget_exhausted"]
    assert main(argv + ["--deadline-ms", "5000"]) == 0
    assert "deadline 5000 ms: token budget" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's one-line usage error
        main(argv + ["--deadline-ms", "-3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--deadline-ms: got '-3'; expected milliseconds > 0" in err and "Traceback" not in err
    assert main(["search", str(tiny_index), "--pack", str(tiny_pack), "--text", "x", "--json"]) == 0
    assert "deadline" not in json.loads(capsys.readouterr().out)
