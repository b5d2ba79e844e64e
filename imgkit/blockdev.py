"""Facts about Linux block devices, from ioctls, /sys/dev/block and /proc/self/mountinfo: sizes, whole
disk vs partition, a disk's partitions, loop-device offsets and backing files, what is mounted.

One place for them, because capture (is the output on the source disk?), fs-aware capture (is a
partition mounted read-write?), restore (is the target free, how large is it?) and partition restore
(is the target a partition?) all ask. Every reader here answers "unknown" (None, False, empty) rather
than fail: sysfs may be missing in a container, and the callers then fall back to safer checks."""
from __future__ import annotations

import fcntl
import os
import struct

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B


def ioctl_int(fd: int, req: int, fmt: str) -> int | None:
    try:
        buf = fcntl.ioctl(fd, req, bytes(struct.calcsize(fmt)))
        return struct.unpack(fmt, buf)[0]
    except OSError:
        return None


def fd_size(fd: int) -> int:
    """Size in bytes of an open block device (raises OSError when fd is not one)."""
    return struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd_size(fd)
    finally:
        os.close(fd)


def sys_dir(dev: int) -> str:
    return os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def dev_of(sysfs_dir: str) -> int | None:
    """The device number a /sys/block directory describes (its `dev` file, "major:minor")."""
    text = _read(os.path.join(sysfs_dir, "dev"))
    try:
        major, minor = (text or "").split(":")
        return os.makedev(int(major), int(minor))
    except ValueError:
        return None


def is_partition(dev: int) -> bool:
    return os.path.exists(os.path.join(sys_dir(dev), "partition"))


def whole_disk(dev: int) -> int:
    """The whole-disk device of a partition (itself when it is a whole disk, or unknown)."""
    base = sys_dir(dev)
    if os.path.exists(os.path.join(base, "partition")):
        parent = dev_of(os.path.dirname(base))
        if parent is not None:
            return parent
    return dev


def partitions(dev: int) -> dict[int, int]:
    """Partition number -> device number, for the kernel's partitions of a whole disk."""
    base = sys_dir(dev)
    out: dict[int, int] = {}
    try:
        children = os.listdir(base)
    except OSError:
        return out
    for child in children:
        number, sub_dev = _read(os.path.join(base, child, "partition")), dev_of(os.path.join(base, child))
        if number and number.isdigit() and sub_dev is not None:
            out[int(number)] = sub_dev
    return out


def loop_offset(dev: int) -> int:
    """The byte offset of a loop device into its backing file (0 when not a loop device)."""
    text = _read(os.path.join(sys_dir(dev), "loop", "offset"))
    return int(text) if text and text.isdigit() else 0


def loop_backing_file(dev: int) -> str | None:
    return _read(os.path.join(sys_dir(dev), "loop", "backing_file")) or None


def holders(dev: int) -> list[str]:
    """Devices built on top of this one (LVM, RAID, dm-crypt)."""
    try:
        return os.listdir(os.path.join(sys_dir(dev), "holders"))
    except OSError:
        return []


def mounts(rw_only: bool = False) -> dict[int, str]:
    """Device number -> a mount point, from /proc/self/mountinfo (field 3 is major:minor, field 6 the
    mount options); `rw_only` keeps the read-write mounts."""
    out: dict[int, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 6 or (rw_only and "rw" not in fields[5].split(",")):
                    continue
                try:
                    major, minor = fields[2].split(":")
                    out.setdefault(os.makedev(int(major), int(minor)), fields[4])
                except ValueError:
                    continue
    except OSError:
        pass
    return out
