"""Where imgkit writes, and whether it may: the one home for opening a restore target with its safety
checks, and for the rules every image path (capture, convert, split, join, passwd) obeys.

A restore target is refused before any write when anything else would see the write. Linux reaches
the same bytes by many names: a partition is a range of its disk, a loop device a range of its
backing file or device (losetup -o/--sizelimit), loops stack on loops, and two loop devices over one
file are aliases. So the check is by *storage*, not by name: the bytes the restore writes are
followed down to what finally stores them (a file, by device number and inode; a whole disk), and
every block device of the system whose bytes overlap them, at any depth, in either direction, is a
"user" of the target. A user that is mounted, used as swap or held (dm, RAID) refuses the target, and
so does one holding the image being read. Linux-specific: reads /sys/class/block, /proc/self/mountinfo,
/proc/swaps and asks loop devices themselves (blockdev.py)."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .blockdev import (block_devices, fd_size, holders, is_read_only, loop_backing, mounts, partition_start,
                       sys_size, whole_disk)
from ..errors import InputError, RefusedTarget

MAX_STACK_DEPTH = 16  # loops over loops: deeper than any real stack, bounds a cycle


# -- image paths -------------------------------------------------------------------------------------
def under_dev(path: str) -> bool:
    """Is `path` (or what it resolves to) a name under /dev? Nothing imgkit writes as a file belongs
    there: /dev is a RAM-backed tmpfs of device nodes, and a file there is a typo, not a backup."""
    for p in {os.path.abspath(path), os.path.realpath(path)}:
        if p == "/dev" or p.startswith("/dev/"):
            return True
    return False


def refuse_device_image_path(path: str, *, other: str | None = None, command: str = "capture") -> None:
    """An image path (an output of capture, convert, split, join; the image passwd rewrites) is a
    regular file, never a device node or a name under /dev. `other` is the command's other path:
    when it is an image and `path` a device, the arguments were most likely swapped."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    is_node = st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode)
    if not is_node and not under_dev(path):
        return
    hint = "image files go on a filesystem: give a path such as /mnt/backup/disk.imgk"
    if other and os.path.isfile(other) and st is not None and stat.S_ISBLK(st.st_mode):
        hint = f"did you mean `imgkit restore {other} {path}`? (restore writes an image to a device)"
    what = "a device node" if is_node else "under /dev"
    raise RefusedTarget(f"{path} is {what}: imgkit writes {command} output only to regular files",
                        hint=hint)


def check_replaceable(path: str, force: bool, sources: list[str] = ()) -> None:
    """An output name that exists may be replaced only with --force, only when it is a regular file,
    and never when it is one of the files being read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    for s in sources:
        try:
            if os.path.samefile(s, path):
                raise RefusedTarget(f"{path} is the source itself (being read): refusing to overwrite it",
                                    hint="choose another output name")
        except OSError:
            pass
    if not stat.S_ISREG(st.st_mode):
        raise RefusedTarget(f"{path} exists and is not a regular file: imgkit replaces image files only")
    if not force:
        raise InputError(f"{path} already exists", hint="use --force to replace it")


# -- the storage a write reaches ---------------------------------------------------------------------
Extent = tuple[tuple, int, int]  # (storage key, start, end): ("blk", rdev) or ("file", st_dev, st_ino)


def extents_below(dev: int, start: int, length: int, depth: int = 0) -> list[Extent]:
    """Every storage range that bytes [start, start+length) of block device `dev` are: the device
    itself, and down through partitions (a range of the disk) and loop devices (a range of their
    backing file or device), to the bottom."""
    out: list[Extent] = [(("blk", dev), start, start + length)]
    if depth >= MAX_STACK_DEPTH or length <= 0:
        return out
    pstart = partition_start(dev)
    if pstart is not None:
        out += extents_below(whole_disk(dev), pstart + start, length, depth + 1)
    backing = loop_backing(dev)
    if backing is not None:
        key, offset, sizelimit = backing
        if sizelimit:
            length = max(0, min(length, sizelimit - start))
        if key[0] == "blk":
            out += extents_below(key[1], offset + start, length, depth + 1)
        else:
            out.append((key, offset + start, offset + start + length))
    return out


def _overlap(a: list[Extent], b: list[Extent]) -> bool:
    return any(ka == kb and sa < eb and sb < ea for ka, sa, ea in a for kb, sb, eb in b)


@dataclass
class User:
    """A block device that sees (some of) the bytes written to the target."""
    dev: int
    name: str
    extents: list[Extent]

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


def users_of(written: list[Extent]) -> list[User]:
    """Every block device whose bytes overlap the written extents (the target itself included)."""
    found = []
    for dev, name in sorted(block_devices().items()):
        size = sys_size(dev)
        if size <= 0:
            continue  # an unbound loop device, an empty card reader
        ext = extents_below(dev, 0, size)
        if _overlap(ext, written):
            found.append(User(dev, name, ext))
    return found


def _relation(user: User, target_dev: int | None, written: list[Extent]) -> str:
    """How `user` reaches the target's bytes, for the message."""
    if target_dev is not None and user.dev == target_dev:
        return ""
    if target_dev is not None and any(k == ("blk", target_dev) for k, _, _ in user.extents):
        return f"{user.path} (built on it: a loop device or partition over it)"
    if any(k == ("blk", user.dev) for k, _, _ in written):
        return f"{user.path} (which it lies on)"
    return f"{user.path} (an alias: it reaches the same backing storage)"


