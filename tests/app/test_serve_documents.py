"""`POST/DELETE /v1/documents` over real HTTP: candidates added and deleted through the crash-safe index, their
inline images stored inside the index folder and covered by its manifest."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_serve import Running, _data_url  # noqa: E402  (tests/app is on sys.path: pytest's rootdir-relative import)


@pytest.fixture(scope="module")
def served_index(tiny_pack, tiny_index, tmp_path_factory):
    """A copy of the tiny index (the session's is shared) behind a server with an index."""
    from retrv.app.serve import create_app
    from retrv.app.serve_engine import Engine
    from retrv.runtime.index.store import Index
    from retrv.runtime.pack import Pack

    path = tmp_path_factory.mktemp("served") / "index"
    shutil.copytree(tiny_index, path)
    pack = Pack.open(tiny_pack)
    engine = Engine(pack, Index.open(path, pack=pack))
    with Running(create_app(None, engine=engine)) as url:
        yield url, path


def _delete(url, dids):
    return httpx.request("DELETE", f"{url}/v1/documents", json={"dids": dids}, timeout=60)


def _found(url, text, k=50):
    r = httpx.post(f"{url}/v1/search", json={"text": text, "k": k, "rerank": False}, timeout=60)
    assert r.status_code == 200, r.text
    return [x["did"] for x in r.json()["ranked"]]


def test_add_search_delete_and_the_folder_verifies(served_index, capsys):
    from PIL import Image

    from retrv.app.cli import main
    from retrv.app.demo import synthetic_image
    from retrv.runtime.index.store import Index

    url, path = served_index
    picture = _data_url(synthetic_image(7, (96, 120)))
    docs = [{"did": "new-img", "txt": "a brand new picture", "modality": "image,text", "image": picture},
            {"did": "new-txt", "txt": "a brand new caption"}]
    r = httpx.post(f"{url}/v1/documents", json={"documents": docs}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 2 and r.json()["count"] == 17
    assert {"new-img", "new-txt"} <= set(_found(url, "a brand new picture"))
    head = json.loads((path / "index.json").read_text())
    (name,) = head["images"]  # the image is in the folder and in the manifest
    assert name.startswith("images/") and name.endswith(".png") and (path / name).is_file()
    assert Image.open(path / name).size == (120, 96)
    row = next(json.loads(x) for x in (path / f"g{head['generation']:06d}" / "candidates.jsonl").open()
               if '"new-img"' in x)
    assert row["img_path"] == name  # relative: the folder can move
    assert Index.open(path).row(Index.open(path).snapshot().label("new-img"))["img_path"] == str(path / name)
    assert main(["index", "info", str(path)]) == 0  # verifies every file, the image included
    capsys.readouterr()

    r = _delete(url, ["new-img"])
    assert r.status_code == 200 and r.json()["count"] == 16
    assert "new-img" not in _found(url, "a brand new picture") and "new-txt" in _found(url, "a brand new caption")
    assert "images" not in json.loads((path / "index.json").read_text())  # no live row uses it any more
    assert (path / name).exists()  # the generation before still uses it (a reader may hold it) ...
    assert _delete(url, ["new-txt"]).status_code == 200
    assert not (path / name).exists()  # ... and the next write drops it
    assert main(["index", "info", str(path)]) == 0


def test_document_errors_are_one_line_with_their_status(served_index):
    from PIL import Image

    from retrv.app.demo import synthetic_image

    url, _ = served_index
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")  # decodes, but the index stores PNG, JPEG and WebP only

    def add(docs):
        return httpx.post(f"{url}/v1/documents", json={"documents": docs}, timeout=60)

    cases = [
        (add([{"did": "c1", "txt": "again"}]), 409, "did 'c1' is already in the index"),
        (_delete(url, ["c2", "nope"]), 404, "did 'nope' is not in the index"),
        (add([{"did": "x", "txt": "t", "img_path": "/etc/passwd"}]), 422, "img_path"),
        (add([{"did": "x", "image": "https://example.com/a.png"}]), 400, "fetches no URL"),
        (add([{"did": "x"}]), 422, "neither txt nor image"),
        (add([{"txt": "no did"}]), 422, "did"),
        (add([]), 422, "documents: got 0"),
        (add([{"did": "y", "image": "data:image/gif;base64,R0lGODlhAQABAAAAACw="}]), 400, "not a readable image"),
        (add([{"did": "g", "image": "data:image/gif;base64," + base64.b64encode(gif.getvalue()).decode()}]), 422,
         "expected PNG, JPEG or WebP"),
    ]
    for r, status, part in cases:
        assert r.status_code == status, (part, r.text)
        assert part in r.json()["message"] and "\n" not in r.json()["message"]
    assert "c2" in _found(url, "picture 2")  # the refused delete deleted nothing
    assert add([{"did": "ok", "image": _data_url(synthetic_image(3, (64, 64)))}]).status_code == 200


def test_documents_without_an_index_is_404(tiny_pack):
    from retrv.app.serve import create_app

    with Running(create_app(tiny_pack)) as url:
        r = httpx.post(f"{url}/v1/documents", json={"documents": [{"did": "a", "txt": "b"}]})
        assert r.status_code == 404 and "has no index" in r.json()["message"]
        assert _delete(url, ["a"]).status_code == 404
