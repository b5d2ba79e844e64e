"""Restore onto a smaller disk (restore --shrink): plan (shrink_plan.py), shrink the filesystems on an
overlay (shrink_fs.py), then write through restore.restore_stream, so the target's checks, the
confirmation, O_EXCL, the temp-name-and-rename of files and the sparse/zeroing rules are restore's own.

What is written: the image's bytes before the first partition (boot code, post-MBR gap), each kept
partition from the image at its new start (fs-aware: FREE runs skipped), each shrunk filesystem's
used blocks only (its used-block map read from the overlay or the rebuilt FAT), and last the new
partition table (shrink_table.py). Sector 0 is written last: a target cut short has no table.
"""
from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass

from ..units import format_size
from ..platform.blockdev import device_size
from ..errors import InputError, RefusedTarget
from ..filesystems.allocation import OWN_PARSERS, read_used_blocks
from ..filesystems.usedmap import NotUsable, UsedBlocks
from ..formats.partitions import PartitionTable, read_partition_table
from ..progress import NullProgress, Progress
from .restore import _pwrite_all, write_stream
from .shrink_plan import ShrinkPlan, plan_shrink, too_small_message
from ..formats.sources import RawSource
from ..stream import DATA, FREE, Run, SliceStream, Stream, merge_runs


class UsedView(Stream):
    """A filesystem's bytes with its unused blocks as FREE runs (written nowhere)."""

    def __init__(self, part: Stream, used: UsedBlocks | None):
        self.part, self.used, self.size = part, used, part.size

    def read(self, offset: int, length: int) -> bytes:
        return self.part.read(offset, length)

    def _used_runs(self):
        u = self.used
        if u is None:
            yield Run(DATA, 0, self.size)
            return
        yield Run(DATA, 0, u.first_byte)
        bm, n = u.bitmap, u.block_count
        i = 0
        while i < n:  # whole 0x00/0xFF bytes at a time, bit by bit only at the edges of runs
            bit = (bm[i >> 3] >> (i & 7)) & 1
            full, j = (0xFF if bit else 0x00), i + 1
            while j < n:
                if j & 7 == 0 and j + 8 <= n and bm[j >> 3] == full:
                    j += 8
                elif (bm[j >> 3] >> (j & 7)) & 1 == bit:
                    j += 1
                else:
                    break
            yield Run(DATA if bit else FREE, u.first_byte + i * u.block_size, (j - i) * u.block_size)
            i = j
        yield Run(DATA, u.end_byte, self.size - u.end_byte)

    def runs(self):
        # used blocks that the source holds as zeros stay ZERO (zeroed on a device), others DATA
        base = list(self.part.runs())
        for r in merge_runs(self._used_runs()):
            if r.kind == FREE or r.length <= 0:
                if r.length > 0:
                    yield r
                continue
            for b in base:
                s, e = max(b.offset, r.offset), min(b.end, r.end)
                if s < e:
                    yield Run(b.kind if b.kind != FREE else DATA, s, e - s)


class _Part(Progress):
    """Progress of one piece of the layout inside the whole restore's progress."""

    def __init__(self, whole: Progress):
        self.whole = whole
        self.total = 0

    def advance(self, n: int) -> None:
        self.whole.advance(n)


@dataclass
class ShrinkLayout:
    image: Stream
    table: PartitionTable
    plan: ShrinkPlan
    sources: dict  # partition number -> Stream of what to write at its new start

    @property
    def size(self) -> int:
        return self.plan.target_size

    def write(self, fd: int, *, zero_old: bool, sparse: bool, discard: bool = False,
              progress: Progress | None = None, workers: int | None = None) -> int:
        from .shrink_table import table_writes
        progress = progress or NullProgress()
        progress.total = sum(s.size for s in self.sources.values())
        sub = _Part(progress)
        first = min(pp.new_start for pp in self.plan.parts if not pp.extended)
        head = SliceStream(self.image, 0, first)
        written = write_stream(head, fd, zero_old=zero_old, sparse=sparse, discard=discard, progress=sub,
                               workers=workers)
        _pwrite_all(fd, bytes(512), 0)  # no table until everything else is there
        for pp in self.plan.parts:
            if pp.extended:
                continue
            written += write_stream(self.sources[pp.number], fd, base=pp.new_start, zero_old=zero_old,
                                    sparse=sparse, discard=discard, progress=sub, workers=workers)
        writes = table_writes(self.image, self.table, self.plan)
        for offset, data in sorted(writes, key=lambda w: w[0] == 0):  # sector 0 last
            _pwrite_all(fd, data, offset)
        return written


