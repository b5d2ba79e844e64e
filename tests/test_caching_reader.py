"""imgkit.views.caching_reader: the one read engine. Exact bytes through the unit cache (imgk chunks, a
partition starting mid-chunk, streams without units), the rule for answering a read on the caller's
thread, single-flight loads, sequential detection and read-ahead on worker threads, serialised reads
of a stream that is not thread-safe, and errors never cached."""
from __future__ import annotations

import threading
import time

import pytest

from imgkit import api
from imgkit.views.caching_reader import DEFAULT_UNIT, CachingReader
from imgkit.errors import CorruptChunk
from imgkit.stream import SliceStream, Stream
from tests.conftest import pattern_bytes

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def small_chunks(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader")
    raw = d / "disk.raw"
    data = bytearray(pattern_bytes(4 * MiB, seed=7))
    data[2 * MiB:3 * MiB] = bytes(MiB)  # a hole
    raw.write_bytes(bytes(data))
    imgk = str(d / "disk.imgk")
    api.capture(str(raw), imgk, sector_by_sector=True, chunk_size=64 * KiB)
    return imgk, bytes(data), str(raw)


class Counting(Stream):
    """An in-memory disk without units of its own that counts its reads (and whether two overlapped)."""

    def __init__(self, data: bytes, thread_safe: bool = False, delay: float = 0.0):
        self.data, self.size, self.thread_safe, self.delay = data, len(data), thread_safe, delay
        self.reads: list[tuple[int, int]] = []
        self.active = 0
        self.overlapped = False
        self._lock = threading.Lock()

    def read(self, offset, length):
        with self._lock:
            self.active += 1
            self.overlapped |= self.active > 1
            self.reads.append((offset, length))
        time.sleep(self.delay)
        with self._lock:
            self.active -= 1
        return self.data[offset:offset + length]


def test_reads_are_exact_across_chunks_and_holes(small_chunks):
    imgk, data, _ = small_chunks
    with api.open_image(imgk) as img, CachingReader(img, 8 * MiB) as disk:
        assert disk.unit_size == 64 * KiB  # the image's chunks, declared by the stream
        for off, n in ((0, 4096), (65536 - 100, 200), (MiB + 12345, MiB), (2 * MiB - 5, 10), (4 * MiB - 7, 100),
                       (4 * MiB - 7, 1000), (0, 4 * MiB)):
            assert disk.read(off, n) == data[off:off + n]


def test_a_partition_starting_mid_chunk_reads_whole_chunks_once(small_chunks):
    """A slice declares the image's chunks with its phase: each of its units is one chunk (or a part
    of the first/last), and a read across it decodes each chunk once."""
    imgk, data, _ = small_chunks
    start = 64 * KiB + 3 * 512
    with api.open_image(imgk) as img:
        decoded = []
        orig = img.read_chunk
        img.read_chunk = lambda i: decoded.append(i) or orig(i)
        part = SliceStream(img, start, 3 * MiB)
        assert (part.unit_size, part.unit_phase) == (64 * KiB, start % (64 * KiB))
        with CachingReader(part, 8 * MiB) as disk:
            assert disk.read(0, 3 * MiB) == data[start:start + 3 * MiB]
            assert disk.read(100, 70000) == data[start + 100:start + 70100]
    assert len(decoded) == len(set(decoded))  # no chunk decoded twice
    first = decoded
    assert min(first) == 1 and max(first) == (start + 3 * MiB - 1) // (64 * KiB)


def test_only_cached_or_small_reads_are_cheap(small_chunks):
    imgk, _, _ = small_chunks
    with api.open_image(imgk) as img, CachingReader(img, 8 * MiB) as disk:
        assert disk.is_cheap(2 * MiB, MiB)  # all hole
        assert not disk.is_cheap(0, MiB)  # sixteen chunks to decode: a worker's job
        assert disk.is_cheap(0, 4096)  # one small chunk to decode
        disk.read(0, MiB)  # now cached
        assert disk.read_if_cached(4096, 100) is not None
        assert disk.read_if_cached(2 * MiB, 100) == bytes(100)  # a hole needs no cache
        assert disk.read_if_cached(MiB + 10, 100) is None  # never loads
        assert disk.is_cheap(0, MiB)  # sixteen cache hits: joined in place
        assert not disk.is_cheap(0, MiB + 128 * KiB)  # plus two chunks to decode
        assert not disk.is_cheap(0, 4 * MiB)  # more chunks than a read is allowed inline


def test_a_unit_being_loaded_elsewhere_is_not_cheap(small_chunks):
    """A chunk another thread is still decoding must not count as cached: answering 'cheap' would make
    the FUSE thread wait for that decode."""
    imgk, _, _ = small_chunks
    with api.open_image(imgk) as img, CachingReader(img, 8 * MiB) as disk:
        started, release = threading.Event(), threading.Event()
        orig = img.read_chunk

        def slow(i):
            started.set()
            release.wait(10)
            return orig(i)
        t = threading.Thread(target=lambda: disk.cache.get(20, slow))
        t.start()
        try:
            assert started.wait(10)
            assert 20 in disk.cache and not disk.cache.cached(20)
            img.INLINE_STORED = 0  # no decoding allowed inline: only true cache hits are cheap
            assert not disk.is_cheap(20 * 64 * KiB, 4096)
        finally:
            release.set()
            t.join()
        assert disk.cache.cached(20) and disk.is_cheap(20 * 64 * KiB, 4096)


def test_concurrent_reads_of_one_unit_load_it_once():
    data = pattern_bytes(4 * MiB, seed=3)
    stream = Counting(data, thread_safe=True, delay=0.05)
    with CachingReader(stream, 8 * MiB) as disk:
        threads = [threading.Thread(target=disk.read, args=(k * 4096, 4096)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert stream.reads == [(0, DEFAULT_UNIT)]  # a stream without units is cached in 1 MiB pieces


def test_a_stream_that_is_not_thread_safe_is_read_serially():
    data = pattern_bytes(8 * MiB, seed=4)
    stream = Counting(data, thread_safe=False, delay=0.02)
    with CachingReader(stream, 16 * MiB) as disk:
        threads = [threading.Thread(target=disk.read, args=(k * MiB, 100)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(stream.reads) == 8 and not stream.overlapped
    safe = Counting(data, thread_safe=True, delay=0.05)  # a thread-safe one is read in parallel
    with CachingReader(safe, 16 * MiB) as disk:
        threads = [threading.Thread(target=disk.read, args=(k * MiB, 100)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert safe.overlapped


def _wait_cached(disk, units, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not all(disk.cache.cached(i) for i in units) and time.monotonic() < deadline:
        time.sleep(0.01)
    return all(disk.cache.cached(i) for i in units)


def test_sequential_reads_are_read_ahead_random_ones_are_not():
    data = pattern_bytes(16 * MiB, seed=5)
    stream = Counting(data, thread_safe=True)
    with CachingReader(stream, 32 * MiB, workers=2) as disk:
        assert disk.read_ahead_bytes == 4 * MiB  # what the stream declares
        h = disk.handle()
        assert h.read(8 * MiB, 128 * KiB) == data[8 * MiB:8 * MiB + 128 * KiB]
        time.sleep(0.1)
        assert not disk.cache.cached(9)  # one read is not a sequence
        assert h.read(8 * MiB + 128 * KiB, 128 * KiB) == data[8 * MiB + 128 * KiB:8 * MiB + 256 * KiB]
        assert _wait_cached(disk, (9, 10))  # two units past the frontier, loaded ahead
        time.sleep(0.1)
        assert not disk.cache.cached(11)  # the window starts small
        assert h.read(8 * MiB + 256 * KiB, 128 * KiB) == data[8 * MiB + 256 * KiB:8 * MiB + 384 * KiB]
        assert _wait_cached(disk, (11, 12))  # and doubles: the next 4 MiB
        time.sleep(0.1)
        assert not disk.cache.cached(13)  # no further than the read-ahead limit
        assert disk.units_read_ahead >= 4
        r = disk.handle()
        r.read(1 * MiB, 4096)
        r.read(5 * MiB, 4096)  # a jump: not sequential
        time.sleep(0.1)
        assert not disk.cache.cached(6) and r.sequential == 0


def test_the_read_ahead_window_grows_to_its_limit_within_half_the_cache():
    """A sequential reader's window doubles from two units to read_ahead_bytes (the mount asks for
    more than the stream's default); the limit never exceeds half the cache, so what was read ahead
    is still cached when the reader arrives."""
    data = pattern_bytes(40 * MiB, seed=8)
    with CachingReader(Counting(data, thread_safe=True), 8 * MiB, read_ahead_bytes=16 * MiB) as small:
        assert small.read_ahead_bytes == 4 * MiB
    stream = Counting(data, thread_safe=True)
    with CachingReader(stream, 64 * MiB, workers=2, read_ahead_bytes=16 * MiB) as disk:
        assert disk.read_ahead_bytes == 16 * MiB
        h = disk.handle()
        windows = []
        for k in range(7):
            assert h.read(k * MiB, MiB) == data[k * MiB:(k + 1) * MiB]
            windows.append(h.read_ahead_window(MiB))
        assert windows == [0, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 16 * MiB, 16 * MiB]
        assert _wait_cached(disk, range(7, 7 + 16))  # 16 MiB past the frontier at 7 MiB
        time.sleep(0.1)
        assert not disk.cache.cached(7 + 16)


def test_read_buffer_answers_from_the_cached_unit_without_copying(small_chunks):
    """What the FUSE adapter replies with: a view into the decoded chunk for a read inside one (no
    1 MiB copy a request), zeros from a shared buffer for a hole, the exact bytes in every case."""
    imgk, data, _ = small_chunks
    with api.open_image(imgk) as img, CachingReader(img, 8 * MiB) as disk:
        buf = disk.read_buffer(64 * KiB + 100, 4096)
        assert isinstance(buf, memoryview) and buf.readonly
        assert buf.obj is disk.cache.peek(1)  # the cached chunk itself
        assert buf == data[64 * KiB + 100:64 * KiB + 4196]
        hole = disk.read_buffer(2 * MiB + 10, 60000)
        assert isinstance(hole, memoryview) and hole == bytes(60000)
        whole = disk.read_buffer(0, 64 * KiB)
        assert whole is disk.cache.peek(0)  # a whole unit: the cached bytes as they are
        for off, n in ((64 * KiB - 100, 200), (2 * MiB - 5, 10), (MiB + 12345, MiB), (4 * MiB - 7, 100), (0, 4 * MiB)):
            assert bytes(disk.read_buffer(off, n)) == data[off:off + n] == disk.read(off, n)
        h = disk.handle(MiB, 2 * MiB)
        assert bytes(h.read_buffer(100, 5000)) == data[MiB + 100:MiB + 5100]
        assert h.read_buffer(2 * MiB, 10) == b""


def test_a_window_handle_reads_its_own_range_and_stops_at_its_end():
    data = pattern_bytes(8 * MiB, seed=6)
    stream = Counting(data, thread_safe=True)
    with CachingReader(stream, 32 * MiB) as disk:
        h = disk.handle(3 * MiB, 2 * MiB)
        assert h.read(0, MiB) == data[3 * MiB:4 * MiB]
        assert h.read(MiB, 4 * MiB) == data[4 * MiB:5 * MiB]  # clipped to the window
        assert h.read(2 * MiB, 10) == b""
        time.sleep(0.1)
        assert not disk.cache.cached(5) and not disk.cache.cached(6)  # nothing read ahead past the window


def test_corrupt_chunks_fail_every_read_and_read_ahead_hides_nothing(small_chunks, tmp_path):
    imgk, data, _ = small_chunks
    bad = tmp_path / "bad.imgk"
    raw = bytearray(open(imgk, "rb").read())
    raw[4096 + 1000] ^= 0xFF  # inside the first chunk's stored bytes
    bad.write_bytes(bytes(raw))
    with api.open_image(str(bad)) as img, CachingReader(img, 8 * MiB) as disk:
        disk.read_ahead(0, MiB)  # the failed load stays a failure for the read that wants it
        for _ in range(2):
            with pytest.raises(CorruptChunk):
                disk.read(0, 4096)
        assert disk.read(64 * KiB, 4096) == data[64 * KiB:64 * KiB + 4096]


def test_close_stops_read_ahead(small_chunks):
    imgk, _, _ = small_chunks
    with api.open_image(imgk) as img:
        disk = CachingReader(img, 8 * MiB)
        disk.read_ahead(0, 4 * MiB)
        disk.close()
        loaded = disk.units_read_ahead
        disk.read_ahead(0, 4 * MiB)  # after close: nothing queued
        time.sleep(0.05)
        assert disk.units_read_ahead == loaded
