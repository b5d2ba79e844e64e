"""imgkit convert on the command line: formats from extensions, refusals, --force, --json,
progress, the Azure preset, and ISO round trips."""
from __future__ import annotations

import json
import os
import struct

import pytest

from imgkit import api
from tests.conftest import assert_one_line_error, pattern_bytes, run_imgkit
from tests.convert_helpers import MiB, build_iso, sh, sha256_file

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert-cli")
    raw = str(d / "odd.raw")
    with open(raw, "wb") as f:  # 20 MiB + 4 KiB: not a whole MiB (Azure must round it up)
        f.write(pattern_bytes(2 * MiB, seed=3))
        f.truncate(20 * MiB + 4096)
    imgk = str(d / "odd.imgk")
    api.capture(raw, imgk, sector_by_sector=True)
    return {"dir": d, "raw": raw, "imgk": imgk}


def test_json_result_and_progress(small, tmp_path):
    out = tmp_path / "vm.qcow2"
    proc = run_imgkit("convert", small["imgk"], out, "--json", "--progress", "json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["format"] == "qcow2" and doc["source_format"] == "imgk" and doc["method"] == "native"
    assert doc["virtual_size"] == 20 * MiB + 4096 and doc["destination"] == str(out)
    assert doc["allocated_size"] < 4 * MiB
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert events and events[-1]["event"] == "done" and events[-1]["op"] == "convert"
    assert events[-1]["done"] == events[-1]["total"] == 20 * MiB + 4096


@pytest.mark.parametrize("name,magic", [("vm.vmdk", b"KDMV"), ("vm.qcow2", b"QFI\xfb")])  # qemu-img, native
def test_existing_destination_needs_force(small, tmp_path, name, magic):
    out = tmp_path / name
    out.write_bytes(b"precious")
    proc = run_imgkit("convert", small["imgk"], out)
    assert_one_line_error(proc, 3, "already exists")
    assert out.read_bytes() == b"precious"
    run_imgkit("convert", small["imgk"], out, "--force", check=True)
    assert out.read_bytes()[:4] == magic
    assert sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.parametrize("args,needle", [
    (["x.unknown"], "cannot tell the destination format"),
    (["x.vhd", "--compress"], "--compress applies to qcow2"),
    (["x.qcow2", "--preset", "azure"], "azure makes a VHD"),
    (["x.vmdk", "--subformat", "fixed"], "does not apply to vmdk"),
    (["x.iso"], "not an optical image"),
])
def test_usage_refusals(small, tmp_path, args, needle):
    dest, *rest = args
    proc = run_imgkit("convert", small["imgk"], tmp_path / dest, *rest)
    assert_one_line_error(proc, 3, needle)
    assert os.listdir(tmp_path) == []


def test_to_overrides_extension(small, tmp_path):
    out = tmp_path / "disk.bin"
    run_imgkit("convert", small["imgk"], out, "--to", "vhdx", check=True)
    assert out.read_bytes()[:8] == b"vhdxfile"


def test_azure_preset(small, tmp_path):
    out = tmp_path / "azure.vhd"
    doc = json.loads(run_imgkit("convert", small["imgk"], out, "--preset", "azure", "--json", check=True).stdout)
    assert doc["subformat"] == "fixed" and doc["virtual_size"] == 21 * MiB
    data = out.read_bytes()
    assert len(data) == 21 * MiB + 512  # fixed VHD: the disk, then the footer
    footer = data[-512:]
    assert footer[:8] == b"conectix"
    orig, cur = struct.unpack(">QQ", footer[40:56])
    disk_type = struct.unpack(">I", footer[60:64])[0]
    assert cur == orig == 21 * MiB and disk_type == 2
    info = json.loads(sh("qemu-img", "info", "--output=json", "-f", "vpc", out).stdout)
    assert info["virtual-size"] == 21 * MiB
    with open(small["raw"], "rb") as f:
        want = f.read()
    assert data[:len(want)] == want and data[len(want):21 * MiB] == bytes(21 * MiB - len(want))


@pytest.fixture(scope="module")
def iso(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert-iso")
    return build_iso(str(d))


def test_iso_round_trips_byte_identical(iso, tmp_path):
    imgk = tmp_path / "cd.imgk"
    run_imgkit("capture", iso, imgk, check=True)
    with api.open_image(str(imgk)) as img:
        assert img.metadata["optical"]["el_torito"] and img.metadata["optical"]["volume_id"] == "IMGKIT_TEST"
    back = tmp_path / "back.iso"
    run_imgkit("convert", imgk, back, check=True)
    assert sha256_file(back) == sha256_file(iso)
    # through qcow2 and back: still optical, still byte-identical
    q = tmp_path / "cd.qcow2"
    run_imgkit("convert", imgk, q, check=True)
    imgk2 = tmp_path / "cd2.imgk"
    run_imgkit("convert", q, imgk2, check=True)
    back2 = tmp_path / "back2.iso"
    run_imgkit("convert", imgk2, back2, check=True)
    assert sha256_file(back2) == sha256_file(iso)
    # and straight from the .iso file (detected by its CD001 descriptor)
    direct = tmp_path / "direct.vmdk"
    doc = json.loads(run_imgkit("convert", iso, direct, "--json", check=True).stdout)
    assert doc["source_format"] == "iso" and doc["method"] == "qemu-img"


def test_progress_follows_qemu_img(small, tmp_path):
    """convert reads qemu-img's own -p output: the regex matches what this qemu-img prints."""
    from imgkit.operations.convert import _PROGRESS_RE
    out = sh("qemu-img", "convert", "-p", "-f", "raw", "-O", "qcow2", small["raw"], tmp_path / "p.qcow2").stdout
    found = [float(x) for x in _PROGRESS_RE.findall(out)]
    assert found and found[-1] == 100.0 and found == sorted(found)


def test_raw_output_keeps_zeros_as_holes_and_every_byte(tmp_path):
    # Written zeros (allocated in the source, so its runs call them data) come out as a hole, also
    # after the output's data ranges were allocated up front (OutputWriter.preallocate + discard).
    # The zero test is per piece read: 4 MiB for a raw source, one chunk (here 1 MiB) for an imgk.
    src = tmp_path / "src.raw"
    data = pattern_bytes(6 * MiB, seed=5)
    with open(src, "wb") as f:
        f.write(data[:3 * MiB] + bytes(8 * MiB) + data[3 * MiB:] + b"tail")  # not a whole block at the end
    api.capture(str(src), str(tmp_path / "src.imgk"), sector_by_sector=True, chunk_size=MiB)
    for source, hole, most in ((src, (4 * MiB, 8 * MiB), 10 * MiB), (tmp_path / "src.imgk", (3 * MiB, 11 * MiB), 6 * MiB)):
        out = tmp_path / f"out-{source.suffix[1:]}.raw"
        proc = run_imgkit("convert", source, out, "--json", "--progress", "none", check=True)
        assert out.read_bytes() == src.read_bytes()
        doc = json.loads(proc.stdout)
        assert doc["method"] == "copy" and doc["allocated_size"] <= most + 64 * 1024, doc
        with open(out, "rb") as f:
            assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == hole[0]
            assert os.lseek(f.fileno(), hole[0], os.SEEK_DATA) == hole[1]
