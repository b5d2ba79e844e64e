"""Round trips raw -> imgk -> FORMAT -> imgk -> raw on a GPT disk with real filesystems and on a
sparse disk over 4 GiB: byte-identical (sha256), `qemu-img compare` against the raw disk, the same
allocation as qemu-img's own conversion (`qemu-img compare -s`), `qemu-img check` clean."""
from __future__ import annotations

import json
import os
import time

import pytest

from imgkit import api
from imgkit.operations.convert import convert
from tests.conftest import run_imgkit
from tests.convert_helpers import (MiB, allocated, build_gpt_disk, build_sparse_disk, qemu_check,
                                   qemu_compare, sha256_file, sh, sparse_files_equal)

pytestmark = pytest.mark.qemu

# (format, subformat, qemu-img -O driver, qemu-img -o options for the peer conversion)
FORMATS = [
    ("qcow2", None, "qcow2", "compat=1.1"),
    ("vhd", "dynamic", "vpc", "subformat=dynamic,force_size=on"),
    ("vhd", "fixed", "vpc", "subformat=fixed,force_size=on"),
    ("vhdx", None, "vhdx", "subformat=dynamic"),
    ("vmdk", "monolithicSparse", "vmdk", "subformat=monolithicSparse"),
    ("vmdk", "streamOptimized", "vmdk", "subformat=streamOptimized"),
]
CHECKABLE = ("qcow2", "vhdx", "vmdk")


@pytest.fixture(scope="session")
def gpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert-gpt")
    raw = build_gpt_disk(str(d))
    imgk = str(d / "gpt.imgk")
    api.capture(raw, imgk, sector_by_sector=True)  # convert is lossless: compare with every byte kept
    return {"dir": d, "raw": raw, "imgk": imgk, "sha": sha256_file(raw)}


def _round_trip(src, fmt, sub, driver, opts, workdir, tag):
    out = str(workdir / f"{tag}.{fmt}")
    result = convert(src["imgk"], out, subformat=sub)
    # Uncompressed qcow2 and dynamic VHD are written natively (formats/qcow2_writer.py,
    # vhd_writer.py), the rest by qemu-img over NBD.
    native = fmt == "qcow2" or (fmt, sub) == ("vhd", "dynamic")
    assert result.method == ("native" if native else "nbd-export") and result.format == fmt
    assert os.path.exists(out) and not [n for n in os.listdir(workdir) if "imgkit-tmp" in n]
    qemu_compare(src["raw"], "raw", out, driver)
    peer = str(workdir / f"{tag}.peer.{fmt}")
    sh("qemu-img", "convert", "-f", "raw", "-O", driver, "-o", opts, src["raw"], peer)
    qemu_compare(peer, driver, out, driver, strict=True)  # same allocation: holes stayed holes
    if fmt in CHECKABLE:
        assert qemu_check(out, driver).get("check-errors", 0) == 0
    back = str(workdir / f"{tag}.back.imgk")
    r2 = convert(out, back)
    assert r2.method == "capture" and r2.source_format == fmt
    raw = str(workdir / f"{tag}.back.raw")
    convert(back, raw)
    if src["sha"]:
        assert sha256_file(raw) == src["sha"]
    else:  # a 5 GiB disk: compare without reading its holes
        assert sparse_files_equal(raw, src["raw"])
    return out, back, raw


