"""The pyfuse3 Operations over imgkit.views.vfs.ImageTree: a thin protocol adapter.

Everything about names and contents is decided in imgkit.views.vfs; this module only translates: inode
tables and handles, errno values (here and only here: CorruptChunk -> EIO, logged with its offset),
and scheduling. pyfuse3 runs every request on one trio thread, so anything that may block
(decompression, the appliance) runs in a worker thread. Caching, sequential detection and read-ahead
belong to imgkit's one caching reader (a handle per open disk-backed file), not to this adapter.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import trio

from imgkit.errors import CorruptChunk, ImgkitError, InternalError
from imgkit.views.caching_reader import ReadHandle
from imgkit.views.vfs import Attr, ImageTree, NoSuchEntry, NotADirectory

log = logging.getLogger("imgkit.operations.mount")

TIMEOUT = 3600.0  # the image never changes while mounted: the kernel may cache names and attributes
DIRECT_IO = os.environ.get("IMGKIT_MOUNT_DIRECT_IO") == "1"  # see open()


class _Handle:
    __slots__ = ("ino", "reader")

    def __init__(self, ino: int, reader: ReadHandle | None):
        self.ino = ino
        self.reader = reader  # the caching reader's position for a disk-backed file, else None


class ImageOperations(pyfuse3.Operations):
    def __init__(self, tree: ImageTree, workers: int = 2):
        super().__init__()
        self.tree = tree
        self._handles: dict[int, _Handle] = {}
        self._dir_handles: dict[int, list] = {}
        self._next_fh = 1
        # Decompression uses the cores: bounded, one thread per core (the caching reader has its own
        # read-ahead threads). Calls into the appliance get their own pool: they wait on the
        # appliance, which itself reads disk.raw through this very filesystem, so they must never
        # hold the threads disk reads need.
        self._limiter = trio.CapacityLimiter(workers)
        self._files_limiter = trio.CapacityLimiter(8)
        self._nursery: trio.Nursery | None = None
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.initialized = trio.Event()

    def init(self):
        self.initialized.set()

    def set_nursery(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # helpers ----------------------------------------------------------------------------------
    async def _run(self, ino: int, fn, *args, inline: bool = False, reading: bool = False):
        try:
            kind = None if inline else self.tree.blocking(ino, reading)
            if kind is None:
                return fn(*args)
            limiter = self._limiter if kind == "disk" else self._files_limiter
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
        except NoSuchEntry:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except NotADirectory:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except CorruptChunk as e:
            log.error("EIO: corrupt chunk at disk offset %d (%s)", e.offset, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except ImgkitError as e:
            log.error("EIO: %s", e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except pyfuse3.FUSEError:
            raise
        except Exception as e:  # a bug: this request fails, the mount stays up, the log has the trace
            log.exception("EIO: %s", InternalError.from_exception(e))
            raise pyfuse3.FUSEError(errno.EIO) from None

    @staticmethod
    def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = 1 << 20
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    # metadata ---------------------------------------------------------------------------------
    async def getattr(self, inode, ctx=None):
        return self._entry(await self._run(inode, self.tree.getattr, inode))

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return await self.getattr(parent_inode)
        if name == b"..":
            return await self.getattr(self.tree.parent(parent_inode))
        return self._entry(await self._run(parent_inode, self.tree.lookup, parent_inode, name))

    async def readlink(self, inode, ctx):
        return await self._run(inode, self.tree.readlink, inode)

    async def opendir(self, inode, ctx):
        entries = await self._run(inode, self.tree.listdir, inode)
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = entries
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self._dir_handles.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), i + 1):
                break

    async def releasedir(self, fh):
        self._dir_handles.pop(fh, None)

    async def statfs(self, ctx):
        facts = self.tree.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = facts["bsize"]
        s.f_blocks = facts["blocks"]
        s.f_bfree = s.f_bavail = 0
        s.f_files = facts["files"]
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return []

    # files ------------------------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        attr = await self.getattr(inode)
        if not stat.S_ISREG(attr.st_mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        fh = self._next_fh
        self._next_fh += 1
        reader = self.tree.open_reader(inode)
        self._handles[fh] = _Handle(inode, reader)
        info = pyfuse3.FileInfo(fh=fh)
        # The image never changes while mounted, so the kernel's page cache may keep what it read:
        # warm reads never reach this process, and mmap works. A corrupt chunk still fails only its
        # own pages: when a read-ahead batch fails, the kernel re-reads each wanted page alone.
        # IMGKIT_MOUNT_DIRECT_IO=1 sends every read here instead (measured in bench/bench_mount.py).
        if DIRECT_IO and reader is not None:
            info.direct_io = True
        else:
            info.keep_cache = True
        return info

    async def read(self, fh, off, size):
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if self._debug:
            log.debug("read ino %d off %d size %d", h.ino, off, size)
        cheap = h.reader.is_cheap(off, size) if h.reader is not None else self.tree.read_is_cheap(h.ino, off, size)
        return await self._run(h.ino, self.tree.read, h.ino, off, size, h.reader, inline=cheap, reading=True)

    def close(self) -> None:
        """Stop reading ahead before the image is closed: queued loads are dropped, running ones
        waited for, so none reads a closed file descriptor."""
        self.tree.stop_read_ahead()

    async def release(self, fh):
        self._handles.pop(fh, None)

    async def forget(self, inode_list):
        pass  # inodes live as long as the mount: the tree is small and immutable
