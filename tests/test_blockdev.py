"""imgkit/platform/blockdev.py on real loop devices: sizes, offsets, whole disk vs partition, and what
mountinfo says is mounted read-write (a test-made ext4 plays the user's mounted disk; no image's
filesystem is ever mounted by the host kernel). partitions() is not tested here: these machines'
kernel makes no partitions of a loop device, even with --partscan."""
from __future__ import annotations

import os
import subprocess

from conftest import loop_device, needs_root

from imgkit.platform import blockdev
from imgkit.filesystems.fsaware import mounted_rw

pytestmark = needs_root


def test_loop_device_facts(tmp_path):
    backing = tmp_path / "disk.raw"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    with loop_device(backing, "-o", str(1 << 20), "--sizelimit", str(4 << 20)) as dev:
        rdev = os.stat(dev).st_rdev
        assert blockdev.device_size(dev) == 4 << 20
        assert blockdev.loop_offset(rdev) == 1 << 20
        assert os.path.samefile(blockdev.loop_backing_file(rdev), backing)
        assert not blockdev.is_partition(rdev) and blockdev.whole_disk(rdev) == rdev
        assert blockdev.holders(rdev) == []
    with loop_device(backing) as dev:
        assert blockdev.loop_offset(os.stat(dev).st_rdev) == 0


def test_mounts_and_mounted_rw_follow_the_mount_options(tmp_path):
    fs = tmp_path / "ext4.raw"
    with open(fs, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(fs) as dev:
        rdev = os.stat(dev).st_rdev
        assert rdev not in blockdev.mounts() and mounted_rw(dev) == {}
        subprocess.run(["mount", "-t", "ext4", dev, str(mnt)], check=True)
        try:
            assert blockdev.mounts(rw_only=True).get(rdev) == str(mnt)
            assert mounted_rw(dev) == {0: str(mnt)}
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            assert blockdev.mounts().get(rdev) == str(mnt) and rdev not in blockdev.mounts(rw_only=True)
            assert mounted_rw(dev) == {}
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    assert mounted_rw(str(fs)) == {}  # a regular file is never "mounted"


def test_mountinfo_line_with_escaped_paths_and_optional_fields():
    line = ("36 35 98:0 /my\\040root /mnt/a\\040b\\011c\\134d rw,noatime master:1 shared:7 - ext3 "
            "/dev/my\\040disk rw,errors=continue\n")
    e = blockdev.parse_mountinfo_line(line)
    assert e == blockdev.MountInfoEntry("98:0", "/my root", "/mnt/a b\tc\\d", ("rw", "noatime"), "ext3",
                                        "/dev/my disk")
    assert e.dev == os.makedev(98, 0)
    assert blockdev.parse_mountinfo_line("36 35 98:0 / /mnt rw\n") is None  # no " - " part
    assert blockdev.unescape_mountinfo("\\134040") == "\\040"  # one pass: an escaped backslash stays


def test_mountinfo_finds_a_mount_whose_path_needs_escaping(tmp_path):
    """A real mount (tmpfs: no image's filesystem) at a path with a space, a tab and a backslash."""
    mnt = tmp_path / "a b\tc\\d"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "imgkit test", str(mnt)], check=True)
    try:
        found = [e for e in blockdev.mountinfo() if e.mount_point == str(mnt)]
        assert len(found) == 1 and found[0].fstype == "tmpfs" and found[0].source == "imgkit test"
        assert blockdev.mounts()[found[0].dev] == str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert not [e for e in blockdev.mountinfo() if e.mount_point == str(mnt)]