def _swaps() -> list[Extent]:
    out = []
    try:
        with open("/proc/swaps") as f:
            names = [line.split()[0] for line in list(f)[1:] if line.split()]
    except OSError:
        return out
    for name in names:
        try:
            st = os.stat(name.replace("\\040", " "))
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            out.append((("blk", st.st_rdev), 0, 1 << 62))
        else:
            out.append((("file", st.st_dev, st.st_ino), 0, 1 << 62))
    return out


def check_nothing_sees(target: str, written: list[Extent], target_dev: int | None,
                       image_paths: list[str] = ()) -> None:
    """Refuse the target when a write to the `written` extents would reach the image being read, a
    mounted filesystem, swap, or a device something holds, through any alias."""
    users = users_of(written)
    user_devs = {u.dev for u in users}
    for p in image_paths:
        st = os.stat(p)
        if stat.S_ISBLK(st.st_mode):  # restoring from a device: the device and all it lies on
            source = extents_below(st.st_rdev, 0, max(sys_size(st.st_rdev), 1))
            if _overlap(written, source) or any(_overlap(u.extents, source) for u in users):
                raise RefusedTarget(f"refusing {target}: it is the device being read ({p}) or shares "
                                    "storage with it", hint="restore to another disk")
            continue
        image = [(("file", st.st_dev, st.st_ino), 0, max(st.st_size, 1))]
        if _overlap(written, image) or any(_overlap(u.extents, image) for u in users):
            raise RefusedTarget(f"refusing {target}: it is backed by the image being read ({p})",
                                hint="restore to another disk or file")
        if st.st_dev in user_devs:
            via = _relation(next(u for u in users if u.dev == st.st_dev), target_dev, written)
            raise RefusedTarget(f"refusing {target}: it holds the image being read ({p})"
                                + (f" through {via}" if via else ""), hint="restore to another disk")
    mounted = mounts()
    for u in users:
        if u.dev in mounted:
            via = _relation(u, target_dev, written)
            who = f"{via} is mounted" if via else "it is mounted"
            raise RefusedTarget(f"refusing {target}: {who} on {mounted[u.dev]}", hint="unmount it first")
    swaps = _swaps()
    if _overlap(written, swaps) or any(_overlap(u.extents, swaps) for u in users):
        raise RefusedTarget(f"refusing {target}: it is used as swap (or holds swap)", hint="swapoff it first")
    for u in users:
        held = holders(u.dev)
        if held:
            via = _relation(u, target_dev, written)
            raise RefusedTarget(f"refusing {target}: {via or 'it'} is in use by {', '.join(held)}",
                                hint="stop what holds it first (LVM, RAID, dm-crypt)")
    if target_dev is None:  # a file: a loop device over it would not see a write through a rename
        for u in users:
            raise RefusedTarget(f"refusing {target}: it is attached as loop device {u.path}",
                                hint=f"detach it first (losetup -d {u.path}) or restore to {u.path}")