def target_size_of(target: str, given: int | None) -> int:
    """The size a shrunk layout is made for: a device's size, or for a file --target-size, else the
    existing file's size."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        if given is not None and given != device_size(target):
            raise InputError(f"--target-size does not apply to a block device ({target} is "
                             f"{format_size(device_size(target))}, {device_size(target)} bytes)")
        return device_size(target)
    if given is not None:
        return given
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size:
        return st.st_size
    raise InputError(f"{target}: a new file has no size to shrink onto", hint="give one with --target-size")


def make_plan(img: Stream, target_size: int, mode: str, minimums: dict | None = None,
              pinned: dict | None = None) -> ShrinkPlan:
    return plan_shrink(img, target_size, mode, img.metadata, img.used_maps,
                       minimums=minimums, pinned=pinned)


def _used_map(fs: str, part: Stream) -> UsedBlocks | None:
    if fs not in OWN_PARSERS:
        return None  # btrfs: written where the overlay holds data
    try:
        return read_used_blocks(fs, part)
    except NotUsable:
        return None


def restore_shrunk(img: Stream, target: str, plan: ShrinkPlan, *, image_paths, confirm, progress,
                   early_checks) -> tuple[dict, "object"]:
    """Shrink the plan's filesystems, then restore the layout. `early_checks()` runs restore's
    target checks before the (slow) appliance work; `confirm` is asked before it too."""
    from ..views.nbd_export import export_stream
    from .restore import plan_text, restore_stream
    from .shrink_fs import shrink_filesystems
    if not plan.fits:
        raise RefusedTarget(too_small_message(target, plan.target_size, img.size, plan))
    early_checks()
    if confirm is not None and not confirm(plan_text(img, target, plan.target_size, os.path.exists(target)
                                                     and stat.S_ISBLK(os.stat(target).st_mode))
                                           + "\n" + plan.describe()):
        raise InputError("restore cancelled: nothing was written")
    table = read_partition_table(img)
    with tempfile.TemporaryDirectory(prefix="imgkit-shrink-") as work, export_stream(img) as export:
        shrunk, plan = shrink_filesystems(
            img, plan, work, export.socket_path,
            replan=lambda minimums, pinned: make_plan(img, plan.target_size, plan.mode, minimums, pinned))
        sources: dict[int, Stream] = {}
        opened: list[RawSource] = []  # the shrunk FAT files, closed here
        try:
            for pp in plan.parts:
                if pp.extended:
                    continue
                if not pp.shrinks:
                    src = SliceStream(img, pp.old_start, pp.old_size)  # declares img's chunks as its units
                elif pp.number in shrunk.fat_files:
                    fat = RawSource(shrunk.fat_files[pp.number])
                    opened.append(fat)
                    src = UsedView(fat, _used_map("vfat", fat))
                else:
                    part = SliceStream(shrunk.overlay, pp.old_start, pp.new_size)
                    src = UsedView(part, _used_map(pp.filesystem, part))
                sources[pp.number] = src
            layout = ShrinkLayout(img, table, plan, sources)
            result = restore_stream(img, target, image_paths=image_paths, confirm=None, progress=progress,
                                    layout=layout)
        finally:
            for fat in opened:
                fat.close()
            shrunk.overlay.close()
    report = {"plan": plan.to_dict(), "notes": shrunk.notes, "minimums": shrunk.minimums,
              "overlay_bytes": shrunk.overlay_bytes, "engine": shrunk.engine}
    return report, result
