"""imgkit.formats.vhd_writer: the native dynamic VHD writer. `qemu-img compare` finds the source's bytes,
the exact virtual size (not rounded to a CHS geometry), the same allocation as qemu-img's own
`-o subformat=dynamic,force_size=on` conversion (compare -s), a partial last block, an empty disk,
an imgk source; the footer's checksum and geometry follow the specification."""
from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

from imgkit import api
from imgkit.views.caching_reader import CachingReader
from imgkit.formats import vhd_writer as V
from tests.conftest import pattern_bytes

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def _write(stream, path):
    return V.write_vhd(stream, str(path), CachingReader(stream, cache_bytes=0).map_pieces)


def _vsize(path) -> int:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "vpc", str(path)],
                                     capture_output=True, text=True, check=True).stdout)["virtual-size"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("vhdw")
    path = d / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(37 * MiB + 3 * 512)
        f.seek(3 * MiB + 7)
        f.write(pattern_bytes(5 * MiB, seed=4))
        f.seek(37 * MiB + 100)
        f.write(pattern_bytes(1000, seed=5))
    return path


def test_a_raw_disk_compares_with_its_exact_size_and_qemu_imgs_allocation(raw, tmp_path):
    out = tmp_path / "out.vhd"
    with api.open_image(str(raw)) as src:
        _write(src, out)
    assert _vsize(out) == os.path.getsize(raw)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "vpc", str(raw), str(out)], check=True)
    peer = tmp_path / "peer.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on",
                    str(raw), str(peer)], check=True)
    subprocess.run(["qemu-img", "compare", "-q", "-s", "-f", "vpc", "-F", "vpc", str(peer), str(out)], check=True)
    foot = open(out, "rb").read()[-512:]
    assert foot[:8] == b"conectix" and foot[28:32] == b"qem2"
    stored = struct.unpack_from(">I", foot, 64)[0]
    assert stored == V._checksum(foot[:64] + bytes(4) + foot[68:])
    assert open(out, "rb").read(512) == foot  # the copy at the front


def test_an_imgk_source_and_an_empty_disk(raw, tmp_path):
    imgk = tmp_path / "disk.imgk"
    api.capture(str(raw), str(imgk), sector_by_sector=True)
    out = tmp_path / "imgk.vhd"
    with api.open_image(str(imgk)) as img:
        _write(img, out)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "vpc", str(raw), str(out)], check=True)
    empty = tmp_path / "empty.raw"
    with open(empty, "wb") as f:
        f.truncate(10 * MiB)
    eout = tmp_path / "empty.vhd"
    with api.open_image(str(empty)) as src:
        assert _write(src, eout) == 0
    assert os.path.getsize(eout) == 3 * 512 + 512 + 512  # footer copy, header, BAT sector, footer
    assert _vsize(eout) == 10 * MiB


def test_geometry_follows_the_specification():
    assert V.geometry(127 * 1024 * 1024 * 1024 * 1024) == (65535, 16, 255)  # capped
    assert V.geometry(64 * MiB) == (963, 8, 17)  # 131072 sectors: 17 a track, (7710 + 1023) // 1024 heads
    assert V.geometry(8 * MiB) == (240, 4, 17)  # at least 4 heads
