"""`imgkit restore` reads every format imgkit reads (qcow2, VHD, VHDX, VMDK, raw, ISO, a block
device), not only imgk, with the same target checks: byte-identical results through real qemu-img,
a raw source that is the target itself refused, a loop device as target."""
import os
import subprocess

import pytest

from conftest import assert_one_line_error, loop_device, pattern_bytes, run_imgkit
from test_roundtrip import sparse_equal

QEMU_FORMATS = {"qcow2": "qcow2", "vpc": "vhd", "vhdx": "vhdx", "vmdk": "vmdk"}


@pytest.fixture(scope="module")
def source_disk(tmp_path_factory):
    """A 6 MiB raw disk with data, a hole and zeros: foreign formats keep holes, restore must too."""
    d = tmp_path_factory.mktemp("anyfmt")
    src = d / "src.raw"
    with open(src, "wb") as f:
        f.write(pattern_bytes(1 << 20, seed=3))
        f.seek(3 << 20)
        f.write(pattern_bytes(512 << 10, seed=4))
        f.truncate(6 << 20)
    return d, src


@pytest.mark.parametrize("qfmt", sorted(QEMU_FORMATS))
def test_restore_foreign_formats(source_disk, tmp_path, qfmt):
    d, src = source_disk
    img = tmp_path / f"disk.{QEMU_FORMATS[qfmt]}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", qfmt, str(src), str(img)], check=True)
    out = tmp_path / "out.raw"
    proc = run_imgkit("restore", img, out, "--yes", "--progress", "none", "--json", check=True)
    assert '"bytes_written"' in proc.stdout
    # vpc (VHD) rounds the virtual size up to its CHS geometry: compare the source's bytes
    assert os.path.getsize(out) >= os.path.getsize(src)
    with open(out, "r+b") as f:
        f.truncate(os.path.getsize(src))
    assert sparse_equal(out, src)


def test_restore_raw_and_iso_files(source_disk, tmp_path):
    d, src = source_disk
    out = tmp_path / "out.raw"
    run_imgkit("restore", src, out, "--yes", "--progress", "none", check=True)
    assert sparse_equal(out, src)
    dry = run_imgkit("restore", src, out, "--dry-run", check=True)
    assert "plan: restore the whole image" in dry.stdout


def test_restore_raw_onto_loop_device_and_refuse_self(source_disk, tmp_path):
    d, src = source_disk
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xff" * (8 << 20))
    with loop_device(target) as dev:
        run_imgkit("restore", src, dev, "--yes", "--progress", "none", check=True)
        with open(dev, "rb") as f:
            got = f.read(6 << 20)
        assert got == src.read_bytes()
        # the device being read is the target: refused before anything is written
        proc = run_imgkit("restore", dev, dev, "--yes", "--progress", "none")
        assert_one_line_error(proc, proc.returncode, "device being read")
        assert proc.returncode != 0