@pytest.mark.parametrize("fmt,sub,driver,opts", FORMATS, ids=[f"{f}-{s or 'default'}" for f, s, _, _ in FORMATS])
def test_gpt_round_trip(gpt, fmt, sub, driver, opts, tmp_path):
    out, back, raw = _round_trip(gpt, fmt, sub, driver, opts, tmp_path, "gpt")
    # Metadata survives: the partition view and info are derived from the same bytes.
    with api.open_image(gpt["imgk"]) as a, api.open_image(back) as b:
        ia, ib = api.image_info(a), api.image_info(b)
    # convert to imgk is filesystem-aware like capture (#12): the way each partition was captured
    # (capture_mode, used_bytes) is a fact of that capture, not of the disk; the rest must match.
    def table(info):
        t = dict(info["partition_table"])
        t["partitions"] = [{k: v for k, v in p.items() if k not in ("capture_mode", "used_bytes")}
                           for p in t["partitions"]]
        return t
    assert table(ia) == table(ib)
    assert all(p["capture_mode"].startswith("used-blocks") for p in ib["partition_table"]["partitions"])
    parts = ib["partition_table"]["partitions"]
    assert ib["partition_table"]["type"] == "gpt"
    assert [(p["filesystem"], p["label"]) for p in parts] == [("vfat", "ESP"), ("ext4", "rootfs")]
    assert ia["virtual_size"] == ib["virtual_size"] == 64 * MiB
    # info on the foreign image itself sees the same partitions, through qemu.
    with api.open_image(out) as f:
        info = api.image_info(f)
    assert info["format"] == fmt and table(info) == table(ia)
    if sub:
        assert info["subformat"] == sub


