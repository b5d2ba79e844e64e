"""Durability of outputs: start the writeback of a file's dirty pages early, so that the fsync before
an atomic rename waits for the tail of the output only, not for all of it; fsync the directory after
the rename; replace a small file (a report, a cache entry) so readers see the old or the whole new one;
write a large output on a writer thread, straight to the disk (OutputWriter).

POSIX_FADV_DONTNEED starts the writeback of the dirty pages in the range (without waiting) and drops
the clean ones; an output nobody reads next then does not fill the page cache either. Measured: the
final fsync of a 210 MiB capture went from 0.138 s to 0.014 s."""
from __future__ import annotations

import errno
import functools
import mmap
import os
import queue
import tempfile
import threading
import time

WRITEBACK_STEP = 32 << 20  # writers that write themselves start the writeback every this many bytes


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to write back [offset, offset+length) of fd now (length 0: to the end). A hint:
    errors are ignored."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def fsync_parent_dir(path: str) -> None:
    """fsync the directory holding `path`: after a rename, the new name is durable only then."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


PREALLOCATE_SPARE = 256 << 20  # free space preallocate() leaves to everyone else
DIRECT_ALIGN = 4096  # O_DIRECT wants buffer, offset and length aligned to the logical block: a page is


def _stage_buffer(size: int) -> mmap.mmap:
    """One page-aligned staging buffer of OutputWriter (a function: tests make it fail)."""
    return mmap.mmap(-1, size)


class OutputWriter:
    """A large output file (a converted disk) written on writer threads, in large pieces, through
    O_DIRECT where the filesystem takes it. write() copies the bytes into one of a few page-aligned
    staging buffers and returns: the producer (decoding on the other core) waits neither for the
    page cache nor for the disk, and when the file is complete nothing is left to write back, so the
    fsync before the rename commits the file's metadata only.

    Why (imgk -> qcow2 of bench disk F, 995 MiB written): through the page cache the producing
    thread spent 0.42-0.63 s in pwrite plus 0.23-0.26 s blocked in the writeback hints, about half
    of the conversion, while the decoders waited. Writing 1 GiB and fsyncing it here: direct, one
    8 MiB write at a time 0.59 s; two at a time (two writer threads) 0.46 s, 4 MiB pieces four at a
    time the same; page cache with a writeback hint every 8 MiB 0.55 s but 0.22 s of CPU against
    0.02-0.07 s. So two writers and 4 MiB pieces (three buffers: 12 MiB). Consecutive writes are
    joined into one piece; an unaligned head or tail of a piece goes through the page cache (a
    second descriptor; the ranges never overlap and a direct write only covers whole pages of its
    own piece, so the two stay coherent). Where O_DIRECT is refused (at open, or at the first
    write: some FUSE filesystems), everything goes through the page cache on the writer threads,
    with the writeback started every WRITEBACK_STEP bytes.

    `durable` False (`convert --no-sync`): the output is left to the page cache, as `qemu-img
    convert` leaves its own: no O_DIRECT, no writeback hints, one writer thread, 2 MiB pieces; the
    kernel writes it back when it likes, and nobody fsyncs it.

    Use as a context manager or call close(); an error of a writer thread is raised by the next
    write(), flush() or close(). One producer thread."""

    def __init__(self, path: str, *, stage: int = 4 << 20, depth: int = 3, writers: int = 2, direct: bool = True,
                 durable: bool = True):
        self.path = path
        self.durable = durable
        direct = direct and durable
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._dfd: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._dfd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError:
                self._dfd = None
        if not durable:
            # Into the page cache, 2 MiB writes (what qemu-img issues) cost half the CPU of 4 MiB
            # ones here: convert --no-sync imgk -> qcow2 of bench disk F, 7 alternating runs, median
            # 0.69 s wall / 0.74 s CPU against 1.51 s / 1.46 s (raw: 0.79 s against 1.24 s).
            stage = min(stage, 2 << 20)
        self.stage = max(DIRECT_ALIGN, stage - stage % DIRECT_ALIGN)
        self._free: queue.Queue = queue.Queue()
        try:
            for _ in range(max(2, depth)):
                self._free.put(_stage_buffer(self.stage))
        except BaseException:  # out of memory (or address space): no object to close() exists yet
            while not self._free.empty():
                self._free.get_nowait().close()
            for fd in (self.fd, self._dfd):
                if fd is not None:
                    os.close(fd)
            raise
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._reported = False
        self._buf: mmap.mmap | None = None
        self._base = self._lo = self._hi = 0
        self._since_writeback = 0
        self.direct_bytes = self.buffered_bytes = 0
        self._count_lock = threading.Lock()
        self._use_direct = self._dfd is not None
        if not durable:
            # Buffered writes to one file serialize on its inode lock: a second writer thread only
            # spins on it (perf, convert --no-sync to qcow2: 15% of the samples in rwsem_spin_on_owner).
            writers = 1
        self._threads = [threading.Thread(target=self._run, name="imgkit-writer", daemon=True)
                         for _ in range(max(1, writers))]
        for t in self._threads:
            t.start()

    @property
    def direct(self) -> bool:
        """Whether the aligned bytes go to the disk directly (False: O_DIRECT refused)."""
        return self._use_direct

    def write(self, offset: int, data) -> None:
        """Write `data` (any bytes-like) at `offset`; the bytes are copied before this returns."""
        self._raise()
        with memoryview(data) as view:
            view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            pos, n = 0, len(view)
            while pos < n:
                if self._buf is None or offset != self._base + self._hi or self._hi == self.stage:
                    self._submit()
                    # Buffer position p holds file offset base + p, base aligned: the aligned part of
                    # the range is then aligned in the buffer as well (the direct write needs both).
                    self._lo = self._hi = offset % DIRECT_ALIGN
                    self._base = offset - self._lo
                    self._buf = self._free.get()  # waits while every buffer is being written
                    self._raise()
                take = min(n - pos, self.stage - self._hi)
                self._buf[self._hi:self._hi + take] = view[pos:pos + take]
                self._hi += take
                pos += take
                offset += take

    def flush(self) -> None:
        """Wait until everything written so far is in the file (on the disk, when direct)."""
        self._submit()
        self._jobs.join()
        self._raise()

    def preallocate(self, offset: int, length: int) -> None:
        """Allocate [offset, offset+length) of the file now (fallocate(2); the file grows to cover
        it), for bytes the caller is about to write. The direct writes then fill allocated blocks
        inside the file instead of extending it, which ext4 does under its inode lock one write at
        a time: 1 GiB written by two threads in 4 MiB pieces, with the fsync, 0.56-0.69 s against
        0.63-0.81 s (medians of 5, loaded machine). A hint: where the filesystem cannot, or has
        not that much space free with room to spare (a failed fallocate may keep what it
        allocated, which the writes might have needed), nothing happens, and the writes report a
        full disk as before. A range that is then not written reads as zeros but stays allocated:
        discard() it."""
        if length <= 0:
            return
        try:
            st = os.fstatvfs(self.fd)
        except OSError:
            return
        if st.f_bavail * st.f_frsize < length + PREALLOCATE_SPARE:
            return
        self._fallocate(0, offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Make a preallocated range that will not be written a hole again (punch it), so that a
        sparse output stays as sparse as without preallocate(). Never written by this writer."""
        self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if length <= 0:
            return
        fn = _fallocate()
        if fn is not None:
            fn(self.fd, mode, offset, length)  # errors ignored: see preallocate

    def truncate(self, size: int) -> None:
        self.flush()
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        """Write what is staged, stop the writer threads, close the file; raise a write error the
        producer has not been given yet."""
        if not self._threads:
            return
        try:
            self._submit()
        finally:
            for _ in self._threads:
                self._jobs.put(None)
            for t in self._threads:
                t.join()
            self._threads = []
            for fd in (self.fd, self._dfd):
                if fd is not None:
                    os.close(fd)
            self._dfd = None
            while not self._free.empty():
                self._free.get_nowait().close()
        if not self._reported:  # an error the producer has not seen yet
            self._raise()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:  # an error already propagates: stop the writers, write nothing more
            self._error, self._reported = self._error or exc[1], True
            self.close()

    # -- the writer thread --------------------------------------------------------------------------
    def _raise(self) -> None:
        if self._error is not None:
            self._reported = True
            raise self._error

    def _submit(self) -> None:
        if self._buf is not None:
            if self._hi > self._lo:
                self._jobs.put((self._buf, self._base, self._lo, self._hi))
            else:
                self._free.put(self._buf)
            self._buf = None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                buf = job[0]
                try:
                    if self._error is None:
                        with memoryview(buf) as view:
                            self._write_piece(view, *job[1:])
                except BaseException as e:  # noqa: BLE001 - handed to the producer
                    self._error = e
                finally:
                    self._free.put(buf)
            finally:
                self._jobs.task_done()

    def _write_piece(self, view: memoryview, base: int, lo: int, hi: int) -> None:
        """Write buffer positions [lo, hi) at file offset base + lo: the aligned middle directly,
        an unaligned head or tail (or everything, without O_DIRECT) through the page cache."""
        a = min(hi, -(-lo // DIRECT_ALIGN) * DIRECT_ALIGN)
        b = max(a, hi - hi % DIRECT_ALIGN)
        if not self._use_direct or a == b:
            self._buffered(view, base, lo, hi)
            return
        if lo < a:
            self._buffered(view, base, lo, a)
        pos = a
        try:
            while pos < b:
                w = os.pwrite(self._dfd, view[pos:b], base + pos)
                if w <= 0:
                    raise OSError(errno.EIO, "short write")
                pos += w
                if pos % DIRECT_ALIGN:
                    break  # a short write off the alignment: the rest through the page cache
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._use_direct = False  # O_DIRECT refused after all: the page cache from now on
        with self._count_lock:
            self.direct_bytes += pos - a
        self._buffered(view, base, pos, hi)

    def _buffered(self, view: memoryview, base: int, lo: int, hi: int) -> None:
        pos = lo
        while pos < hi:
            w = os.pwrite(self.fd, view[pos:hi], base + pos)
            if w <= 0:
                raise OSError(errno.EIO, "short write")
            pos += w
        with self._count_lock:
            self.buffered_bytes += hi - lo
            self._since_writeback += hi - lo
            nudge = self.durable and self._since_writeback >= WRITEBACK_STEP
            if nudge:
                self._since_writeback = 0
        if nudge:  # the final fsync then waits for the tail only
            start_writeback(self.fd)


class WritebackNudger:
    """For a file another process writes (qemu-img's output): poll() at will, and at most every
    `interval` seconds the file's writeback is started."""

    def __init__(self, path: str, interval: float = 0.25):
        self.path, self.interval = path, interval
        self._fd: int | None = None
        self._last = time.monotonic()

    def poll(self) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                return  # not created yet
        start_writeback(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def replace_small_file(path: str, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` through a fresh temp sibling (O_EXCL, so no name another process or
    user planted is followed) and a rename: a reader never sees half a file, and a failure leaves
    no temp file behind."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@functools.cache
def _libc():
    """The C library's functions (the running process's own symbols: find_library("c") would start
    `ldconfig -p`, 33 ms, on every publish)."""
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h


@functools.cache
def _fallocate():
    import ctypes
    fn = getattr(_libc(), "fallocate", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


def _renameat2():
    import ctypes
    fn = getattr(_libc(), "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def publish(tmp: str, final: str, *, replace: bool = False) -> None:
    """Give a complete temporary file its final name, atomically. Without `replace`, a name that
    appeared meanwhile (another capture to the same destination, a file the user made) is never
    replaced: renameat2(RENAME_NOREPLACE), or where a filesystem lacks it, link() then unlink() (link
    fails with EEXIST just the same). With `replace` (the user said --force or confirmed), the name
    is replaced only while it is still a regular file. Errors name `final`."""
    if replace:
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            st = None
        import stat as _stat
        if st is not None and not _stat.S_ISREG(st.st_mode):
            raise FileExistsError(17, "exists and is not a regular file", final)
        os.rename(tmp, final)
        return
    import ctypes
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(final), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == 17:  # EEXIST
            raise FileExistsError(err, "appeared while imgkit was writing it; not replaced", final)
        if err not in (22, 38, 95):  # EINVAL/ENOSYS/EOPNOTSUPP: this filesystem lacks the flag
            raise OSError(err, os.strerror(err), final)
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise FileExistsError(17, "appeared while imgkit was writing it; not replaced", final) from None
    os.unlink(tmp)


def publish_file(tmp: str, final: str, *, replace: bool = False, sync: bool = True) -> None:
    """A complete output file written under `tmp` becomes `final` durably: its data is synced, it is
    renamed by publish() (so without `replace` a name that appeared meanwhile is kept, and
    FileExistsError names it), and the directory entry is synced. `sync` False (`convert
    --no-sync`): the same rename, without either fsync (after a power failure the file under its
    final name may be incomplete)."""
    if sync:
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    publish(tmp, final, replace=replace)
    if sync:
        fsync_parent_dir(final)