def mounted_rw_over(path: str) -> list[tuple[str, str]]:
    """(device, mount point) of every read-write mount that reads the bytes of `path` (a block device
    or a file, e.g. a VM disk attached as a loop device), through any alias: capturing it then gives
    an image of a filesystem that changes while it is read."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    if stat.S_ISBLK(st.st_mode):
        extents = extents_below(st.st_rdev, 0, max(sys_size(st.st_rdev), 1))
    elif stat.S_ISREG(st.st_mode):
        extents = [(("file", st.st_dev, st.st_ino), 0, max(st.st_size, 1))]
    else:
        return []
    rw = mounts(rw_only=True)
    return [(u.path, rw[u.dev]) for u in users_of(extents) if u.dev in rw]


def consistency_warning(path: str) -> str | None:
    found = mounted_rw_over(path)
    if not found:
        return None
    where = ", ".join(f"{dev} on {mp}" for dev, mp in found)
    return (f"{path} is mounted read-write ({where}): the image may be inconsistent, since the filesystem "
            "changes while it is read. For a consistent image unmount it or remount it read-only "
            "(mount -o remount,ro MOUNTPOINT), freeze it during the capture (fsfreeze -f MOUNTPOINT, "
            "then fsfreeze -u), or capture a snapshot (LVM, btrfs, a VM snapshot)")


# -- restore targets ---------------------------------------------------------------------------------
@dataclass
class RestoreTarget:
    """A restore target that passed every check. For a block device, `fd` is open (O_EXCL: nothing
    else may claim it until it is closed), O_WRONLY for a real run, O_RDONLY for a dry run."""
    path: str
    kind: str  # "block device", "file" (exists), "new file"
    size: int | None  # bytes now (None: a new file)
    st: os.stat_result | None
    fd: int = -1

    @property
    def is_block(self) -> bool:
        return self.kind == "block device"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_restore_target(path: str, image_paths: list[str] = (), *, start: int = 0, length: int | None = None,
                        write: bool = True) -> RestoreTarget:
    """Check `path` as a restore target for bytes [start, start+length) (default: all of it) and, for
    a block device, open it exclusively. `write=False` (a dry run) runs every check and opens the
    device read-only, still exclusively. Refusals raise before anything is written."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if under_dev(path):
            raise InputError(f"{path}: no such device", hint="check the name (lsblk); imgkit never creates "
                             "files under /dev") from None
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise InputError(f"{directory}: no such directory") from None
        return RestoreTarget(path, "new file", None, None)
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    if stat.S_ISBLK(st.st_mode):
        return _open_block(path, st, image_paths, start, length, write)
    if not stat.S_ISREG(st.st_mode) or under_dev(path):
        raise InputError(f"{path}: not a block device or regular file")
    for p in image_paths:
        if os.path.samefile(p, path):
            raise RefusedTarget(f"refusing {path}: it is the image being read")
    span = st.st_size - start if length is None else length
    check_nothing_sees(path, [(("file", st.st_dev, st.st_ino), start, start + max(span, 1))], None, image_paths)
    return RestoreTarget(path, "file", st.st_size, st)


def _open_block(path: str, st: os.stat_result, image_paths, start: int, length: int | None,
                write: bool) -> RestoreTarget:
    rdev = st.st_rdev
    try:
        probe = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise RefusedTarget(f"{path}: cannot open ({e.strerror})") from None
    try:
        size = fd_size(probe)
        if is_read_only(probe):  # before any prompt or write (a dry run too), naming the device
            raise RefusedTarget(f"refusing {path}: the device is read-only",
                                hint="make it writable first (losetup without -r, blockdev --setrw)")
    finally:
        os.close(probe)
    span = size - start if length is None else length
    check_nothing_sees(path, extents_below(rdev, start, span), rdev, image_paths)
    try:
        fd = os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        raise RefusedTarget(f"refusing {path}: it is in use (cannot open it exclusively: {e.strerror})",
                            hint="unmount or stop what uses it first") from None
    return RestoreTarget(path, "block device", size, st, fd)


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
