"""A corpus of hostile and malformed foreign images, built here with qemu-img and byte patches.
Each one must be refused by imgkit's own header inspection BEFORE qemu touches it. Proof: the
refusals happen with a PATH that has no qemu-img or qemu-storage-daemon at all (and a valid image
under the same PATH fails with "not installed" instead, showing qemu really is absent)."""
from __future__ import annotations

import os
import struct

import pytest

from imgkit.formats import detect, foreign
from tests.conftest import assert_one_line_error, run_imgkit
from tests.convert_helpers import MiB, sh

pytestmark = pytest.mark.qemu
NO_QEMU = {"PATH": "/nonexistent-imgkit-test"}


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _vhd_fix_checksum(path, footer_at):
    with open(path, "r+b") as f:
        f.seek(footer_at)
        footer = bytearray(f.read(512))
        footer[64:68] = b"\0\0\0\0"
        f.seek(footer_at + 64)
        f.write(struct.pack(">I", ~sum(footer) & 0xFFFFFFFF))


def _replace_text(path, old: bytes, new: bytes):
    with open(path, "rb") as f:
        data = f.read()
    assert old in data, old
    pos = data.index(old)
    pad = b" " * max(0, len(old) - len(new))  # spaces: a NUL would end the descriptor text
    _patch(path, pos, new + pad)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    c = {}

    def p(name):
        c[name] = str(d / name)
        return c[name]

    sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", p("backing.qcow2"), "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'data.bin'}", p("datafile.qcow2"), "1M")
    # The data-file feature bit alone, without the extension naming the file.
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("databit.qcow2"), "1M")
    _patch(c["databit.qcow2"], 72, struct.pack(">Q", 4))
    with open(p("flat-descriptor.vmdk"), "w") as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                'createType="monolithicFlat"\nRW 2048 FLAT "/etc/passwd" 0\n')
    sh("qemu-img", "create", "-q", "-f", "vmdk", p("extent-patched.vmdk"), "1M")
    _replace_text(c["extent-patched.vmdk"], b'RW 2048 SPARSE "extent-patched.vmdk"', b'RW 2048 FLAT "/etc/passwd" 0')
    sh("qemu-img", "create", "-q", "-f", "vmdk", p("two-extents.vmdk"), "1M")
    _replace_text(c["two-extents.vmdk"], b"# Extent description", b'RW 8 FLAT "/a" 0')
    sh("qemu-img", "create", "-q", "-f", "vmdk", p("garbled-extent.vmdk"), "1M")
    _replace_text(c["garbled-extent.vmdk"], b'RW 2048 SPARSE "garbled-extent.vmdk"',
                  b'RW 2048 SPARSE "garbled-extent.vmdk"\nRW 2048 FLAT "/etc/shadow" 0 trailing words')
    sh("qemu-img", "create", "-q", "-f", "vmdk", p("parent.vmdk"), "1M")
    _replace_text(c["parent.vmdk"], b"parentCID=ffffffff", b'parentCID=12345678\nparentFileNameHint="/etc/passwd"')
    # Truncated headers.
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("trunc.qcow2"), "1M")
    os.truncate(c["trunc.qcow2"], 40)
    sh("qemu-img", "create", "-q", "-f", "vhdx", p("trunc.vhdx"), "8M")
    os.truncate(c["trunc.vhdx"], 100 << 10)
    sh("qemu-img", "create", "-q", "-f", "vmdk", p("trunc.vmdk"), "1M")
    os.truncate(c["trunc.vmdk"], 60)
    sh("qemu-img", "create", "-q", "-f", "vpc", p("trunc-dynamic.vhd"), "8M")
    os.truncate(c["trunc-dynamic.vhd"], 1024)
    # Absurd sizes and tables outside the file.
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("huge.qcow2"), "1M")
    _patch(c["huge.qcow2"], 24, struct.pack(">Q", 1 << 62))
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("l1-outside.qcow2"), "1M")
    _patch(c["l1-outside.qcow2"], 40, struct.pack(">Q", 1 << 40))
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("ext-overrun.qcow2"), "1M")
    _patch(c["ext-overrun.qcow2"], 112, struct.pack(">II", 0x12345678, 0xFFFFFF00))
    sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", p("huge.vhd"), "1M")
    end = os.path.getsize(c["huge.vhd"]) - 512
    _patch(c["huge.vhd"], end + 48, struct.pack(">Q", 1 << 50))
    _vhd_fix_checksum(c["huge.vhd"], end)
    sh("qemu-img", "create", "-q", "-f", "vpc", p("differencing.vhd"), "8M")
    end = os.path.getsize(c["differencing.vhd"]) - 512
    _patch(c["differencing.vhd"], end + 60, struct.pack(">I", 4))
    _vhd_fix_checksum(c["differencing.vhd"], end)
    sh("qemu-img", "create", "-q", "-f", "vmdk", p("huge.vmdk"), "1M")
    _patch(c["huge.vmdk"], 12, struct.pack("<Q", 1 << 60))
    with open(p("qed.img"), "wb") as f:
        f.write(b"QED\0" + bytes(4092))
    return c


