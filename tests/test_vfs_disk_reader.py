"""imgkit.vfs.DiskReader: exact bytes through the chunk cache, and the rule for answering a read on the
FUSE thread (only cache hits, holes and at most one small chunk to decode) rather than in a worker."""
from __future__ import annotations

import pytest

from imgkit import api
from imgkit.vfs import DiskReader
from tests.conftest import pattern_bytes

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def small_chunks(tmp_path_factory):
    d = tmp_path_factory.mktemp("vfs")
    raw = d / "disk.raw"
    data = bytearray(pattern_bytes(4 * MiB, seed=7))
    data[2 * MiB:3 * MiB] = bytes(MiB)  # a hole
    raw.write_bytes(bytes(data))
    imgk = str(d / "disk.imgk")
    api.capture(str(raw), imgk, sector_by_sector=True, chunk_size=64 * KiB)
    return imgk, bytes(data)


def test_reads_are_exact_across_chunks_and_holes(small_chunks):
    imgk, data = small_chunks
    with api.open_image(imgk) as img:
        disk = DiskReader(img, 8 * MiB)
        for off, n in ((0, 4096), (65536 - 100, 200), (MiB + 12345, MiB), (2 * MiB - 5, 10), (4 * MiB - 7, 100)):
            assert disk.read(off, n) == data[off:off + n]


def test_only_cached_or_small_reads_are_cheap(small_chunks):
    imgk, data = small_chunks
    with api.open_image(imgk) as img:
        disk = DiskReader(img, 8 * MiB)
        assert disk.is_cheap(2 * MiB, MiB)  # all hole
        assert not disk.is_cheap(0, MiB)  # sixteen chunks to decode: a worker's job
        assert disk.is_cheap(0, 4096)  # one small chunk to decode
        disk.read(0, MiB)  # now cached
        assert disk.is_cheap(0, MiB)  # sixteen cache hits: joined in place
        assert not disk.is_cheap(0, MiB + 128 * KiB)  # plus two chunks to decode
        assert not disk.is_cheap(0, 4 * MiB)  # more chunks than a read is allowed inline


def test_a_chunk_being_decoded_elsewhere_is_not_cheap(small_chunks):
    """A chunk another thread is still decoding must not count as cached: answering 'cheap' would make
    the FUSE thread wait for that decode."""
    import threading
    imgk, data = small_chunks
    with api.open_image(imgk) as img:
        disk = DiskReader(img, 8 * MiB)
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
            disk.INLINE_STORED = 0  # no decoding allowed inline: only true cache hits are cheap
            assert not disk.is_cheap(20 * 64 * KiB, 4096)
        finally:
            release.set()
            t.join()
        assert disk.cache.cached(20) and disk.is_cheap(20 * 64 * KiB, 4096)
