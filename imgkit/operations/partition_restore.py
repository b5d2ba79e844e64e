"""Restore one partition of an image: the tool finds where it goes and shows that plan first.

Target rules (in this order):
- a path that does not exist: a new file holding just the partition (sparse, temp name + rename);
- a partition device (a kernel partition, or a loop device with an offset): the partition at byte 0;
- a disk (file or device) with a partition table: partition `to_partition`, by default the partition
  with the same number, which must be at least as large as the image's partition;
- a file or device without a partition table: the partition at byte 0.
A target partition that is too small is refused, naming both sizes.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from ..platform.blockdev import device_size, is_partition, loop_offset
from ..errors import InputError, RefusedTarget
from ..formats.partitions import Partition, read_partition_table
from ..progress import NullProgress, Progress
from .restore import RestoreResult, partially_written, restore_stream, write_stream
from ..formats.sources import RawSource
from ..stream import SliceStream, Stream
from ..platform.targets import open_restore_target
from ..units import format_size


@dataclass
class PartitionPlan:
    number: int  # in the image
    source: Partition
    filesystem: str | None
    label: str | None
    target: str
    target_kind: str  # "new file", "file", "block device"
    offset: int  # bytes into the target
    room: int | None  # bytes available there (None: a new file grows to fit)
    to_partition: int | None  # the target's partition number, None when written at byte 0

    def describe(self) -> str:
        what = f"partition {self.number} of the image ({self.filesystem or 'unknown filesystem'}" \
               + (f" '{self.label}'" if self.label else "") + f", {format_size(self.source.size)})"
        if self.to_partition is not None:
            where = (f"partition {self.to_partition} of {self.target_kind} {self.target} "
                     f"(at byte {self.offset}, {format_size(self.room)})")
        elif self.room is None:
            where = f"new file {self.target}"
        else:
            where = f"{self.target_kind} {self.target} from byte 0 ({format_size(self.room)})"
        return f"restore {what} to {where}"

    def to_dict(self) -> dict:
        return {"partition": self.number, "size": self.source.size, "filesystem": self.filesystem,
                "label": self.label, "target": self.target, "target_kind": self.target_kind,
                "target_offset": self.offset, "target_room": self.room, "to_partition": self.to_partition}


def _is_partition_device(st: os.stat_result) -> bool:
    """A kernel partition, or a loop device over part of a file (losetup -o): holds one filesystem."""
    return is_partition(st.st_rdev) or loop_offset(st.st_rdev) > 0


def plan_partition_restore(image: Stream, target: str, number: int, to_partition: int | None = None,
                           metadata: dict | None = None) -> PartitionPlan:
    table = read_partition_table(image)
    part = table.get(number)
    if part is None:
        have = ", ".join(str(p.number) for p in table.partitions) or "none"
        raise InputError(f"the image has no partition {number}", hint=f"its partitions: {have}")
    entry = next((e for e in ((metadata or {}).get("partition_table") or {}).get("partitions", [])
                  if e.get("number") == number), {})
    captured = ((metadata or {}).get("capture") or {}).get("partitions")
    if entry.get("capture_mode") == "not selected" or (captured is not None and number not in captured
                                                        and not part.is_bios_boot):
        raise InputError(f"partition {number} was not captured into this image (not selected)")
    if part.end > image.size:
        raise InputError(f"partition {number} extends past the end of the image")
    fs, label = entry.get("filesystem"), entry.get("label")

    def plan(kind, offset, room, to):
        if room is not None and room < part.size:
            where = f"partition {to} of {target}" if to is not None else target
            raise RefusedTarget(f"{where} is {format_size(room)} ({room} bytes), smaller than partition "
                                f"{number} of the image, {format_size(part.size)} ({part.size} bytes)")
        return PartitionPlan(number, part, fs, label, target, kind, offset, room, to)

    try:
        st = os.stat(target)
    except FileNotFoundError:
        if to_partition is not None:
            raise InputError(f"{target} does not exist, so it has no partition {to_partition}") from None
        return plan("new file", 0, None, None)
    is_block = stat.S_ISBLK(st.st_mode)
    if not is_block and not stat.S_ISREG(st.st_mode):
        raise InputError(f"{target}: not a block device or regular file")
    kind = "block device" if is_block else "file"
    size = device_size(target) if is_block else st.st_size
    if is_block and _is_partition_device(st):
        if to_partition is not None:
            raise InputError(f"{target} is a partition device: --to-partition does not apply")
        return plan(kind, 0, size, None)
    with RawSource(target) as disk:
        ttable = read_partition_table(disk)
    if ttable.partitions:
        want = to_partition if to_partition is not None else number
        tp = ttable.get(want)
        if tp is None:
            have = ", ".join(f"{p.number} ({format_size(p.size)})" for p in ttable.partitions)
            raise InputError(f"{target} has no partition {want}", hint=f"its partitions: {have}; "
                             "choose one with --to-partition")
        if tp.end > size:
            raise InputError(f"partition {want} of {target} extends past its end")
        return plan(kind, tp.start, tp.size, want)
    if to_partition is not None:
        raise InputError(f"{target} has no partition table, so no partition {to_partition}")
    return plan(kind, 0, size if is_block else None, None)


def restore_partition(image: Stream, plan: PartitionPlan, *, image_paths: list[str] = (),
                      confirm=None, progress: Progress | None = None) -> RestoreResult:
    """Carry out a plan. `confirm(text)` is asked before anything existing is overwritten."""
    part = SliceStream(image, plan.source.start, plan.source.size)
    # The slice declares the image's chunks as its units, with the phase at which it starts inside
    # one: restore cuts its pieces there.
    if plan.target_kind == "new file" or (plan.target_kind == "file" and plan.to_partition is None):
        # A whole file becomes the partition: the core restore (temp name, sparse, rename).
        return restore_stream(part, plan.target, image_paths=image_paths, confirm=confirm, progress=progress)
    progress = progress or NullProgress()
    started = time.monotonic()
    # The one home of target checks (targets.py): only the partition's byte range counts, so a
    # mounted neighbour partition (or a loop over it) does not refuse, while anything over this
    # range, at any depth, does.
    dest = open_restore_target(plan.target, list(image_paths), start=plan.offset, length=plan.source.size)
    with dest:
        if confirm is not None and not confirm(f"This will overwrite {plan.describe()[8:]}. "
                                               "Everything on that partition will be lost."):
            raise InputError("restore cancelled: nothing was written")
        if dest.fd < 0:
            try:
                dest.fd = os.open(plan.target, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as e:
                raise RefusedTarget(f"{plan.target}: cannot open for writing ({e.strerror})") from None
        fd = dest.fd
        with partially_written(plan.target, f"partition on {plan.target}", "the partition"):
            # ZERO runs are zeroed (the target's old bytes must not show through); FREE runs are unused
            # by the filesystem and left as they are.
            written = write_stream(part, fd, base=plan.offset, zero_old=True, sparse=False, progress=progress)
            os.fsync(fd)
    progress.finish()
    return RestoreResult(plan.target, written, time.monotonic() - started, False)

