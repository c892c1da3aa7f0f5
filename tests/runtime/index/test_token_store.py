"""runtime/index/token_store.py: the sharded token store returns the index's tokens byte for byte, and a search
reading through it (coarse stage, ICM, inspections, answer) is identical to one reading the index's own cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from retrv.runtime.errors import CacheFileError, IndexFileError, InputError
from retrv.runtime.index.store import Index
from retrv.runtime.index.token_cache import TokenCache
from retrv.runtime.index.token_store import LOCATOR, SHARDS_JSON, ShardedTokenStore, TokenStore, shard_of

sys.path.insert(0, str(Path(__file__).parents[2] / "reliability"))
from index_worker import FakeEncoder, rows  # noqa: E402


@pytest.fixture(scope="module")
def sharded(tiny_index, tmp_path_factory):
    index = Index.open(tiny_index)
    out = tmp_path_factory.mktemp("shards") / "tokens"
    return index, ShardedTokenStore.write(index.cache, [r["did"] for r in index.rows], out, shards=3)


def test_the_sharded_store_returns_byte_identical_tokens(sharded):
    index, store = sharded
    cache = index.cache
    assert isinstance(cache, TokenStore) and isinstance(store, TokenStore)
    assert (store.count, store.hidden, store.has_t_con, store.shards) == (cache.count, cache.hidden, True, 3)
    np.testing.assert_array_equal(store.lengths, cache.lengths)
    used = set()
    for i, row in enumerate(index.rows):
        (q1, s1), (q2, s2) = cache.quantized(i), store.quantized(i)
        assert q1.tobytes() == q2.tobytes() and s1.tobytes() == s2.tobytes()
        assert cache.tokens(i).tobytes() == store.tokens(i).tobytes() and cache.grid(i) == store.grid(i)
        used.add(shard_of(row["did"], 3))
    labels = np.arange(cache.count)[::-1]
    assert cache.t_con(labels).tobytes() == store.t_con(labels).tobytes()
    assert len(used) > 1  # the candidates really are spread over shards (by their id's hash)
    with pytest.raises(InputError, match="candidate index 99: out of range"):
        store.tokens(99)


def test_a_search_through_the_sharded_store_is_identical(sharded, tiny_pack):
    from retrv.runtime.pack import Pack
    from retrv.runtime.retriever import Retriever

    index, store = sharded
    retriever = Retriever(Pack.open(tiny_pack), index, backend="ort")
    queries = [("picture 3", None), ("picture 5", None), ("a caption", None)]
    before = [retriever.search(t, k=8).to_dict() for t, _ in queries]
    index.use_token_store(store)
    assert index.snapshot().cache is store
    after = [retriever.search(t, k=8).to_dict() for t, _ in queries]
    index.use_token_store(None)
    for a, b in zip(before, after):
        for d in (a, b):
            d.pop("timings_ms")
            for w in d.get("windows") or []:
                w.pop("timings_ms", None)
        assert a == b


def test_a_store_of_other_rows_or_a_modified_store_is_refused(tmp_path, sharded):
    index, store = sharded
    other = Index.build(FakeEncoder(), rows("b", 0, 6), tmp_path / "ix")
    with pytest.raises(IndexFileError, match=r"a token store of \(count, hidden, has_t_con\) = \(15, .*expected"):
        other.use_token_store(store)
    src = ShardedTokenStore.write(other.cache, [r["did"] for r in other.rows], tmp_path / "st", shards=2)
    other.use_token_store(src)
    other.add(rows("a", 0, 1), encoder=FakeEncoder())  # a new generation: the store no longer matches
    with pytest.raises(IndexFileError, match=r"\(6, 8, True\); expected \(7, 8, True\)"):
        other.snapshot()
    (tmp_path / "st" / LOCATOR).write_bytes(bytes(6 * 16))
    with pytest.raises(CacheFileError, match="sha256"):
        ShardedTokenStore.open(tmp_path / "st")
    meta = json.loads((tmp_path / "st" / SHARDS_JSON).read_text())
    (tmp_path / "st" / SHARDS_JSON).write_text(json.dumps({**meta, "shards": 0}))
    with pytest.raises(CacheFileError, match="shards is 0; expected an integer >= 1"):
        ShardedTokenStore.open(tmp_path / "st")
    with pytest.raises(InputError, match="shards: got 0; expected an integer in"):
        ShardedTokenStore.write(other.cache, [r["did"] for r in other.rows], tmp_path / "st2", shards=0)
    assert isinstance(TokenCache.open(tmp_path / "st" / "s000", verify="size"), TokenStore)
