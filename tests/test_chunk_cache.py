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
