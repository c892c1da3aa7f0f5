"""The candidate token cache: quantization error, layout, memory mapping, refusals, appends and crash safety."""

import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest

from retrv.runtime.errors import CacheFileError, InputError
from retrv.runtime.index.token_cache import (
    CACHE_JSON,
    FORMAT_VERSION,
    TokenCache,
    TokenCacheWriter,
    dequantize_int8,
    quantize_int8,
)

# float32 rounding of the dequantized product q * scale: at most half an ulp of 127 * scale.
PRODUCT_ROUNDING = 2.0**-24 * 127


def gaussian(rng, n, hidden):
    return rng.standard_normal((n, hidden)).astype(np.float32)


def write_cache(path, items, hidden, has_t_con=True, **kw):
    """items: list of (tokens, grid, t_con)."""
    with TokenCacheWriter(path, hidden=hidden, has_t_con=has_t_con, **kw) as w:
        idx = [w.add(t, g, c) for t, g, c in items]
    assert idx == list(range(len(items)))
    return path


def make_items(rng, lengths, hidden, t_con=True):
    # grid (1, 2, 2L): 4L patches, as Qwen2.5-VL's 2x2 merge gives.
    return [(gaussian(rng, n, hidden), (1, 2, 2 * n) if n else None,
             rng.standard_normal(hidden).astype(np.float32) if t_con else None) for n in lengths]


# ------------------------------------------------------------------------------------------- quantization


def test_round_trip_error_within_half_a_step(tmp_path):
    rng = np.random.default_rng(0)
    items = make_items(rng, [64, 64, 33], hidden=256)
    cache = TokenCache.open(write_cache(tmp_path / "c", items, 256))
    for i, (x, _, _) in enumerate(items):
        q, scales = cache.quantized(i)
        y = cache.tokens(i)
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_allclose(scales, np.abs(x).max(axis=1) / 127, rtol=1e-6)
        bound = scales[:, None] * (0.5 + PRODUCT_ROUNDING)
        assert (np.abs(y - x) <= bound).all()
        assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.01
        assert q.dtype == np.int8 and np.abs(q).max() == 127 and q.min() >= -127


def test_zero_and_subnormal_rows_give_no_nan():
    x = np.zeros((3, 8), np.float32)
    x[1, 2] = 1e-44  # max / 127 underflows float32: scale 0, row dequantizes to 0
    x[2] = np.linspace(-1, 1, 8)
    q, s = quantize_int8(x)
    y = dequantize_int8(q, s)
    assert np.isfinite(y).all() and s[0] == 0 and s[1] == 0 and (y[:2] == 0).all()
    assert np.abs(y[2] - x[2]).max() <= s[2] * (0.5 + PRODUCT_ROUNDING)


def test_variable_lengths_including_zero_and_grids(tmp_path):
    rng = np.random.default_rng(1)
    lengths = [0, 1, 7, 0, 64, 0]
    items = make_items(rng, lengths, hidden=32)
    cache = TokenCache.open(write_cache(tmp_path / "c", items, 32))
    assert cache.count == len(cache) == 6 and cache.total_tokens == sum(lengths)
    assert cache.lengths.tolist() == lengths and not cache.lengths.flags.writeable
    for i, (x, g, _) in enumerate(items):
        y = cache.tokens(i)
        assert y.shape == (lengths[i], 32)
        assert cache.grid(i) == (None if g is None else tuple(g))
        if lengths[i]:
            assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.02


def test_all_text_only_cache(tmp_path):
    items = [(np.zeros((0, 16), np.float32), None, np.ones(16, np.float32))] * 3
    cache = TokenCache.open(write_cache(tmp_path / "c", items, 16))
    assert cache.total_tokens == 0 and cache.tokens(2).shape == (0, 16) and cache.grid(0) is None
    np.testing.assert_array_equal(cache.t_con([0, 2]), np.ones((2, 16)))


# ------------------------------------------------------------------------------------------- t_con


def test_t_con_fp16_error_and_order(tmp_path):
    rng = np.random.default_rng(2)
    items = make_items(rng, [4] * 20, hidden=512)
    cache = TokenCache.open(write_cache(tmp_path / "c", items, 512))
    assert cache.t_con_dtype == "float16"
    idx = [7, 0, 19, 7]
    got = cache.t_con(idx)
    want = np.stack([items[i][2] for i in idx])
    assert got.dtype == np.float32 and got.shape == (4, 512)
    rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() < 5e-4  # fp16: 2^-11 per element at most, ~2e-4 in L2 (module docstring)
    assert cache.t_con(np.array([], np.int64)).shape == (0, 512)
    with pytest.raises(InputError, match="candidate index 20"):
        cache.t_con([1, 20])


