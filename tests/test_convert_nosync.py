"""convert --no-sync: the output is left in the page cache as `qemu-img convert` leaves its own.

Proof that no fsync happened: the CLI runs under strace (-f), and every fsync/fdatasync/syncfs/
sync/sync_file_range made by imgkit's own process (its threads and any child that is not a qemu
program: qemu-img's own fdatasyncs while it creates a qcow2/VHDX/VMDK are qemu's default, not
imgkit's) is counted, with every open with O_DIRECT. The same conversion without --no-sync is the
control: it must show the fsyncs (data and directory), so the trace would catch one. Each output is
checked with `qemu-img compare` against the raw disk (and `qemu-img check` for qcow2), for every
route: native writers (qcow2, vhd), the raw copy, qemu-img reading imgkit's NBD export (vhdx), and
qemu-img reading the source file itself (raw -> vmdk)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from imgkit import api
from tests.conftest import assert_one_line_error, run_imgkit
from tests.convert_helpers import build_gpt_disk, sh

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("strace") is None, reason="strace is in scripts/setup.sh")]

SYNCS = ("fsync", "fdatasync", "syncfs", "sync", "sync_file_range")
TRACED = ("execve", "clone", "clone3", "fork", "vfork", "openat", *SYNCS)
QEMU_DRIVER = {"raw": "raw", "qcow2": "qcow2", "vhd": "vpc", "vhdx": "vhdx", "vmdk": "vmdk"}
_LINE = re.compile(r"^(\d+) +(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    d = tmp_path_factory.mktemp("nosync")
    raw = build_gpt_disk(str(d))
    imgk = str(d / "gpt.imgk")
    api.capture(raw, imgk, sector_by_sector=True)
    return {"raw": raw, "imgk": imgk}


def traced_convert(tmp_path, *args):
    """Run `imgkit convert ARGS --json` under strace; (result, imgkit's syncs, imgkit's O_DIRECT opens)."""
    log = tmp_path / "strace.log"
    argv = ["strace", "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(TRACED), "-e", "signal=none",
            sys.executable, "-m", "imgkit", "convert", "--progress", "none", "--json", *map(str, args)]
    env = dict(os.environ)
    env.pop("IMGKIT_PASSWORD", None)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    syncs, direct_opens = [], []
    qemu: set[int] = set()  # qemu programs and every thread or child they made
    for line in log.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, call, rest = int(m.group(1)), m.group(2) or m.group(3), m.group(4)
        if call in ("clone", "clone3", "fork", "vfork") and pid in qemu:
            child = re.search(r"= (\d+)$", rest)
            if child:
                qemu.add(int(child.group(1)))
        elif call == "execve" and re.match(r'"[^"]*/qemu-[^"]*"', rest):
            qemu.add(pid)  # a child that only tried to run qemu makes no other call anyway
        elif pid in qemu:
            continue
        elif call in SYNCS and not rest.endswith("resumed>"):
            syncs.append(line)
        elif call == "openat" and re.search(r"\bO_DIRECT\b", rest):
            direct_opens.append(line)
    return json.loads(proc.stdout), syncs, direct_opens


def assert_same_disk(raw: str, out, fmt: str) -> None:
    sh("qemu-img", "compare", "-q", "-f", "raw", "-F", QEMU_DRIVER[fmt], raw, out)
    if fmt == "qcow2":
        sh("qemu-img", "check", "-q", "-f", "qcow2", out)


@pytest.mark.parametrize("source,fmt,method", [
    ("imgk", "raw", "copy"),
    ("imgk", "qcow2", "native"),
    ("imgk", "vhd", "native"),
    ("imgk", "vhdx", "nbd-export"),
    ("raw", "vmdk", "qemu-img"),
])
def test_no_sync_writes_the_whole_disk_and_never_syncs(disk, tmp_path, source, fmt, method):
    out = tmp_path / "out" / f"vm.{fmt}"
    out.parent.mkdir()
    result, syncs, direct_opens = traced_convert(tmp_path, disk[source], out, "--no-sync")
    assert result["method"] == method and result["format"] == fmt
    assert syncs == [], syncs
    assert direct_opens == [], direct_opens  # the page cache, as qemu-img writes
    assert_same_disk(disk["raw"], out, fmt)
    assert os.listdir(out.parent) == [out.name]  # renamed into place, no temp left


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk"])
def test_without_no_sync_the_trace_shows_the_fsyncs(disk, tmp_path, fmt):
    # The control: the same trace sees the data fsync and the directory fsync of a durable convert.
    out = tmp_path / "out" / f"vm.{fmt}"
    out.parent.mkdir()
    source = disk["raw"] if fmt == "vmdk" else disk["imgk"]
    _, syncs, direct_opens = traced_convert(tmp_path, source, out)
    assert sum(re.search(r"\bfsync\(", s) is not None for s in syncs) >= 2, syncs
    if fmt in ("qcow2", "raw"):  # imgkit's own writer: straight to the disk
        assert direct_opens, "a durable native convert opens its output with O_DIRECT"
    assert_same_disk(disk["raw"], out, fmt)


def test_no_sync_still_refuses_an_existing_destination(disk, tmp_path):
    out = tmp_path / "vm.qcow2"
    out.write_bytes(b"precious")
    proc = run_imgkit("convert", disk["imgk"], out, "--no-sync")
    assert_one_line_error(proc, 3, "already exists")
    assert out.read_bytes() == b"precious"
    run_imgkit("convert", disk["imgk"], out, "--no-sync", "--force", check=True)
    assert_same_disk(disk["raw"], out, "qcow2")
    assert os.listdir(tmp_path) == ["vm.qcow2"]


@pytest.mark.parametrize("dest", ["copy.imgk", "rbd:pool/image"])
def test_no_sync_is_refused_where_durability_is_the_product(disk, tmp_path, dest):
    # An imgk image (a backup) and an RBD image are always written durably: no silent downgrade.
    target = tmp_path / dest if dest.endswith(".imgk") else dest
    proc = run_imgkit("convert", disk["raw"], target, "--no-sync")
    assert_one_line_error(proc, 3, "--no-sync")
    assert os.listdir(tmp_path) == []