def test_raw_and_foreign_to_foreign_direct(gpt, tmp_path):
    """raw -> qcow2 and qcow2 -> vhdx go straight to qemu-img (explicit -f/-O), still byte-exact."""
    q = str(tmp_path / "d.qcow2")
    assert convert(gpt["raw"], q, compress=True).method == "qemu-img"
    info = json.loads(sh("qemu-img", "info", "--output=json", "-f", "qcow2", q).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert info["format-specific"]["data"]["compat"] == "1.1"
    x = str(tmp_path / "d.vhdx")
    assert convert(q, x).method == "qemu-img"
    assert qemu_check(x, "vhdx").get("check-errors", 0) == 0
    r = str(tmp_path / "d.raw")
    convert(x, r)
    assert sha256_file(r) == gpt["sha"]


def test_capture_and_info_cli_on_foreign(gpt, tmp_path):
    q = str(tmp_path / "disk.qcow2")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", gpt["raw"], q)
    proc = run_imgkit("info", q, "--json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["format"] == "qcow2" and doc["virtual_size"] == 64 * MiB
    assert doc["partition_table"]["type"] == "gpt" and len(doc["partition_table"]["partitions"]) == 2
    out = str(tmp_path / "disk.imgk")
    run_imgkit("capture", q, out, check=True)
    with api.open_image(out) as img:
        assert img.metadata["source"]["format"] == "qcow2"
        assert img.metadata["partition_table"]["partitions"][1]["filesystem"] == "ext4"


@pytest.mark.slow
@pytest.mark.parametrize("fmt,sub,driver,opts", [FORMATS[0], FORMATS[1], FORMATS[3], FORMATS[4]],
                         ids=["qcow2", "vhd-dynamic", "vhdx", "vmdk"])
def test_sparse_over_4g_round_trip(fmt, sub, driver, opts, tmp_path_factory, sparse):
    d = tmp_path_factory.mktemp(f"sparse-{fmt}")
    started = time.monotonic()
    out, back, raw = _round_trip(sparse, fmt, sub, driver, opts, d, "sparse")
    elapsed = time.monotonic() - started
    # 5 GiB disk, 8 MiB of data: every stored form stays small, and time follows data, not size.
    for path in (out, back, raw):
        assert allocated(path) < 64 * MiB, (path, allocated(path))
    assert os.path.getsize(raw) == 5 << 30
    assert elapsed < 60, elapsed


@pytest.fixture(scope="session")
def sparse(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert-sparse")
    raw = build_sparse_disk(str(d / "sparse.raw"))
    imgk = str(d / "sparse.imgk")
    api.capture(raw, imgk, sector_by_sector=True)  # convert is lossless: compare with every byte kept
    assert os.path.getsize(imgk) < 16 * MiB
    return {"dir": d, "raw": raw, "imgk": imgk, "sha": None}


def test_foreign_reads_take_the_file_fast_path_only_where_qemu_maps_raw_data(gpt, tmp_path):
    """Uncompressed qcow2 data is read straight from the file at qemu-img map's offsets; zstd
    clusters (no offset) go through qemu; qemu-img -c stores incompressible clusters uncompressed,
    so the zstd image is partly mapped. Both read the same bytes."""
    plain, packed = str(tmp_path / "p.qcow2"), str(tmp_path / "z.qcow2")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", gpt["raw"], plain)
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd", gpt["raw"], packed)
    with open(gpt["raw"], "rb") as f:
        want = f.read()
    mapped = {}
    for path in (plain, packed):
        with api.open_image(path) as img:
            assert not img.host_map.starts  # not before a bulk reader asks for runs()
            list(img.runs())
            mapped[path] = sum(e - s for s, e in zip(img.host_map.starts, img.host_map.ends))
            for off in (0, 1 * MiB - 512, 21 * MiB + 12345, 64 * MiB - 4096):
                assert img.read(off, 3 * MiB) == want[off:off + 3 * MiB]
    assert mapped[plain] > 8 * MiB and mapped[packed] < mapped[plain] - 2 * MiB


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_vhdx_allocation_from_its_own_bat(gpt, tmp_path, sub):
    """qemu reports a VHDX as all data; imgkit reads its BAT: absent blocks are zero runs, present
    ones are read from the file. The bytes are the same as qemu's."""
    path = str(tmp_path / "d.vhdx")
    sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", f"subformat={sub}", gpt["raw"], path)
    with open(gpt["raw"], "rb") as f:
        want = f.read()
    with api.open_image(path) as img:
        runs = list(img.runs())
        assert img.host_map.starts
        if sub == "dynamic":
            assert any(r.kind == "zero" for r in runs)
        for off in (0, 1 * MiB - 512, 21 * MiB + 12345, 64 * MiB - 4096):
            assert img.read(off, 3 * MiB) == want[off:off + 3 * MiB]
            assert img._nbd_read(off, min(3 * MiB, 64 * MiB - off)) == want[off:off + 3 * MiB]


@pytest.mark.parametrize("how", ["exit without close", "SIGKILL"])
def test_qemu_daemon_does_not_outlive_imgkit(gpt, tmp_path, how):
    """A foreign image left open (or an imgkit killed with SIGKILL) leaves no qemu-storage-daemon."""
    import signal
    import subprocess
    import sys
    q = str(tmp_path / "d.qcow2")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", gpt["raw"], q)
    code = ("import os, sys, time; from imgkit import api; img = api.open_image(sys.argv[1]); "
            "print(img._proc.pid, flush=True); "
            + ("time.sleep(60)" if how == "SIGKILL" else "sys.exit(0)"))
    proc = subprocess.Popen([sys.executable, "-c", code, q], stdout=subprocess.PIPE, text=True)
    daemon = int(proc.stdout.readline())
    if how == "SIGKILL":
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{daemon}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":  # dead, waiting for a reaper
            return
        time.sleep(0.1)
    os.kill(daemon, signal.SIGKILL)  # ours: do not leave it behind even when the test fails
    raise AssertionError(f"qemu-storage-daemon {daemon} outlived imgkit ({how})")


def test_vhdx_layout_comes_from_inspection_and_a_pending_log_means_no_map(gpt, tmp_path):
    """The BAT's place and sizes are what foreign.inspect bounded; a header naming a log to replay
    (the BAT on disk may be stale) or a file changed since inspection gives no map (qemu reads all)."""
    from imgkit.formats import foreign
    from imgkit.formats.vhdx_map import read_layout
    path = str(tmp_path / "d.vhdx")
    sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", gpt["raw"], path)
    inspected = foreign.inspect(path, "vhdx")
    assert inspected.layout.sector_size == 512 and not inspected.layout.log_pending
    runs, extents = read_layout(inspected)
    assert runs[-1].end == inspected.virtual_size and extents
    with open(path, "r+b") as f:  # LogGuid of the second header
        f.seek((128 << 10) + 48)
        f.write(b"\x01" * 16)
    pending = foreign.inspect(path, "vhdx")
    assert pending.layout.log_pending and read_layout(pending) is None
    with open(path, "ab") as f:
        f.write(bytes(4096))
    assert read_layout(inspected) is None