def test_t_con_fp16_refuses_out_of_range_and_fp32_is_exact(tmp_path):
    big = np.full(8, 1e6, np.float32)  # overflows float16
    with TokenCacheWriter(tmp_path / "a", hidden=8, has_t_con=True) as w:
        with pytest.raises(InputError, match="t_con_dtype='float32'"):
            w.add(np.zeros((0, 8), np.float32), None, big)
    with TokenCacheWriter(tmp_path / "b", hidden=8, has_t_con=True, t_con_dtype="float32") as w:
        w.add(np.zeros((0, 8), np.float32), None, big)
    cache = TokenCache.open(tmp_path / "b")
    assert cache.t_con_dtype == "float32"
    np.testing.assert_array_equal(cache.t_con([0]), big[None])


def test_cache_without_t_con(tmp_path):
    rng = np.random.default_rng(3)
    write_cache(tmp_path / "c", make_items(rng, [2, 3], 16, t_con=False), 16, has_t_con=False)
    assert sorted(os.listdir(tmp_path / "c")) == [CACHE_JSON, "grids.i64", "lengths.i64", "scales.f32", "tokens.i8"]
    cache = TokenCache.open(tmp_path / "c")
    assert not cache.has_t_con
    with pytest.raises(InputError, match="has_t_con=False"):
        cache.t_con([0])


# ------------------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("tokens, grid, t_con, match", [
    (np.zeros((2, 9), np.float32), (1, 2, 4), np.zeros(8, np.float32), "expected float \\(L, 8\\)"),
    (np.full((2, 8), np.nan, np.float32), (1, 2, 4), np.zeros(8, np.float32), "non-finite"),
    (np.zeros((2, 8), np.int32), (1, 2, 4), np.zeros(8, np.float32), "expected float"),
    (np.zeros((2, 8), np.float32), None, np.zeros(8, np.float32), "grid: got None"),
    (np.zeros((0, 8), np.float32), (1, 2, 2), np.zeros(8, np.float32), "expected None"),
    (np.zeros((3, 8), np.float32), (1, 2, 4), np.zeros(8, np.float32), "multiple of the token count"),
    (np.zeros((2, 8), np.float32), (1, 0, 4), np.zeros(8, np.float32), "three positive integers"),
    (np.zeros((2, 8), np.float32), (1.0, 2.0, 4.0), np.zeros(8, np.float32), "three positive integers"),
    (np.zeros((2, 8), np.float32), (1, 2, 4), None, "t_con: got None"),
    (np.zeros((2, 8), np.float32), (1, 2, 4), np.zeros(7, np.float32), "t_con: got"),
])
def test_add_refuses_bad_input(tmp_path, tokens, grid, t_con, match):
    with TokenCacheWriter(tmp_path / "c", hidden=8, has_t_con=True) as w:
        with pytest.raises(InputError, match=match):
            w.add(tokens, grid, t_con)
        assert w.add(np.zeros((2, 8), np.float32), (1, 2, 4), np.zeros(8, np.float32)) == 0  # still usable
    assert TokenCache.open(tmp_path / "c").count == 1


def test_writer_refuses_existing_directory_unless_overwrite(tmp_path):
    rng = np.random.default_rng(4)
    write_cache(tmp_path / "c", make_items(rng, [2], 8), 8)
    with pytest.raises(CacheFileError, match="already exists"):
        TokenCacheWriter(tmp_path / "c", hidden=8, has_t_con=True)
    write_cache(tmp_path / "c", make_items(rng, [2, 2], 8), 8, overwrite=True)
    assert TokenCache.open(tmp_path / "c").count == 2


def test_exception_in_new_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with TokenCacheWriter(tmp_path / "c", hidden=8, has_t_con=False) as w:
            w.add(np.ones((1, 8), np.float32), (1, 2, 2))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- memory map


