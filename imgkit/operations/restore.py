"""Restore: an image (any Stream, usually an ImageReader) onto a block device or into a file.

Files: written under a temporary name as a sparse file, renamed when complete. Devices: opened with
O_EXCL after the mount/holder checks; zero chunks are zeroed (BLKZEROOUT, or BLKDISCARD on request),
free chunks are left alone. Every chunk is verified as it is read (ImageReader does that).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable

from ..views.caching_reader import CachingReader
from ..errors import InputError, Interrupted, OperationFailed, RefusedTarget
from ..platform.parallel import ordered_map
from ..progress import NullProgress, Progress
from ..stream import DATA, ZERO, Stream
from ..platform.targets import open_restore_target
from ..units import format_size
from ..platform.writeback import WRITEBACK_STEP, fsync_parent_dir, publish, start_writeback

BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
WRITE_PIECE = 4 << 20


@dataclass
class RestoreResult:
    target: str
    bytes_written: int
    seconds: float
    verified: bool
    grow: dict | None = None  # what grow.fit_to_disk did (GPT moved, partition/filesystem grown)
    shrink: dict | None = None  # restore --shrink: the plan, the resizers' notes and minimums
    damaged: list | None = None  # restore --keep-going: damage.DamagedRange of each range written as zeros
    plan: str = ""  # what the restore does (and, for a dry run, would do)
    final_size: int | None = None  # the target's size afterwards


@contextlib.contextmanager
def partially_written(path: str, name: str, what: str):
    """Ctrl-C or a failed write while writing a device in place: one line saying so. The device cannot
    be published under a temporary name as a file can, so the user must know it is partly written.
    `name` is what the interrupt line calls it, `what` what the write-error line calls it."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"restore interrupted: {name} is partially written") from None
    except OSError as e:
        raise OperationFailed(f"{path}: write failed ({e.strerror}): {what} is partially written") from None


def _zero_range(fd: int, offset: int, length: int, discard: bool) -> None:
    """Make [offset, offset+length) of a block device read as zeros, fast where the device can."""
    req = BLKDISCARD if discard else BLKZEROOUT
    try:
        fcntl.ioctl(fd, req, struct.pack("QQ", offset, length))
        if not discard:
            return
    except OSError:
        pass
    zeros = bytes(min(length, WRITE_PIECE))
    end = offset + length
    while offset < end:  # discard does not promise zeros on every device: write them
        n = os.pwrite(fd, zeros[:min(len(zeros), end - offset)], offset)
        offset += n


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


SPARSE_GRAIN = 64 << 10
_ZERO_GRAIN = bytes(SPARSE_GRAIN)


def _pwrite_sparse(fd: int, data: bytes, offset: int) -> None:
    """Write data into a file that is all holes, leaving zero 64 KiB pieces as holes (as
    `zstd --sparse` does): blanked free blocks of a filesystem-aware image stay unallocated."""
    view = memoryview(data)
    start = None
    for pos in range(0, len(data), SPARSE_GRAIN):
        piece = view[pos:pos + SPARSE_GRAIN]
        if piece == _ZERO_GRAIN[:len(piece)]:
            if start is not None:
                _pwrite_all(fd, view[start:pos], offset + start)
                start = None
        elif start is None:
            start = pos
    if start is not None:
        _pwrite_all(fd, view[start:], offset + start)


def plan_text(image: Stream, target: str, target_size: int | None, is_block: bool) -> str:
    if is_block:
        return (f"This will overwrite block device {target} ({format_size(target_size)}) with an image of "
                f"{format_size(image.size)}. Everything on it will be lost.")
    if target_size is None:
        return f"This will create file {target} ({format_size(image.size)})."
    if target_size > image.size:
        fate = (f"it keeps its size ({format_size(target_size)}); the image fills its first "
                f"{format_size(image.size)} and the rest reads as zeros")
    elif target_size < image.size:
        fate = f"it grows from {format_size(target_size)} to {format_size(image.size)}"
    else:
        fate = f"it keeps its size ({format_size(target_size)})"
    return (f"This will overwrite file {target} with an image of {format_size(image.size)}: {fate}. "
            "Everything in it will be lost.")


