"""imgkit.formats.qcow2_writer: the native qcow2 writer. `qemu-img check` finds no errors or leaks,
`qemu-img compare` finds the source's bytes, all-zero clusters and holes stay unallocated, a size
that is not a whole number of clusters, data past the first L2 table's 512 MiB, an imgk source whose
chunks decode in parallel and a partition slice starting mid-chunk."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from imgkit import api
from imgkit.views.caching_reader import CachingReader
from imgkit.formats import qcow2_writer as Q
from imgkit.stream import SliceStream
from tests.conftest import pattern_bytes

pytestmark = pytest.mark.qemu
KiB, MiB = 1 << 10, 1 << 20


def _write(stream, path):
    reader = CachingReader(stream, cache_bytes=0)
    return Q.write_qcow2(stream, str(path), reader.map_pieces)


def _check(path) -> dict:
    out = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _same(raw, qcow2) -> None:
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(qcow2)], check=True)


def _allocated_clusters(path) -> int:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
                         capture_output=True, text=True, check=True)
    return -(-sum(e["length"] for e in json.loads(out.stdout) if e["data"]) // Q.CLUSTER)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    d = tmp_path_factory.mktemp("qcow2w")
    raw = d / "disk.raw"
    size = 600 * MiB + 3 * 512  # past the first L2 table (512 MiB), not a whole cluster
    with open(raw, "wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(pattern_bytes(3 * MiB, seed=1))
        f.seek(2 * MiB)
        f.write(bytes(Q.CLUSTER))  # an all-zero cluster inside data: must stay unallocated
        f.seek(513 * MiB + 100)
        f.write(pattern_bytes(5000, seed=2))  # a few bytes inside a cluster of the second L2 table
        f.seek(size - 700)
        f.write(pattern_bytes(700, seed=3))  # the last, partial cluster
    return d, raw, size


def test_a_raw_disk_written_natively_checks_and_compares(disk, tmp_path):
    d, raw, size = disk
    out = tmp_path / "out.qcow2"
    with api.open_image(str(raw)) as src:
        _write(src, out)
    info = _check(out)
    assert info.get("leaks", 0) == 0 and info.get("corruptions", 0) == 0
    _same(raw, out)
    # 3 MiB minus the zero cluster, one cluster in the second L2 table (5000 bytes may straddle two),
    # and the tail cluster
    assert 3 * MiB // Q.CLUSTER - 1 + 1 + 1 <= _allocated_clusters(out) <= 3 * MiB // Q.CLUSTER - 1 + 2 + 1
    size_out = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(out)],
                                         capture_output=True, text=True, check=True).stdout)["virtual-size"]
    assert size_out == size


def test_an_imgk_image_and_a_partition_of_it(disk, tmp_path):
    d, raw, size = disk
    imgk = tmp_path / "disk.imgk"
    api.capture(str(raw), str(imgk), sector_by_sector=True, chunk_size=256 * KiB)
    out = tmp_path / "from-imgk.qcow2"
    with api.open_image(str(imgk)) as img:
        _write(img, out)
        _check(out)
        _same(raw, out)
        start, n = MiB + 512 * 3, 2 * MiB  # a window starting mid-chunk
        part = SliceStream(img, start, n)
        pout = tmp_path / "part.qcow2"
        _write(part, pout)
    _check(pout)
    praw = tmp_path / "part.raw"
    with open(raw, "rb") as f:
        f.seek(start)
        praw.write_bytes(f.read(n))
    _same(praw, pout)


def test_an_empty_disk_has_only_metadata(tmp_path):
    raw = tmp_path / "empty.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    out = tmp_path / "empty.qcow2"
    with api.open_image(str(raw)) as src:
        assert _write(src, out) == 0
    _check(out)
    _same(raw, out)
    assert _allocated_clusters(out) == 0 and os.path.getsize(out) < 8 * Q.CLUSTER