REFUSED = {
    "backing.qcow2": "backing file",
    "datafile.qcow2": "data file",
    "databit.qcow2": "data file",
    "flat-descriptor.vmdk": "descriptor file",
    "extent-patched.vmdk": "extent",
    "two-extents.vmdk": "2 extents",
    "garbled-extent.vmdk": "does not parse",
    "parent.vmdk": "parent",
    "trunc.qcow2": "truncated",
    "trunc.vhdx": "outside the file",
    "trunc.vmdk": "outside the file",
    "trunc-dynamic.vhd": "truncated",
    "huge.qcow2": "absurd",
    "l1-outside.qcow2": "outside the file",
    "ext-overrun.qcow2": "extension",
    "huge.vhd": "absurd",
    "differencing.vhd": "differencing",
    "huge.vmdk": "absurd",
    "qed.img": "QED",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_before_qemu(corpus, name, tmp_path):
    path = corpus[name]
    for dest in ("out.imgk", "out.qcow2"):
        out = tmp_path / dest
        proc = run_imgkit("convert", path, out, env=NO_QEMU)
        assert_one_line_error(proc, 3, "refused", REFUSED[name])
        assert "not installed" not in proc.stderr
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if "imgkit-tmp" in n]
    proc = run_imgkit("info", path, env=NO_QEMU)
    assert_one_line_error(proc, 3, "refused", REFUSED[name])
    proc = run_imgkit("capture", path, tmp_path / "c.imgk", env=NO_QEMU)
    assert_one_line_error(proc, 3, "refused")


def test_qemu_really_absent_under_that_path(tmp_path):
    good = str(tmp_path / "good.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", good, "1M")
    proc = run_imgkit("convert", good, tmp_path / "good.imgk", env=NO_QEMU)
    assert_one_line_error(proc, 4, "not installed", "qemu")


def test_from_raw_takes_the_bytes(corpus, tmp_path):
    """A raw disk may hold a qcow2 header: with --from raw it is just bytes (no qemu needed)."""
    src = corpus["backing.qcow2"]
    out = tmp_path / "asraw.imgk"
    run_imgkit("convert", src, out, "--from", "raw", env=NO_QEMU, check=True)
    back = tmp_path / "back.raw"
    run_imgkit("convert", out, back, env=NO_QEMU, check=True)
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()
    # and the imgk made from it does not turn into a qcow2 when converted on: it is raw bytes.
    assert b"/etc/passwd" in open(back, "rb").read()


def test_json_names_refused(tmp_path):
    name = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"/etc/passwd"}}'
    proc = run_imgkit("convert", name, tmp_path / "x.imgk", env=NO_QEMU)
    assert_one_line_error(proc, 3, "json:")
    proc = run_imgkit("convert", "/etc/hostname", "json:x.qcow2", "--to", "qcow2", env=NO_QEMU)
    assert_one_line_error(proc, 3, "json:")


def test_inspectors_accept_what_qemu_makes(tmp_path):
    """The other side of the coin: ordinary images of every subformat pass inspection."""
    for fmt, opts in (("qcow2", "compat=0.10"), ("qcow2", "compat=1.1,compression_type=zstd"),
                      ("vpc", "subformat=fixed"), ("vpc", "subformat=dynamic"), ("vhdx", "subformat=fixed"),
                      ("vhdx", "subformat=dynamic"), ("vmdk", "subformat=monolithicSparse"),
                      ("vmdk", "subformat=streamOptimized")):
        path = str(tmp_path / f"ok.{fmt}")
        sh("qemu-img", "create", "-q", "-f", fmt, "-o", opts, path, "3M")
        ours = {"vpc": "vhd"}.get(fmt, fmt)
        assert detect.detect_format(path) == ours
        info = foreign.inspect(path, ours)
        assert info.virtual_size >= 3 * MiB
        os.unlink(path)


def test_damage_only_qemu_sees_is_bad_input(tmp_path):
    """Header checksums imgkit does not verify (VHDX CRC-32C): qemu refuses, imgkit reports it as a
    bad image (exit 3) in one line, and leaves nothing behind."""
    bad = str(tmp_path / "bad.vhdx")
    sh("qemu-img", "create", "-q", "-f", "vhdx", bad, "8M")
    with open(bad, "r+b") as f:
        for off in (64 * 1024 + 4, 128 * 1024 + 4):  # both headers' checksums, XOR 0xFF
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))
    proc = run_imgkit("convert", bad, tmp_path / "out.imgk")
    assert_one_line_error(proc, 3, "qemu could not open it as vhdx")
    assert sorted(os.listdir(tmp_path)) == ["bad.vhdx"]


def _cpu_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        return next(line for line in f if line.startswith("Max cpu time")).split()[3]


def test_qemu_behind_a_mount_has_no_cpu_or_time_limit_and_batch_reads_do(tmp_path):
    # A mount lives for hours: a CPU rlimit or wall-clock timer on its qemu-storage-daemon would turn
    # into EIO then. Batch reads (convert, capture) keep limits proportional to the disk size.
    from imgkit import api
    q = str(tmp_path / "d.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", q, str(8 * MiB))
    with api.open_image(q, serving=True) as served, api.open_image(q) as batch:
        assert _cpu_limit(served._proc.pid) == "unlimited" and served._timer is None
        assert _cpu_limit(batch._proc.pid) != "unlimited" and batch._timer is not None
        assert served.read(0, 4096) == bytes(4096)
