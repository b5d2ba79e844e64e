"""Raw sources: a block device or a regular file (raw disk image, ISO), as a Stream with holes."""
from __future__ import annotations

import errno
import os
import stat
from typing import Iterator

from ..platform.blockdev import BLKGETSIZE64, BLKPBSZGET, BLKSSZGET, ioctl_int
from ..errors import InputError
from ..stream import DATA, ZERO, Run, Stream

def _sys_attr(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def open_for_reading(path: str, missing_is_error: bool = True) -> int:
    """A read-only descriptor of a disk, image file or image volume, or one line saying why not.
    missing_is_error=False lets FileNotFoundError through, for callers that look for a file (an
    image's next volume, a parent image) and name what is missing themselves."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        if not missing_is_error:
            raise
        raise InputError(f"{path}: no such file or device") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied", hint="run as root to read block devices") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)  # a directory opens read-only without error; a FIFO or tty is no disk either
        what = "is a directory, not a disk or image file" if stat.S_ISDIR(mode) else "not a block device or regular file"
        raise InputError(f"{path}: {what}")
    os.set_blocking(fd, True)
    return fd


class RawSource(Stream):
    """A block device or regular file read with pread; holes (SEEK_HOLE) are reported as zero runs."""

    thread_safe = True  # pread only

    def __init__(self, path: str):
        self.path = path
        self.fd = open_for_reading(path)
        st = os.fstat(self.fd)
        self.st = st
        self.is_block = stat.S_ISBLK(st.st_mode)
        if self.is_block:
            self.size = ioctl_int(self.fd, BLKGETSIZE64, "Q") or os.lseek(self.fd, 0, os.SEEK_END)
            self.logical_sector_size = ioctl_int(self.fd, BLKSSZGET, "i") or 512
            self.physical_sector_size = ioctl_int(self.fd, BLKPBSZGET, "I") or self.logical_sector_size
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
            self.logical_sector_size = self.physical_sector_size = 512
        else:
            os.close(self.fd)
            raise InputError(f"{path}: not a block device or regular file")

    def raw_path(self) -> str | None:
        return self.path

    def describe(self) -> dict:
        info = {"path": os.path.abspath(self.path), "kind": "block" if self.is_block else "file",
                "size": self.size, "logical_sector_size": self.logical_sector_size,
                "physical_sector_size": self.physical_sector_size, "model": None, "serial": None}
        if self.is_block:
            sysdev = f"/sys/dev/block/{os.major(self.st.st_rdev)}:{os.minor(self.st.st_rdev)}"
            info["model"] = _sys_attr(f"{sysdev}/device/model")
            info["serial"] = _sys_attr(f"{sysdev}/device/serial") or _sys_attr(f"{sysdev}/serial")
            backing = _sys_attr(f"{sysdev}/loop/backing_file")
            if backing:
                info["loop_backing_file"] = backing
        return info

    def paths(self) -> list[str]:
        return [self.path]

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return b""
        length = min(length, self.size - offset)
        out = os.pread(self.fd, length, offset)
        while len(out) < length:  # short reads happen on devices; a zero read means the end moved
            more = os.pread(self.fd, length - len(out), offset + len(out))
            if not more:
                raise InputError(f"{self.path}: short read at offset {offset + len(out)} (device shrank?)")
            out += more
        return out

    def will_need(self, offset: int, length: int) -> None:
        """Start reading [offset, offset+length) into the page cache without waiting
        (POSIX_FADV_WILLNEED), so a later read() of it does not block on the disk."""
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint

    def runs(self) -> Iterator[Run]:
        if self.is_block:
            yield from super().runs()
            return
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    yield Run(ZERO, pos, self.size - pos)
                    return
                yield Run(DATA, pos, self.size - pos)  # SEEK_DATA unsupported: treat as data
                return
            if data > pos:
                yield Run(ZERO, pos, min(data, self.size) - pos)
            if data >= self.size:
                return
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), self.size)
            yield Run(DATA, data, hole - data)
            pos = hole

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
