"""Facts about Linux block devices, from ioctls, /sys/dev/block and /proc/self/mountinfo: sizes, whole
disk vs partition, a disk's partitions, loop-device offsets and backing files, what is mounted.

One place for them, because capture (is the output on the source disk?), fs-aware capture (is a
partition mounted read-write?), restore (is the target free, how large is it?) and partition restore
(is the target a partition?) all ask. Every reader here answers "unknown" (None, False, empty) rather
than fail: sysfs may be missing in a container, and the callers then fall back to safer checks."""
from __future__ import annotations

import fcntl
import os
import re
import struct
from dataclasses import dataclass

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKROGET = 0x125E
LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64 each), then
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32), names and key: 232 bytes.
_LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")


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


def is_read_only(fd: int) -> bool:
    """BLKROGET: the kernel refuses writes to this device (losetup -r, a write-protected card)."""
    return bool(ioctl_int(fd, BLKROGET, "i"))


def block_devices() -> dict[int, str]:
    """Every block device the kernel knows (disks, partitions, loop, dm): device number -> name."""
    out: dict[int, str] = {}
    try:
        names = os.listdir("/sys/class/block")
    except OSError:
        return out
    for name in names:
        dev = dev_of(os.path.join("/sys/class/block", name))
        if dev is not None:
            out[dev] = name
    return out


def sys_size(dev: int) -> int:
    """Size in bytes from sysfs (512-byte sectors whatever the logical sector size); 0 when unknown."""
    text = _read(os.path.join(sys_dir(dev), "size"))
    return int(text) * 512 if text and text.isdigit() else 0


def partition_start(dev: int) -> int | None:
    """Byte offset of a kernel partition into its whole disk (None when dev is no partition)."""
    text = _read(os.path.join(sys_dir(dev), "start"))
    if not is_partition(dev) or not text or not text.isdigit():
        return None
    return int(text) * 512


def _huge_decode_dev(value: int) -> int:
    """The kernel's huge_encode_dev (as in loop_info64) to a Python device number."""
    return os.makedev((value >> 8) & 0xFFF, (value & 0xFF) | ((value >> 12) & 0xFFF00))


def loop_backing(dev: int) -> tuple[tuple, int, int] | None:
    """What a loop device reads and writes: (key, offset, sizelimit) with key ("blk", rdev) for a
    block device or ("file", st_dev, st_ino) for a file (device number and inode identify the file
    whatever name it is reached by, even once deleted); sizelimit 0 means "to the end". None when dev
    is not a bound loop device. The kernel's own answer (LOOP_GET_STATUS64 on the /dev node) first,
    the sysfs backing_file name as a fallback."""
    base = sys_dir(dev)
    if not os.path.isdir(os.path.join(base, "loop")):
        return None
    offset = loop_offset(dev)
    limit = _read(os.path.join(base, "loop", "sizelimit"))
    sizelimit = int(limit) if limit and limit.isdigit() else 0
    node = os.path.join("/dev", os.path.basename(base))
    try:
        if os.stat(node).st_rdev == dev:
            fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                info = _LOOP_INFO64.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size)))
            finally:
                os.close(fd)
            lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit = info[:5]
            if lo_rdevice:
                return ("blk", _huge_decode_dev(lo_rdevice)), lo_offset, lo_sizelimit
            return ("file", _huge_decode_dev(lo_device), lo_inode), lo_offset, lo_sizelimit
    except OSError:
        pass
    name = loop_backing_file(dev)
    if not name:
        return None
    try:
        st = os.stat(name)
    except OSError:
        return None
    import stat as _stat
    if _stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev), offset, sizelimit
    return ("file", st.st_dev, st.st_ino), offset, sizelimit


def holders(dev: int) -> list[str]:
    """Devices built on top of this one (LVM, RAID, dm-crypt)."""
    try:
        return os.listdir(os.path.join(sys_dir(dev), "holders"))
    except OSError:
        return []


MOUNTINFO = "/proc/self/mountinfo"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountInfoEntry:
    """One line of /proc/PID/mountinfo (proc(5)), its paths unescaped."""
    device: str                # field 3, "major:minor" (a FUSE mount's is its bdi name too)
    root: str                  # field 4: the mounted filesystem's directory shown here
    mount_point: str           # field 5
    options: tuple[str, ...]   # field 6: the per-mount options ("rw", "ro", "nosuid", ...)
    fstype: str                # after the " - " separator ("ext4", "fuse.imgkit")
    source: str                # the device or name the filesystem was mounted from

    @property
    def dev(self) -> int | None:
        """The device number, or None if field 3 does not parse."""
        try:
            major, minor = self.device.split(":")
            return os.makedev(int(major), int(minor))
        except ValueError:
            return None


def unescape_mountinfo(field: str) -> str:
    """The kernel writes space, tab, newline and backslash inside a mountinfo path as octal escapes
    (\\040, \\011, \\012, \\134): the path itself again."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo_line(line: str) -> MountInfoEntry | None:
    """A mountinfo line as an entry; None for a line that does not have the fields proc(5) lists
    (optional fields, zero or more, sit between field 6 and the " - " separator)."""
    left, sep, right = line.partition(" - ")
    a, b = left.split(), right.split()
    if not sep or len(a) < 6 or len(b) < 2:
        return None
    return MountInfoEntry(a[2], unescape_mountinfo(a[3]), unescape_mountinfo(a[4]), tuple(a[5].split(",")),
                          b[0], unescape_mountinfo(b[1]))


def mountinfo(path: str = MOUNTINFO) -> list[MountInfoEntry]:
    """The mount table, in the kernel's order (a later entry on the same mount point is on top).
    Raises OSError when it cannot be read: each caller decides what unknown means for it."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [e for e in map(parse_mountinfo_line, f) if e is not None]


def mounts(rw_only: bool = False) -> dict[int, str]:
    """Device number -> a mount point, from mountinfo; `rw_only` keeps the read-write mounts."""
    out: dict[int, str] = {}
    try:
        entries = mountinfo()
    except OSError:
        return out
    for e in entries:
        if rw_only and "rw" not in e.options:
            continue
        if e.dev is not None:
            out.setdefault(e.dev, e.mount_point)
    return out
