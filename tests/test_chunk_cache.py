"""imgkit/views/chunk_cache.py: the byte bound, single-flight loading, and errors that are never cached."""
from __future__ import annotations

import threading
import time

import pytest

from imgkit.views.chunk_cache import ChunkCache


def test_bounded_by_bytes_least_recently_used_goes_first():
    cache = ChunkCache(3000)
    for k in (1, 2, 3):
        cache.get(k, lambda key: bytes(1000))
    assert cache.peek(1) is not None  # 1 is now the most recently used
    cache.get(4, lambda key: bytes(1000))
    assert [k for k in (1, 2, 3, 4) if cache.cached(k)] == [1, 3, 4]
    cache.get(5, lambda key: bytes(5000))  # larger than the whole cache: returned, not kept
    assert not cache.cached(5) and cache.cached(4)
    cache.clear()
    assert not any(cache.cached(k) for k in (1, 3, 4)) and cache.peek(4) is None


def test_concurrent_requests_load_once():
    cache, calls, gate = ChunkCache(1 << 20), [], threading.Event()

    def slow_load(key):
        calls.append(key)
        gate.wait(5)
        return b"x" * 100

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(7, slow_load))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    assert 7 in cache and not cache.cached(7)  # being loaded, not yet here
    gate.set()
    for t in threads:
        t.join(5)
    assert calls == [7] and results == [b"x" * 100] * 4


def test_a_failed_load_is_not_cached():
    cache, attempts = ChunkCache(1 << 20), []

    def broken(key):
        attempts.append(key)
        raise ValueError("damaged")
    for _ in range(2):
        with pytest.raises(ValueError):
            cache.get(3, broken)
    assert attempts == [3, 3] and not cache.cached(3) and 3 not in cache


def test_a_cache_within_another_keeps_both_inside_one_budget():
    # The mount's guest-file cache and its extent maps live inside the disk cache's --cache-size.
    outer = ChunkCache(10_000)
    inner = ChunkCache(4_000, within=outer)
    for k in range(10):
        outer.get(k, lambda _k: b"o" * 1000)
    assert outer.nbytes == 10_000
    inner.get(1, lambda _k: b"i" * 3000)
    assert inner.nbytes == 3000 and outer.nbytes == 7000  # the outer gave up its oldest
    assert not outer.cached(0) and outer.cached(9)
    outer.get(99, lambda _k: b"o" * 1000)  # a new outer entry makes room in the outer alone
    assert inner.nbytes == 3000 and outer.nbytes + inner.nbytes <= 10_000

    class Maps:  # anything with nbytes can be counted in the budget
        nbytes = 0
    maps = Maps()
    outer.include(maps)
    maps.nbytes = 2500
    outer.make_room()
    assert outer.nbytes + inner.nbytes + maps.nbytes <= 10_000 and outer.nbytes == 4000
