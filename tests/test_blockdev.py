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
