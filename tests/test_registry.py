"""imgkit.formats.registry: detect, inspect, open. Each format opens as its own Stream class, from
its own header (never the name), unknown formats and raw-where-an-image-is-wanted are one clear
error, and a format is one entry: an entry added to the table is all it takes to open a new one."""
from __future__ import annotations

import subprocess

import pytest

from imgkit import api
from imgkit.errors import BadImage, InputError
from imgkit.formats import detect, registry
from imgkit.formats.imgk_reader import ImageReader
from imgkit.formats.sources import RawSource
from imgkit.stream import Stream
from tests.conftest import pattern_bytes

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("registry")
    raw = d / "disk.bin"  # a name that says nothing: detection reads the header
    raw.write_bytes(pattern_bytes(4 * MiB, seed=9))
    imgk = d / "disk.raw"  # a misleading name
    api.capture(str(raw), str(imgk), sector_by_sector=True)
    qcow2 = d / "vm.img"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    return {"raw": str(raw), "imgk": str(imgk), "qcow2": str(qcow2)}


def test_detection_reads_headers_not_names(images):
    assert registry.detect(images["raw"]) == "raw"
    assert registry.detect(images["imgk"]) == "imgk"
    assert registry.detect(images["qcow2"]) == "qcow2"


@pytest.mark.qemu
def test_each_format_opens_as_its_stream(images):
    from imgkit.formats.qemu_image import QemuImage
    for name, cls in (("raw", RawSource), ("imgk", ImageReader), ("qcow2", QemuImage)):
        with registry.open_image(images[name]) as s:
            assert isinstance(s, cls) and s.size == 4 * MiB
            assert s.read(MiB, 16) == pattern_bytes(4 * MiB, seed=9)[MiB:MiB + 16]
    with registry.open_image(images["imgk"], fmt="raw") as s:  # "raw" takes the bytes as they are
        assert isinstance(s, RawSource)


def test_refusals_are_one_clear_error(images, tmp_path):
    with pytest.raises(InputError, match="unknown image format 'nope'") as e:
        registry.open_image(images["raw"], fmt="nope")
    assert "qcow2" in e.value.hint
    with pytest.raises(BadImage, match="not an imgk image"):
        registry.open_image(images["raw"], allow_raw=False)
    with pytest.raises(InputError, match="no such file"):
        registry.open_image(str(tmp_path / "missing"))


def test_the_table_covers_every_format_and_qemus_drivers():
    assert set(registry.FORMATS) == set(detect.FORMATS)
    for name, entry in registry.FORMATS.items():
        assert entry.name == name and callable(entry.open)
        if entry.via_qemu:
            assert name in detect.QEMU_FORMATS and entry.qemu_driver == detect.QEMU_DRIVER[name]
    # What convert and boot-check read instead of format names: only imgk is read by imgkit alone,
    # only an ISO boots as a CD-ROM whatever it holds.
    assert [n for n, e in registry.FORMATS.items() if e.qemu_driver is None] == ["imgk"]
    assert [n for n, e in registry.FORMATS.items() if e.optical] == ["iso"]


def test_a_new_format_is_one_entry(images, monkeypatch):
    class Upside(Stream):  # a toy format: the bytes of a raw file, read back to front
        def __init__(self, path):
            self.data = open(path, "rb").read()
            self.size = len(self.data)

        def read(self, offset, length):
            return self.data[::-1][offset:offset + length]
    monkeypatch.setitem(registry.FORMATS, "upside", registry.Format("upside", lambda p, req: Upside(p)))
    s = registry.open_image(images["raw"], fmt="upside")
    assert s.read(0, 4) == pattern_bytes(4 * MiB, seed=9)[::-1][:4]
    assert api.open_image is registry.open_image  # the facade re-exports the registry's opener
