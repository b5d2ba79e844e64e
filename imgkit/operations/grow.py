"""After a whole-disk restore onto a larger disk: move the backup GPT to the real end of the disk, and
on request grow the last partition and its filesystem to fill the disk.

The GPT move is `sgdisk -e` (gdisk's own "relocate backup data structures to the end of the disk",
which rewrites both headers' alternate/last-usable LBAs and CRCs): one well-tested tool instead of a
second GPT writer. The partition grows with `sfdisk -N` (", +" keeps the start, type, UUID and name);
the filesystem with its own tool, on a loop device over the grown partition:
ext2/3/4 `e2fsck -f` + `resize2fs`, NTFS `ntfsresize`, FAT `fatresize`. XFS and btrfs grow only while
mounted, and imgkit never mounts an image's filesystem with the host kernel: they are mounted inside
the libguestfs appliance (its own kernel, in a VM) and grown there with `xfs_growfs -d` /
`btrfs filesystem resize max`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from ..errors import EnvironmentProblem, OperationFailed
from ..filesystems.probe import probe
from ..formats.partitions import read_partition_table
from ..formats.sources import RawSource
from ..stream import SliceStream
from ..units import format_size

TOOL_TIMEOUT = 1800


@dataclass
class GrowReport:
    moved_gpt: bool = False
    grown_partition: int | None = None
    new_size: int | None = None
    filesystem: str | None = None
    filesystem_grown: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _run(cmd: list[str], what: str, input: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise EnvironmentProblem(f"{cmd[0]} is needed to {what}", hint=_PACKAGES.get(cmd[0]))
    try:
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:  # subprocess.run killed it; the caller's cleanup still runs
        raise OperationFailed(f"{cmd[0]} did not finish within {TOOL_TIMEOUT} s (to {what}): stopped") from None


_PACKAGES = {"sgdisk": "apt install gdisk", "sfdisk": "apt install fdisk", "resize2fs": "apt install e2fsprogs",
             "e2fsck": "apt install e2fsprogs", "ntfsresize": "apt install ntfs-3g",
             "fatresize": "apt install fatresize", "losetup": "apt install mount"}


def _size_of(path: str) -> int:
    with RawSource(path) as disk:
        return disk.size


def fit_to_disk(target: str, image_size: int, grow: bool = False) -> GrowReport:
    """Call after restoring an image of `image_size` bytes onto `target`."""
    report = GrowReport()
    size = _size_of(target)
    with RawSource(target) as disk:
        table = read_partition_table(disk)
    if size > image_size and table.type == "gpt":
        proc = _run(["sgdisk", "-e", target], "move the backup GPT to the end of the disk")
        if proc.returncode != 0:
            raise OperationFailed(f"sgdisk -e {target} failed: {proc.stderr.strip()[:300]}")
        report.moved_gpt = True
    if not grow:
        return report
    if size <= image_size:
        report.notes.append("the target is not larger than the image: nothing to grow")
        return report
    if table.type not in ("gpt", "mbr") or not table.partitions:
        report.notes.append("no partition table: nothing to grow")
        return report
    last = max(table.partitions, key=lambda p: p.end)
    if last.logical:
        report.notes.append(f"partition {last.number} is a logical partition: growing it is not supported")
        return report
    proc = _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "-N", str(last.number), target],
                "grow the last partition", input=", +\n")
    if proc.returncode != 0:
        raise OperationFailed(f"sfdisk could not grow partition {last.number}: {proc.stderr.strip()[:300]}")
    with RawSource(target) as disk:
        grown = read_partition_table(disk).get(last.number)
        found = probe(SliceStream(disk, grown.start, grown.size)) if grown else None
        fs, label = (found.type, found.label) if found else (None, None)
    if grown is None:
        raise OperationFailed(f"partition {last.number} is gone after sfdisk grew it: check {target}")
    report.grown_partition, report.new_size, report.filesystem = last.number, grown.size, fs
    report.notes.append(f"partition {last.number} grown from {format_size(last.size)} to {format_size(grown.size)}")
    grow_filesystem(target, grown.start, grown.size, fs, report, label)
    return report


def _restore_fat_label(target: str, start: int, label: str | None) -> None:
    """fatresize (libparted) rewrites the boot sector without the volume label, which fsck.fat then
    reports; write it back with mtools (both the boot sector and the root directory entry)."""
    if label and shutil.which("mlabel"):
        subprocess.run(["mlabel", "-i", f"{target}@@{start}", f"::{label}"], capture_output=True,
                       env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, timeout=TOOL_TIMEOUT)


def grow_filesystem(target: str, start: int, size: int, fs: str | None, report: GrowReport,
                    label: str | None = None) -> None:
    if fs in ("xfs", "btrfs"):
        _grow_in_appliance(target, report.grown_partition, fs, report)
        return
    if fs not in ("ext2", "ext3", "ext4", "ntfs", "vfat"):
        report.notes.append(f"growing {fs or 'an unknown filesystem'} is not supported: the partition was grown, "
                            "the filesystem keeps its size")
        return
    if fs == "vfat":
        if shutil.which("fatresize") is None:
            report.notes.append("growing FAT needs fatresize (apt install fatresize): the filesystem keeps its size")
            return
        # fatresize (libparted) works on the disk and a partition number; "-s max" and the exact
        # partition size both land "outside the device" (libparted's range rounding), so the size is
        # given in bytes with 1 MiB of slack. libparted cannot resize every FAT layout (small FAT32s):
        # then the partition is grown and the filesystem keeps its size, with a note.
        proc = _run(["fatresize", "-f", "-n", str(report.grown_partition), "-s", str(size - (1 << 20)), target],
                    "grow the FAT filesystem")
        if proc.returncode == 0:
            report.filesystem_grown = True
            report.notes.append(f"vfat filesystem grown to fill partition {report.grown_partition}")
            _restore_fat_label(target, start, label)
        else:
            said = (proc.stderr + proc.stdout).strip().splitlines()
            reason = next((line for line in said if "parted" in line.lower() or "error" in line.lower()),
                          said[-1] if said else "no reason given")
            report.notes.append(f"warning: fatresize could not grow this FAT filesystem ({reason[:200]}): "
                                "the partition was grown, the filesystem keeps its size")
        return
    if os.geteuid() != 0:
        raise EnvironmentProblem("growing a filesystem needs root (a loop device over the partition)")
    loop = _run(["losetup", "-f", "--show", "-o", str(start), "--sizelimit", str(size), target],
                "expose the partition")
    if loop.returncode != 0:
        raise OperationFailed(f"losetup failed: {loop.stderr.strip()[:300]}")
    dev = loop.stdout.strip()
    try:
        if fs.startswith("ext"):
            check = _run(["e2fsck", "-f", "-y", dev], "check the filesystem before resizing")
            if check.returncode not in (0, 1):
                raise OperationFailed(f"e2fsck found problems it could not fix on partition "
                                      f"{report.grown_partition} (exit {check.returncode}): not resized")
            proc = _run(["resize2fs", dev], "grow the ext filesystem")
        else:
            proc = _run(["ntfsresize", "--force", "--no-progress-bar", dev], "grow the NTFS filesystem", input="y\n")
        if proc.returncode != 0:
            raise OperationFailed(f"growing the {fs} filesystem failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        report.filesystem_grown = True
        report.notes.append(f"{fs} filesystem grown to fill partition {report.grown_partition}")
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


def _grow_in_appliance(target: str, number: int, fs: str, report: GrowReport) -> None:
    """XFS and btrfs grow only while mounted: mount the partition inside the libguestfs appliance,
    read-write, with an explicit format, and grow it there. 20-30 s under TCG (the appliance start)."""
    from ..filesystems.guestfs_session import close_handle, first_line, new_handle
    keeps = "the partition was grown, the filesystem keeps its size: grow it after booting the restored system"
    try:
        g, accel = new_handle()
    except EnvironmentProblem as e:  # like a missing fatresize: the restore itself succeeded
        report.notes.append(f"warning: growing {fs} needs the libguestfs appliance ({e}): {keeps}")
        return
    try:
        try:
            g.add_drive_opts(target, format="raw", readonly=0)
            g.launch()
        except RuntimeError as e:
            report.notes.append(f"warning: the libguestfs appliance did not start ({first_line(e)[:200]}): {keeps}")
            return
        try:
            device = next((p for p in g.list_partitions() if g.part_to_partnum(p) == number), None)
            if device is None:
                raise OperationFailed(f"the appliance does not see partition {number} of {target}")
            g.mount(device, "/")
            if fs == "xfs":
                g.xfs_growfs("/", datasec=True)
            else:
                g.btrfs_filesystem_resize("/")  # no size: the whole partition
            g.umount_all()
            g.sync()
        except RuntimeError as e:  # the binding's errors
            raise OperationFailed(f"growing the {fs} filesystem in the appliance failed: {first_line(e)[:300]}",
                                  hint="the partition was grown; the filesystem keeps its size") from None
    finally:
        close_handle(g)
    report.filesystem_grown = True
    report.notes.append(f"{fs} filesystem grown to fill partition {number} (inside the libguestfs appliance, {accel})")