def restore_stream(image: Stream, target: str, *, image_paths: list[str] = (),
                   confirm: Callable[[str], bool] | None = None, verify: bool = False,
                   discard: bool = False, progress: Progress | None = None,
                   workers: int | None = None, layout=None,
                   too_small: Callable[[int], str] | None = None, dry_run: bool = False) -> RestoreResult:
    """Restore `image` to `target`. `confirm(message)` is asked before anything existing is
    overwritten; None means the caller already agreed (--yes). `layout` (shrink_restore.ShrinkLayout)
    writes a shrunk layout of `size` bytes instead of the image as it is; `too_small(target_size)`
    words the refusal of a target smaller than the image. Every target check is targets.py's
    (open_restore_target); `dry_run` runs them all, then stops with the plan in `result.plan`."""
    need = layout.size if layout is not None else image.size

    def write(fd, **kw):
        if layout is not None:
            return layout.write(fd, progress=progress, workers=workers, **kw)
        return write_stream(image, fd, progress=progress, workers=workers, **kw)
    progress = progress or NullProgress()
    started = time.monotonic()
    dest = open_restore_target(target, list(image_paths), write=not dry_run)
    with dest:
        if dest.is_block:
            if layout is not None and dest.size != layout.size:
                raise RefusedTarget(f"{target} is {format_size(dest.size)}, the shrink plan was made for "
                                    f"{format_size(layout.size)}: it changed")
            if dest.size < need:
                raise RefusedTarget(too_small(dest.size) if too_small else
                                    f"refusing {target}: it is {format_size(dest.size)} ({dest.size} bytes), "
                                    f"smaller than the image's {format_size(image.size)} ({image.size} bytes)")
        plan = plan_text(image, target, dest.size, dest.is_block)
        final_size = need if layout is not None else max(dest.size or 0, need)
        if dry_run:
            return RestoreResult(target, 0, 0.0, False, plan=plan, final_size=final_size)
        if dest.is_block:
            if confirm is not None and not confirm(plan):
                raise InputError("restore cancelled: nothing was written")
            with partially_written(target, target, "the device"):
                written = write(dest.fd, zero_old=True, sparse=False, discard=discard)
                os.fsync(dest.fd)
            dest.close()
            if verify and layout is None:
                _verify_target(image, target, progress)
            progress.finish()
            return RestoreResult(target, written, time.monotonic() - started, verify, plan=plan,
                                 final_size=dest.size)

    # A file target: write a temporary sibling, rename over the target when complete. An existing
    # larger file keeps its size (a VM disk file restored into): the image fills its start, the rest
    # is holes, and grow.py can then grow into it as on a larger device.
    if dest.st is not None and confirm is not None and not confirm(plan):
        raise InputError("restore cancelled: nothing was written")
    directory = os.path.dirname(os.path.abspath(target))
    tmp = os.path.join(directory, f".{os.path.basename(target)}.imgkit-partial-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise InputError(f"{target}: cannot write ({e.strerror})") from None
    try:
        os.ftruncate(fd, final_size)  # holes everywhere; only data is written
        written = write(fd, zero_old=False, sparse=True)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if verify and layout is None:
            _verify_target(image, tmp, progress)
        # Replace only what the user confirmed; a name that appeared meanwhile is never replaced.
        publish(tmp, target, replace=dest.st is not None)
        fsync_parent_dir(target)
    except KeyboardInterrupt:
        _cleanup(fd, tmp)
        raise Interrupted(f"restore interrupted: {target} was not written") from None
    except OSError as e:
        _cleanup(fd, tmp)
        raise InputError(f"{e.filename or target}: write failed ({e.strerror})") from None
    except BaseException:
        _cleanup(fd, tmp)
        raise
    progress.finish()
    return RestoreResult(target, written, time.monotonic() - started, verify, plan=plan, final_size=final_size)


def _cleanup(fd: int, tmp: str) -> None:
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _reader(image: Stream) -> CachingReader:
    """The one read engine over the image, for a front-to-back pass: no cache to keep (each chunk is
    read once, whole) and no read-ahead of its own (map_pieces keeps the workers ahead)."""
    return CachingReader(image, cache_bytes=0)


def _pieces(reader: CachingReader, kinds: set[str]):
    """(offset, length) pieces covering the runs of the given kinds, cut where the image's chunks are
    cut (a partition starts mid-chunk: its unit_phase says where), so no piece makes two chunks
    decode; WRITE_PIECE for streams without chunks."""
    return reader.cut_pieces(reader.runs(), kinds, reader.stream.unit_size or WRITE_PIECE)


def write_stream(image: Stream, fd: int, *, base: int = 0, zero_old: bool, sparse: bool,
                 discard: bool = False, progress: Progress,
                 workers: int | None = None) -> int:
    """Write `image` into fd at byte `base`; the data bytes written. `zero_old`: the target's old
    bytes must not show through zero runs (a device, or a partition inside an existing disk file);
    `sparse`: the target is all holes, and zero 64 KiB pieces of data stay holes. FREE runs (unused
    by the filesystem) are left as they are."""
    reader = _reader(image)
    workers = workers or image.read_workers  # an image in S3: several GETs in flight
    image.read_sequentially()
    written = 0
    progress.total = image.size
    for run in image.runs():
        if run.kind == DATA:
            continue
        if run.kind == ZERO and zero_old:
            _zero_range(fd, base + run.offset, run.length, discard)
        progress.advance(run.length)  # FREE runs and file holes cost nothing
    write = _pwrite_sparse if sparse else _pwrite_all
    since_writeback = 0
    for (offset, length), data in reader.map_pieces(_pieces(reader, {DATA}), workers):
        write(fd, data, base + offset)
        written += length
        since_writeback += length
        if since_writeback >= WRITEBACK_STEP:  # the final fsync then waits for the tail only
            start_writeback(fd)
            since_writeback = 0
        progress.advance(length)
    return written


def _verify_target(image: Stream, target: str, progress: Progress) -> None:
    """Read the target back and compare it with the image, chunk by chunk (the image's own read has
    checked each chunk's hash already: a byte comparison is all that is left to do)."""
    reader = _reader(image)
    image.read_sequentially()  # a second pass in order (an image in S3 is fetched ahead again)
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        def check(p):
            offset, length = p
            return offset, os.pread(fd, length, offset) == reader.read(offset, length)
        with ordered_map(check, _pieces(reader, {DATA, ZERO})) as checked:
            for offset, ok in checked:
                if not ok:
                    raise OperationFailed(f"verify after restore: {target} differs from the image at offset {offset}")
    finally:
        os.close(fd)
