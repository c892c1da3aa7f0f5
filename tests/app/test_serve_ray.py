"""app/serve_ray.py: `retrv serve --ray` deploys the same app as Ray Serve replicas; answers equal the
single-process server's. The deployment test starts a local Ray cluster (head on loopback) with 2 replicas, which
takes both cores and tens of seconds: it is behind the `slow` marker."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from retrv.app.cli import main as cli  # noqa: E402
from retrv.runtime.errors import InputError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import Running  # noqa: E402

QUERIES = [{"text": "picture 3", "k": 8}, {"text": "picture 6", "k": 6}, {"text": "a caption", "k": 8}]
RERANK = {"query": "picture 2", "documents": ["picture 2", "a caption without a picture", "picture 9", "picture 4"]}


def test_flags_without_ray_and_lite_indexes_are_refused_in_one_line(tiny_pack, tmp_path, capsys):
    assert cli(["serve", "--pack", str(tiny_pack), "--replicas", "2"]) == 2
    assert "without --ray; expected them with --ray" in capsys.readouterr().err
    assert cli(["serve", "--pack", str(tiny_pack), "--ray", "--replicas", "3", "--max-replicas", "2"]) == 2
    assert "--max-replicas 2; expected at least --replicas (3)" in capsys.readouterr().err
    pytest.importorskip("pymilvus")
    sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
    from index_worker import FakeEncoder, rows

    from retrv.app.serve_ray import check_shareable
    from retrv.runtime.index.milvus import LOCAL_DB, release_local
    from retrv.runtime.index.store import Index

    index = Index.build(FakeEncoder(), rows("b", 0, 4), tmp_path / "ix", vector_store="milvus")
    with pytest.raises(InputError, match="keeps its vectors in Milvus Lite .* one process at a time"):
        check_shareable(index)
    release_local(tmp_path / "ix" / LOCAL_DB)


def _answers(url: str) -> tuple[list, dict]:
    with httpx.Client(base_url=url, timeout=300) as c:
        searched = []
        for q in QUERIES:
            r = c.post("/v1/search", json=q)
            assert r.status_code == 200, r.text
            searched.append([(d["did"], d["coarse_rank"]) for d in r.json()["ranked"]])
        r = c.post("/v1/rerank", json=RERANK)
        assert r.status_code == 200, r.text
        reranked = [(x["index"], round(x["relevance_score"], 5)) for x in r.json()["results"]]
    return searched, reranked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ray_serve_replicas_answer_as_the_single_process_server(tiny_pack, tiny_index):
    pytest.importorskip("ray.serve", reason="the Ray test needs ray[serve] (the scale extra)")
    from retrv.app.serve import create_app
    from retrv.app.serve_ray import start, stop

    with Running(create_app(str(tiny_pack), str(tiny_index))) as url:
        want = _answers(url)
    port = _free_port()
    start(tiny_pack, tiny_index, host="127.0.0.1", port=port, replicas=2, num_cpus=2, threads=1)
    try:
        import ray
        from ray import serve

        status = serve.status().applications["retrv"]
        assert len(status.deployments["RetrvReplica"].replica_states) == 1  # {RUNNING: 2}
        assert sum(status.deployments["RetrvReplica"].replica_states.values()) == 2
        url = f"http://127.0.0.1:{port}"
        for _ in range(2):  # requests land on both replicas
            assert _answers(url) == want
        assert ray.is_initialized()
    finally:
        stop()
