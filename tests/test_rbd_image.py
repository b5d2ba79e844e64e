"""RBD block images in a real single-node Ceph: imgk -> rbd and back, capture of an RBD image,
restore onto RBD with its safety rules (existing image needs --force, an image in use is refused)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from ceph_fixtures import bucket, ceph  # noqa: F401 (fixtures)
from conftest import assert_one_line_error, pattern_bytes, run_imgkit

from imgkit.remote.rbd_image import RbdSource
from imgkit.stream import DATA

MiB = 1 << 20


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """24 MiB: data, an 8 MiB zero stretch (must stay unallocated in RBD), data."""
    d = tmp_path_factory.mktemp("rbddisk")
    data = bytearray(pattern_bytes(24 * MiB, seed=7))
    data[8 * MiB:16 * MiB] = bytes(8 * MiB)
    path = d / "disk.raw"
    path.write_bytes(bytes(data))
    imgk = d / "disk.imgk"
    run_imgkit("capture", path, imgk, "--sector-by-sector", check=True)
    return path, imgk


def name() -> str:
    return f"img-{uuid.uuid4().hex[:10]}"


def qemu_rbd(ceph, image: str) -> str:
    return f"rbd:{ceph.rbd_pool}/{image}:conf={ceph.conf}"


def allocated(location: str) -> list[tuple[int, int]]:
    with RbdSource(location) as src:
        return [(r.offset, r.end) for r in src.runs() if r.kind == DATA]


def test_convert_imgk_to_rbd_and_back(ceph, disk, tmp_path):
    raw, imgk = disk
    target = f"rbd:{ceph.rbd_pool}/{name()}"
    doc = json.loads(run_imgkit("convert", imgk, target, "--json", check=True).stdout)
    assert doc["format"] == "rbd" and doc["virtual_size"] == raw.stat().st_size
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw),
                    qemu_rbd(ceph, target.split("/")[1])], check=True, capture_output=True)
    # sparse: the zero stretch was never written
    assert all(end <= 8 * MiB or start >= 16 * MiB for start, end in allocated(target))
    back = tmp_path / "back.raw"
    run_imgkit("convert", target, back, check=True)
    assert back.read_bytes() == raw.read_bytes()
    back_imgk = tmp_path / "back.imgk"
    run_imgkit("convert", target, back_imgk, check=True)
    out = tmp_path / "again.raw"
    run_imgkit("restore", back_imgk, out, "--yes", check=True)
    assert out.read_bytes() == raw.read_bytes()


def test_capture_of_rbd_image_reads_a_snapshot(ceph, disk, tmp_path):
    raw, _ = disk
    image = name()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(raw), qemu_rbd(ceph, image)],
                   check=True, capture_output=True)
    out = tmp_path / "vm.imgk"
    doc = json.loads(run_imgkit("capture", f"rbd:{ceph.rbd_pool}/{image}", out, "--json", check=True).stdout)
    assert doc["logical_size"] == raw.stat().st_size
    assert doc["zero_chunks"] >= 4  # unallocated extents are not even read
    restored = tmp_path / "vm.raw"
    run_imgkit("restore", out, restored, "--yes", check=True)
    assert restored.read_bytes() == raw.read_bytes()
    snaps = subprocess.run(["rbd", "snap", "ls", f"{ceph.rbd_pool}/{image}", "--format", "json"],
                           check=True, capture_output=True, text=True).stdout
    assert json.loads(snaps) == []  # the capture's own snapshot is gone


def test_capture_to_s3_of_rbd_image(ceph, bucket, disk, tmp_path):
    raw, imgk = disk
    image = f"rbd:{ceph.rbd_pool}/{name()}"
    run_imgkit("restore", imgk, image, check=True)
    url = f"s3://{bucket}/vm.imgk"
    run_imgkit("capture", image, url, check=True)
    run_imgkit("restore", url, tmp_path / "r.raw", "--yes", check=True)
    assert (tmp_path / "r.raw").read_bytes() == raw.read_bytes()


def test_restore_to_rbd_refuses_existing_without_force_and_in_use_always(ceph, disk):
    raw, imgk = disk
    image = name()
    target = f"rbd:{ceph.rbd_pool}/{image}"
    subprocess.run(["rbd", "create", "--size", "4M", f"{ceph.rbd_pool}/{image}"], check=True)
    proc = run_imgkit("restore", imgk, target)
    assert_one_line_error(proc, 3, "already exists", "--force")
    with RbdSource(target) as src:
        assert src.size == 4 * MiB  # untouched
    run_imgkit("restore", imgk, target, "--force", "--verify", check=True)
    with RbdSource(target) as src:
        assert src.size == raw.stat().st_size and src.read(0, src.size) == raw.read_bytes()
    # A client holding the image open (as a VM's librbd does) makes it in use: refused even with --force.
    holder = subprocess.Popen([sys.executable, "-c",
                               "import rados, rbd, sys, os\n"
                               f"c = rados.Rados(conffile={ceph.conf!r}); c.connect()\n"
                               f"img = rbd.Image(c.open_ioctx({ceph.rbd_pool!r}), {image!r})\n"
                               "print('open', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        proc = run_imgkit("restore", imgk, target, "--force")
        assert_one_line_error(proc, 3, "in use")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    listed = subprocess.run(["rbd", "ls", ceph.rbd_pool], check=True, capture_output=True, text=True).stdout
    assert not [n for n in listed.split() if "imgkit-partial" in n]  # no temporary image left


def test_rbd_errors_are_one_line(ceph, disk):
    _, imgk = disk
    assert_one_line_error(run_imgkit("info", f"rbd:{ceph.rbd_pool}/missing"), 3, "no such rbd image")
    assert_one_line_error(run_imgkit("info", "rbd:nopool/x"), 3, "no pool")
    assert_one_line_error(run_imgkit("restore", imgk, "rbd:justname"), 3, "rbd:POOL/IMAGE")
    assert_one_line_error(run_imgkit("restore", imgk, f"rbd:{ceph.rbd_pool}/x@snap"), 3, "snapshot")


def test_capture_of_a_named_snapshot(ceph, disk, tmp_path):
    """rbd:pool/image@snap reads that snapshot, not the image as it is now."""
    raw, imgk = disk
    image = name()
    target = f"rbd:{ceph.rbd_pool}/{image}"
    run_imgkit("restore", imgk, target, check=True)
    subprocess.run(["rbd", "snap", "create", f"{ceph.rbd_pool}/{image}@before"], check=True, capture_output=True)
    import rados  # change the image after the snapshot
    import rbd
    c = rados.Rados(conffile=ceph.conf)
    c.connect()
    try:
        with rbd.Image(c.open_ioctx(ceph.rbd_pool), image) as img:
            img.write(b"\xff" * 4096, 0)
    finally:
        c.shutdown()
    out = tmp_path / "snap.imgk"
    run_imgkit("capture", f"{target}@before", out, "--sector-by-sector", check=True)
    run_imgkit("restore", out, tmp_path / "snap.raw", "--yes", check=True)
    assert (tmp_path / "snap.raw").read_bytes() == raw.read_bytes()
