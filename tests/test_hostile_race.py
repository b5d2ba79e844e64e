"""A foreign image swapped between imgkit's inspection and qemu's start (issue 13, case 1).

The attacker's move is made deterministic: foreign.inspect is wrapped so that, right after the
clean file was inspected, the path is replaced by a qcow2 whose external data file (or backing
file) is a "host secret". qemu must still read the inspected, clean bytes on every path that
hands a foreign image to qemu: convert's direct qemu-img path, the stream path
(qemu-storage-daemon, also behind capture and mount), and boot-check's qemu-system.
Without descriptor pinning these leaked the secret (the issue measured 10 of 20 converts)."""
from __future__ import annotations

import os
import shutil

import pytest

from imgkit import api
from imgkit.formats import detect, foreign
from tests.convert_helpers import MiB, sh

pytestmark = pytest.mark.qemu
SECRET = b"HOST-SECRET!" * 4096
SIZE = 4 * MiB


@pytest.fixture
def race(tmp_path, monkeypatch):
    clean_raw = tmp_path / "clean.raw"
    clean_raw.write_bytes(bytes(range(256)) * (SIZE // 256))
    clean = tmp_path / "clean.qcow2"
    sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(clean_raw), str(clean))
    secret = tmp_path / "host-secret.bin"
    evil = tmp_path / "evil.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", str(evil),
       str(SIZE))
    with open(secret, "r+b") as f:  # the data file qemu would read as the disk: a host file's bytes
        f.write(SECRET)
    behind = tmp_path / "backing-evil.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(secret), "-F", "raw", str(behind), str(SIZE))
    # Sanity: qemu, opening the evil files by name, does leak the secret.
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(evil), str(tmp_path / "leak.raw"))
    assert (tmp_path / "leak.raw").read_bytes().startswith(SECRET)

    target = tmp_path / "race.qcow2"
    real_inspect = foreign.inspect
    state = {"swaps": 0, "evil": evil}

    def inspect_then_swap(path, fmt):
        result = real_inspect(path, fmt)
        if os.path.abspath(path) == str(target):
            spare = tmp_path / "swap-in.qcow2"
            shutil.copyfile(state["evil"], spare)
            os.replace(spare, path)  # the attacker's swap, after inspection, before qemu starts
            state["swaps"] += 1
        return result

    def arm(evil_kind="datafile"):
        state["evil"] = evil if evil_kind == "datafile" else behind
        shutil.copyfile(clean, target)

    monkeypatch.setattr(foreign, "inspect", inspect_then_swap)
    return {"target": str(target), "clean": clean_raw.read_bytes(), "state": state, "arm": arm,
            "dir": tmp_path}


def _read_raw(path, fmt):
    out = path + ".check.raw"
    sh("qemu-img", "convert", "-q", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


@pytest.mark.parametrize("evil_kind", ["datafile", "backing"])
def test_direct_qemu_img_convert_reads_the_inspected_file(race, evil_kind):
    race["arm"](evil_kind)
    out = str(race["dir"] / "out.vmdk")
    from imgkit.operations.convert import convert
    result = convert(race["target"], out)
    assert result.method == "qemu-img" and race["state"]["swaps"] == 1
    data = _read_raw(out, "vmdk")
    assert data == race["clean"] and b"HOST-SECRET" not in data


def test_stream_convert_reads_the_inspected_file(race):
    race["arm"]()
    out = str(race["dir"] / "out.raw")
    from imgkit.operations.convert import convert
    result = convert(race["target"], out)
    assert result.method == "copy" and race["state"]["swaps"] == 1
    with open(out, "rb") as f:
        assert f.read() == race["clean"]


def test_capture_and_open_image_read_the_inspected_file(race):
    """capture and mount read foreign images through api.open_image (QemuImage, qemu-storage-daemon)."""
    race["arm"]()
    out = str(race["dir"] / "out.imgk")
    api.capture(race["target"], out, sector_by_sector=True)
    assert race["state"]["swaps"] == 1
    img = api.open_image(out)
    try:
        assert img.read(0, img.size) == race["clean"]
    finally:
        img.close()
    race["arm"]()
    stream = api.open_image(race["target"], serving=True)  # what mount opens
    try:
        list(stream.runs())  # builds the pread fast path (qemu-img map) too
        assert stream.read(0, stream.size) == race["clean"]
    finally:
        stream.close()
    assert race["state"]["swaps"] == 2


def test_every_qemu_node_of_a_foreign_image_names_a_descriptor():
    """No code path can hand qemu a foreign image by name: the one node builder refuses."""
    from imgkit.formats.qemu_image import format_node
    for fmt in detect.QEMU_FORMATS:
        with pytest.raises(ValueError):
            format_node("/some/image", fmt)
        node = format_node("/some/image", fmt, fd=7)
        assert node["file"]["filename"] == "/proc/self/fd/7"
        assert node.get("backing", None) is None and "data-file" not in node


def test_only_imgkits_own_files_get_a_path_or_a_backing_node():
    """own=/writable= are the only ways past the descriptor rule: a read-only image without them is
    refused a backing node, and flush=False is only for writable scratch files."""
    from imgkit.formats.qemu_image import format_node
    with pytest.raises(ValueError):
        format_node("/some/image", "raw", backing="base")
    with pytest.raises(ValueError):
        format_node("/some/image", "qcow2", fd=7, backing="base")
    with pytest.raises(ValueError):
        format_node("/some/image", "raw", flush=False)
    node = format_node("/tmp/own.qcow2", "qcow2", own=True, backing="base")
    assert node["read-only"] is True and node["backing"] == "base" and node["file"]["filename"] == "/tmp/own.qcow2"
    scratch = format_node("/tmp/scratch.raw", "raw", writable=True, flush=False)
    assert scratch["cache"] == scratch["file"]["cache"] == {"no-flush": True}
    assert "cache" not in format_node("/tmp/scratch.raw", "raw", writable=True)


def test_boot_check_boots_the_inspected_file(tiny_bios_image, tmp_path, monkeypatch):
    clean = tmp_path / "clean.qcow2"
    sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", tiny_bios_image, str(clean))
    evil_disk = tmp_path / "evil-disk.raw"
    data = bytearray(open(tiny_bios_image, "rb").read())
    at = data.index(b"tiny-bios")
    data[at:at + 9] = b"EVIL-bios"
    evil_disk.write_bytes(bytes(data))
    evil = tmp_path / "evil.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'evil-data.raw'},data_file_raw=on",
       str(evil), str(len(data)))
    with open(tmp_path / "evil-data.raw", "r+b") as f:
        f.write(bytes(data))
    target = tmp_path / "race.qcow2"
    shutil.copyfile(clean, target)
    real_inspect = foreign.inspect
    swaps = []

    def inspect_then_swap(path, fmt):
        result = real_inspect(path, fmt)
        spare = tmp_path / "swap-in.qcow2"
        shutil.copyfile(evil, spare)
        os.replace(spare, path)
        swaps.append(path)
        return result

    monkeypatch.setattr(foreign, "inspect", inspect_then_swap)
    from imgkit.operations.bootcheck import boot_check
    result = boot_check(str(target), accel="tcg", timeout=60)
    assert swaps, "the swap did not happen"
    text = str(result.to_json())
    assert "EVIL-bios" not in text
    assert result.passed and "tiny-bios" in result.matched, text
