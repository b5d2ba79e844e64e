"""The NBD export (imgkit/views/nbd_export.py) as qemu and libnbd see it: holes reported and never read,
data exact, read-only, several clients, damaged chunks surface as errors, and the overlay form the
boot checker uses (a qcow2 overlay whose backing is the export, with -F raw)."""
from __future__ import annotations

import os
import json

import pytest

from imgkit import api
from imgkit.operations.convert import convert
from imgkit.errors import OperationFailed
from imgkit.views.nbd_export import export_stream
from imgkit.stream import DATA
from tests.conftest import pattern_bytes
from tests.convert_helpers import MiB, sh

pytestmark = pytest.mark.qemu
nbd = pytest.importorskip("nbd", reason="python3-libnbd (scripts/setup.sh installs it)")

LAYOUT = [(4 * MiB, 3 * MiB), (20 * MiB, 1 * MiB), (31 * MiB, 1 * MiB)]  # (offset, length) of data
SIZE = 32 * MiB


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("nbd")
    raw = str(d / "disk.raw")
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for i, (off, n) in enumerate(LAYOUT):
            f.seek(off)
            f.write(pattern_bytes(n, seed=i))
    imgk = str(d / "disk.imgk")
    # 1 MiB chunks: the export reports extents at chunk granularity, and LAYOUT is cut to 1 MiB
    api.capture(raw, imgk, sector_by_sector=True, chunk_size=MiB)
    return {"dir": d, "raw": raw, "imgk": imgk}


def _client(export):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(export.qemu_filename)
    return h


def test_libnbd_sees_size_holes_and_data(image):
    with api.open_image(image["imgk"]) as img, export_stream(img) as export:
        h = _client(export)
        assert h.get_size() == SIZE and h.is_read_only() and h.can_meta_context("base:allocation")
        extents = []
        h.block_status(SIZE, 0, lambda ctx, off, ents, err: extents.extend(ents) or 0)
        data_runs, pos = [], 0
        for n, flags in zip(extents[::2], extents[1::2]):
            if flags == 0:
                data_runs.append((pos, n))
            else:
                assert flags == 3  # HOLE | ZERO
            pos += n
        assert data_runs == LAYOUT
        with open(image["raw"], "rb") as f:
            want = f.read()
        for off in (0, 4 * MiB - 100, 20 * MiB, SIZE - 5000):
            assert h.pread(9000 if off + 9000 <= SIZE else SIZE - off, off) == want[off:off + 9000]
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        h2 = _client(export)  # a second client at the same time
        assert h2.pread(4096, 20 * MiB) == want[20 * MiB:20 * MiB + 4096]
        h.shutdown()
        h2.shutdown()


def test_reads_across_chunks_and_holes_are_exact(image):
    """A structured read is sent as one reply piece per chunk (no joined buffer): pieces that start
    and end mid-chunk, span several chunks, and straddle data and holes must reassemble exactly."""
    with open(image["raw"], "rb") as f:
        want = f.read()
    with api.open_image(image["imgk"]) as img, export_stream(img) as export:
        h = _client(export)
        for off, n in ((4 * MiB + 12345, 2 * MiB + 777), (3 * MiB + 1, 3 * MiB), (19 * MiB + 512, 2 * MiB),
                       (4 * MiB, 3 * MiB), (30 * MiB + 4096, 2 * MiB - 4096)):
            assert h.pread(n, off) == want[off:off + n], (off, n)
        h.shutdown()


def test_qemu_reads_only_the_data(image, tmp_path):
    with api.open_image(image["imgk"]) as img, export_stream(img) as export:
        out = json.loads(sh("qemu-img", "map", "--output=json", "-f", "raw", export.qemu_filename).stdout)
        assert [(e["start"], e["length"]) for e in out if e["data"]] == LAYOUT
        sh("qemu-img", "convert", "-f", "raw", export.qemu_filename, "-O", "raw", tmp_path / "o.raw")
        assert export.bytes_read == sum(n for _, n in LAYOUT)  # zero ranges were never read
        assert not export.errors
    with open(image["raw"], "rb") as a, open(tmp_path / "o.raw", "rb") as b:
        assert a.read() == b.read()