def test_open_2000_candidates_is_fast_and_mapped(tmp_path):
    hidden, n, per = 128, 2000, 16
    rng = np.random.default_rng(5)
    with TokenCacheWriter(tmp_path / "c", hidden=hidden, has_t_con=True) as w:
        for i in range(n):
            w.add(np.random.default_rng(i).standard_normal((per, hidden)).astype(np.float32), (1, 4, 16),
                  rng.standard_normal(hidden).astype(np.float32))
    token_bytes = n * per * hidden
    tracemalloc.start()
    start = time.perf_counter()
    cache = TokenCache.open(tmp_path / "c", verify="size")
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5, f"open took {elapsed:.3f} s"
    assert peak < token_bytes / 20, f"open allocated {peak} bytes for a {token_bytes}-byte token file"
    for i in (0, 1, 999, 1999):
        q, _ = cache.quantized(i)
        assert isinstance(q, np.memmap) and not q.flags.writeable
        x = np.random.default_rng(i).standard_normal((per, hidden)).astype(np.float32)
        y = cache.tokens(i)
        assert np.abs(y - x).max() <= np.abs(x).max() / 127 * (0.5 + PRODUCT_ROUNDING)
    assert TokenCache.open(tmp_path / "c", verify="full").count == n


# ------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def small_cache(tmp_path):
    rng = np.random.default_rng(6)
    return write_cache(tmp_path / "c", make_items(rng, [3, 0, 5], 16), 16)


def refused(path, match, verify="full"):
    with pytest.raises(CacheFileError, match=match) as e:
        TokenCache.open(path, verify=verify)
    assert "\n" not in str(e.value)
    return str(e.value)


def edit_json(path, **changes):
    meta = json.loads((path / CACHE_JSON).read_text())
    meta.update(changes)
    (path / CACHE_JSON).write_text(json.dumps(meta))


def test_refuses_truncated_file(small_cache):
    with open(small_cache / "tokens.i8", "r+b") as f:
        f.truncate(10)
    for verify in ("full", "size"):
        assert "tokens.i8" in refused(small_cache, "truncated", verify)


def test_refuses_modified_byte_in_full_mode_only(small_cache):
    with open(small_cache / "scales.f32", "r+b") as f:
        f.seek(4)
        f.write(b"\x00\x00\x80\x7f")  # +inf, same size
    assert "scales.f32" in refused(small_cache, "modified file")
    assert TokenCache.open(small_cache, verify="size").count == 3  # size mode is documented not to catch this


@pytest.mark.parametrize("changes, match", [
    ({"format_version": FORMAT_VERSION + 1}, "newer than this retrv-edge supports"),
    ({"count": 4}, "expected .* for count 4"),
    ({"hidden": 0}, "hidden 0"),
    ({"kind": "something-else"}, "kind"),
    ({"surprise": 1}, "unknown fields"),
    ({"dtypes": {"tokens": "<f4"}}, "dtypes"),
])
def test_refuses_bad_cache_json(small_cache, changes, match):
    edit_json(small_cache, **changes)
    assert CACHE_JSON in refused(small_cache, match, "size")


def test_refuses_missing_files_and_bad_json(small_cache):
    os.remove(small_cache / "grids.i64")
    assert "grids.i64" in refused(small_cache, "file not found", "size")
    (small_cache / CACHE_JSON).write_text("{not json")
    refused(small_cache, "not valid JSON", "size")
    os.remove(small_cache / CACHE_JSON)
    refused(small_cache, "cache.json: file not found", "size")
    with pytest.raises(InputError, match="verify"):
        TokenCache.open(small_cache, verify="fast")


# ------------------------------------------------------------------------------------------- appends


def test_append_preserves_earlier_candidates_exactly(tmp_path):
    rng = np.random.default_rng(7)
    first = make_items(rng, [5, 0, 9], 24)
    write_cache(tmp_path / "c", first, 24)
    before = TokenCache.open(tmp_path / "c")
    old = [(before.quantized(i)[0].copy(), before.quantized(i)[1].copy(), before.grid(i)) for i in range(3)]
    old_t = before.t_con(range(3))
    more = make_items(rng, [4, 0], 24)
    with before.appender() as w:
        assert w.count == 3
        assert [w.add(*item) for item in more] == [3, 4]
    assert before.count == 3  # the old reader keeps its view
    after = TokenCache.open(tmp_path / "c")
    assert after.count == 5 and after.lengths.tolist() == [5, 0, 9, 4, 0]
    for i, (q, s, g) in enumerate(old):
        np.testing.assert_array_equal(after.quantized(i)[0], q)
        np.testing.assert_array_equal(after.quantized(i)[1], s)
        assert after.grid(i) == g
    np.testing.assert_array_equal(after.t_con(range(3)), old_t)
    fresh = TokenCache.open(write_cache(tmp_path / "d", first + more, 24))
    for name in ("tokens.i8", "scales.f32", "lengths.i64", "grids.i64", "t_con.f16"):  # same bytes as a rebuild
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()
    assert fresh.count == 5


def test_append_aborted_by_exception_restores_old_cache(tmp_path):
    rng = np.random.default_rng(8)
    write_cache(tmp_path / "c", make_items(rng, [3, 2], 16), 16)
    sizes = {n: os.path.getsize(tmp_path / "c" / n) for n in os.listdir(tmp_path / "c")}
    with pytest.raises(RuntimeError):
        with TokenCacheWriter.extend(tmp_path / "c") as w:
            w.add(*make_items(rng, [6], 16)[0])
            raise RuntimeError("boom")
    assert {n: os.path.getsize(tmp_path / "c" / n) for n in sizes} == sizes
    assert TokenCache.open(tmp_path / "c").count == 2


def test_crash_mid_append_keeps_old_cache_valid(tmp_path):
    rng = np.random.default_rng(9)
    items = make_items(rng, [3, 2], 16)
    write_cache(tmp_path / "c", items, 16)
    # A real crash: the process dies after appending data, before cache.json is replaced.
    code = textwrap.dedent(f"""
        import os, numpy as np
        from retrv.runtime.index.token_cache import TokenCacheWriter
        w = TokenCacheWriter.extend({str(tmp_path / "c")!r})
        for _ in range(3):
            w.add(np.ones((4, 16), np.float32), (1, 4, 4), np.ones(16, np.float32))
        for f in w._files.values():
            f.flush()
        os._exit(1)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 1
    assert os.path.getsize(tmp_path / "c" / "tokens.i8") == (3 + 2 + 12) * 16  # the tail is on disk
    cache = TokenCache.open(tmp_path / "c", verify="full")  # the old prefix still verifies
    assert cache.count == 2
    np.testing.assert_array_equal(cache.lengths, [3, 2])
    with cache.appender() as w:  # the next append cuts the tail and goes on
        assert w.add(*make_items(rng, [1], 16)[0]) == 2
    cache = TokenCache.open(tmp_path / "c", verify="full")
    assert cache.lengths.tolist() == [3, 2, 1]
    assert os.path.getsize(tmp_path / "c" / "tokens.i8") == 6 * 16


def test_append_refuses_modified_cache_and_second_appender(tmp_path):
    rng = np.random.default_rng(10)
    write_cache(tmp_path / "c", make_items(rng, [3], 16), 16)
    w = TokenCacheWriter.extend(tmp_path / "c")
    if os.name == "posix":
        with pytest.raises(CacheFileError, match="another appender"):
            TokenCacheWriter.extend(tmp_path / "c")
    w.abort()
    with open(tmp_path / "c" / "tokens.i8", "r+b") as f:
        f.write(b"\x05")
    with pytest.raises(CacheFileError, match="tokens.i8.*modified file"):
        TokenCacheWriter.extend(tmp_path / "c")


# ------------------------------------------------------------------------------------------- size on disk


@pytest.mark.parametrize("per, hidden, data_bytes", [
    # tokens L*H int8 + scales 4L + length 8 + grid 24 + t_con fp16 2H
    (64, 2048, 64 * 2048 + 4 * 64 + 8 + 24 + 2 * 2048),
    (16, 64, 16 * 64 + 4 * 16 + 8 + 24 + 2 * 64),
])
def test_bytes_per_candidate(tmp_path, per, hidden, data_bytes):
    n = 10
    rng = np.random.default_rng(11)
    cache = TokenCache.open(write_cache(tmp_path / "c", make_items(rng, [per] * n, hidden), hidden))
    json_bytes = os.path.getsize(tmp_path / "c" / CACHE_JSON)
    assert cache.nbytes == sum(os.path.getsize(tmp_path / "c" / f) for f in os.listdir(tmp_path / "c"))
    assert cache.bytes_per_candidate() == pytest.approx(data_bytes + json_bytes / n)
    fp32 = per * hidden * 4
    assert cache.bytes_per_candidate() < fp32 / 3.5 + 2 * hidden + 100  # ~4x below float32 tokens