def test_overlay_over_the_export(image, tmp_path):
    """The boot-check form: a throwaway qcow2 overlay, backing = the export with -F raw."""
    overlay = str(tmp_path / "overlay.qcow2")
    with api.open_image(image["imgk"]) as img, export_stream(img) as export:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", export.qemu_filename, "-F", "raw", overlay)
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", overlay)  # writes land in the overlay
        sh("qemu-img", "convert", "-f", "qcow2", overlay, "-O", "raw", tmp_path / "o.raw")
        assert export.connections >= 2
    with open(image["raw"], "rb") as a, open(tmp_path / "o.raw", "rb") as b:
        want, got = a.read(), b.read()
    assert got[:65536] == b"\xab" * 65536 and got[65536:] == want[65536:]


def test_damaged_chunk_fails_the_conversion(image, tmp_path):
    bad = str(tmp_path / "bad.imgk")
    api.capture(image["raw"], bad, level=0, sector_by_sector=True)
    with api.open_image(bad) as img:
        first = next(r for r in img.runs() if r.kind == DATA)
        assert first.offset == 4 * MiB
    with open(bad, "r+b") as f:  # chunk data starts after the 4096-byte header; XOR, never a fixed value
        f.seek(4096 + 1000)
        byte = f.read(1)
        f.seek(4096 + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(OperationFailed, match="hash check|damaged"):
        convert(bad, str(tmp_path / "bad.qcow2"))
    assert sorted(os.listdir(tmp_path)) == ["bad.imgk"]  # no destination, no temp left behind


def test_concurrent_small_reads_decode_each_chunk_once(image):
    """qemu-img -c reads 64 KiB pieces 16 at a time: the caching reader under the export is single-flight."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from imgkit.views.caching_reader import CachingReader
    with api.open_image(image["imgk"]) as img, CachingReader(img) as reader:
        calls, lock, orig = [], threading.Lock(), img.read_chunk

        def counting(i):
            with lock:
                calls.append(i)
            return orig(i)
        img.read_chunk = counting
        offsets = [4 * MiB + k * 65536 for k in range(48)]  # 3 chunks of 1 MiB, 16 pieces each
        with ThreadPoolExecutor(8) as pool:
            pieces = list(pool.map(lambda o: reader.read(o, 65536), offsets))
        with open(image["raw"], "rb") as f:
            f.seek(4 * MiB)
            assert b"".join(pieces) == f.read(3 * MiB)
        assert sorted(calls) == [4, 5, 6]


def test_small_reads_of_a_decoded_chunk_are_answered_inline(image):
    """After the first 64 KiB piece of a chunk decodes it (on a worker), the other fifteen are
    answered on the connection's own thread from the cache: exact bytes, no further decoding."""
    import threading
    with open(image["raw"], "rb") as f:
        want = f.read()
    with api.open_image(image["imgk"]) as img, export_stream(img) as export:
        decoded, workers_used = [], []
        orig_chunk = img.read_chunk
        img.read_chunk = lambda i: decoded.append(i) or orig_chunk(i)
        orig_read = export.reader.read
        export.reader.read = lambda o, n: workers_used.append(threading.current_thread().name) or orig_read(o, n)
        h = _client(export)
        got = b"".join(h.pread(65536, 4 * MiB + k * 65536) for k in range(32))  # chunks 4 and 5, in order
        h.shutdown()
    assert got == want[4 * MiB:6 * MiB]
    assert sorted(decoded) == sorted(set(decoded)) and {4, 5} <= set(decoded)  # each decoded once
    # At most the first piece of each chunk went to a worker (read-ahead, started by the first
    # request, often decoded even that one first); the other thirty came from the cache.
    assert len(workers_used) <= 2


def test_small_reads_decode_the_next_chunks_ahead(image):
    """A 64 KiB read of chunk 4 starts decoding chunks 5 and 6 before anyone asks for them."""
    import time
    with api.open_image(image["imgk"]) as img, export_stream(img) as export:
        h = _client(export)
        h.pread(65536, 4 * MiB)
        deadline = time.monotonic() + 5
        cached = export.reader.cache.cached
        while not (cached(5) and cached(6)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cached(5) and cached(6)
        assert not cached(7)  # a hole: nothing to decode
        h.shutdown()
