"""Shrink ext2/3/4 and NTFS, and rebuild FAT, on the host, without the libguestfs appliance.

The appliance costs a VM boot per shrink (20-30 s under TCG, 2-3 s with KVM) for tools that need no
kernel at all: e2fsck, resize2fs and ntfsresize work on a plain file. So each partition to measure or
shrink is exposed as a plain file: qemu-storage-daemon opens the qcow2 overlay (backed by the image's
read-only NBD export, exactly as the appliance did) and exports a raw window of it per partition
(`raw` node with offset/size) through FUSE (`--export type=fuse`, writable). Writes land in the
overlay; the image is never changed. The tools run confined by bubblewrap (sandbox.py) with only
their partition's file writable. Nothing is mounted by the host kernel: FUSE here serves a file
whose bytes the host kernel never interprets as a filesystem; the hostile structures are parsed only
by the confined tools.

Minimums are measured the way libguestfs' vfs-minimum-size does: resize2fs -P times the block size,
ntfsresize --info's "You might resize at N bytes".

A filesystem that needs a mount to resize (btrfs) keeps the appliance path in shrink_fs.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from ..errors import EnvironmentProblem, OperationFailed, RefusedTarget
from ..formats.qemu_image import window_node
from ..platform.qemu_tools import SERVING_LIMITS, Limits, find_program, kill_group, limits_for_size, popen
from ..platform.sandbox import available as sandbox_available
from ..platform.sandbox import run_confined
from ..units import format_size

HOST_FILESYSTEMS = ("ext2", "ext3", "ext4", "ntfs")
# a FAT is rebuilt, not resized: a new one made by mkfs.fat (shrink_fs), the files copied into it by
# mcopy from a read-only window of the old one, drive to drive (mtools, no mount, no host directory)
HOST_REBUILT = ("vfat",)
TOOL_ADDRESS_SPACE = 4 << 30  # resize2fs keeps bitmaps of the whole filesystem in memory


def host_path_usable(filesystems: set[str]) -> bool:
    """True when every filesystem to measure or shrink has host tools, and the host has bubblewrap,
    qemu-storage-daemon and /dev/fuse."""
    if not filesystems <= set(HOST_FILESYSTEMS + HOST_REBUILT):
        return False
    if os.environ.get("IMGKIT_SHRINK_APPLIANCE") == "1":  # a test/debug switch: the appliance path
        return False
    from shutil import which
    return sandbox_available() and which("qemu-storage-daemon") is not None and os.path.exists("/dev/fuse")


def _tool_limits(size: int) -> Limits:
    base = limits_for_size(size)
    return Limits(cpu_seconds=base.cpu_seconds * 4, address_space=TOOL_ADDRESS_SPACE,
                  wall_seconds=base.wall_seconds * 4)


class PartitionFiles:
    """Partitions of the overlay as plain files in `workdir`, `paths[number]` (a context manager).
    Writable: one partition per qemu-storage-daemon (a writable FUSE export takes the `resize`
    permission of its node, which two raw windows on one qcow2 node cannot both hold); read-only
    (measuring): every partition in one daemon. On exit the daemon stops (SIGTERM: it flushes the
    qcow2 and removes its FUSE mounts) and the overlay is complete."""

    def __init__(self, overlay: str, export_socket: str, parts: list[tuple[int, int, int]], workdir: str,
                 writable: bool):
        if writable and len(parts) != 1:
            raise ValueError("one writable partition per qemu-storage-daemon")
        self.overlay, self.socket, self.workdir, self.writable = overlay, export_socket, workdir, writable
        self.parts = parts
        self.paths = {n: os.path.join(workdir, f"part{n}.raw") for n, _, _ in parts}
        self.proc = None

    def _mounted(self, path: str) -> bool:
        try:
            return os.stat(path).st_dev != os.stat(self.workdir).st_dev
        except OSError:  # ENOTCONN: a FUSE mount whose daemon died
            return True

    def argv(self) -> list[str]:
        """The daemon's command line: the overlay over the image's NBD export (overlay_blockdevs), a
        raw window per partition (window_node), each exported through FUSE onto its file."""
        from .shrink_fs import overlay_blockdevs
        argv = ["qemu-storage-daemon", *overlay_blockdevs(self.socket, self.overlay, node_name="ov",
                                                          writable=self.writable)]
        for n, start, size in self.parts:
            argv += ["--blockdev", json.dumps(window_node(f"p{n}", "ov", start, size, writable=self.writable)),
                     "--export", f"type=fuse,id=e{n},node-name=p{n},mountpoint={self.paths[n]},"
                                 f"writable={'on' if self.writable else 'off'}"]
        return argv

    def __enter__(self) -> "PartitionFiles":
        argv = self.argv()
        for n in self.paths:
            with open(self.paths[n], "wb"):
                pass
        find_program("qemu-storage-daemon")
        self.log = open(os.path.join(self.workdir, "qsd.log"), "a+")
        self.proc = popen(argv, SERVING_LIMITS, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is None and all(self._mounted(p) for p in self.paths.values()):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.flush()
                self.log.seek(0)
                said = [ln for ln in self.log.read().splitlines() if ln.strip()] or ["no output"]
                try:
                    self.close()
                except OperationFailed:
                    pass
                raise OperationFailed(f"qemu-storage-daemon could not expose the partitions: {said[-1][:300]}")
            time.sleep(0.005)
        return self

    def close(self) -> None:
        if self.proc is None:
            return
        kill_group(self.proc)  # SIGTERM first: qsd closes its block nodes (qcow2 flushed) and exits
        code, self.proc = self.proc.returncode, None
        self.log.close()
        for path in self.paths.values():
            if self._mounted(path):  # a daemon that died leaves its FUSE mount behind: ours, we remove it
                subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)
        if code not in (0, -15):
            raise OperationFailed(f"qemu-storage-daemon ended with status {code}: the overlay may be incomplete")

    def __exit__(self, *exc) -> None:
        self.close()


def _ext_block_size(path: str) -> int:
    """s_log_block_size from the superblock (bytes 1024+24), bounded: ext blocks are 1 KiB..64 KiB."""
    with open(path, "rb") as f:
        f.seek(1024 + 24)
        raw = f.read(4)
    log = int.from_bytes(raw, "little") if len(raw) == 4 else 99
    if log > 6:
        raise OperationFailed("the ext superblock gives no valid block size")
    return 1024 << log


def measure(fs: str, path: str, size: int) -> int:
    """The filesystem's own minimum size in bytes (raises OperationFailed when its tool says none)."""
    files, limits = {"part": path}, _tool_limits(size)
    if fs.startswith("ext"):
        out = run_confined(["resize2fs", "-P", "/fs/part"], files, limits, "resize2fs -P").stdout
        m = re.search(r"minimum size of the filesystem:\s*(\d+)", out)
        if not m:
            raise OperationFailed("resize2fs -P gave no minimum")
        return int(m.group(1)) * _ext_block_size(path)
    out = run_confined(["ntfsresize", "--info", "--force", "--no-progress-bar", "/fs/part"], files, limits,
                       "ntfsresize --info").stdout
    m = re.search(r"You might resize at (\d+) bytes", out)
    if not m:
        raise OperationFailed("ntfsresize --info gave no minimum")
    return int(m.group(1))


def resize(fs: str, path: str, old_size: int, new_size: int, what: str) -> str:
    """Check, shrink to `new_size` bytes and check again; returns a note for the report."""
    files, limits = {"part": path}, _tool_limits(old_size)
    if fs.startswith("ext"):
        # e2fsck: 0 clean, 1 errors corrected; anything else leaves a filesystem resize2fs must not touch
        run_confined(["e2fsck", "-f", "-y", "/fs/part"], files, limits, f"e2fsck of {what}", ok_codes=(0, 1))
        # resize2fs cannot truncate a FUSE-exported file (its size is the partition's): it says so and
        # goes on, which is what we want; the exit status tells the resize itself
        run_confined(["resize2fs", "/fs/part", f"{new_size // 512}s"], files, limits, f"resize2fs of {what}")
        try:
            run_confined(["e2fsck", "-f", "-n", "/fs/part"], files, limits, f"e2fsck after shrinking {what}")
        except OperationFailed as e:
            raise OperationFailed(f"e2fsck reports problems after shrinking {what}: {e}") from None
    else:
        # ntfsresize checks the volume's consistency itself before it changes anything; --force
        # answers its confirmation question (stdin is /dev/null)
        run_confined(["ntfsresize", "--force", "--no-progress-bar", "-s", str(new_size), "/fs/part"],
                     files, limits, f"ntfsresize of {what}")
        run_confined(["ntfsresize", "--info", "--force", "--no-progress-bar", "/fs/part"], files, limits,
                     f"ntfsresize --info after shrinking {what}")
    return f"{what}: shrunk to {format_size(new_size)}"


def copy_fat(old_path: str, new_path: str, workdir: str, size: int, what: str) -> str:
    """Every file and directory of the old FAT (a read-only window) into the new, empty one, with
    attributes and times (mcopy -s -p -m), then fsck.fat -n on the new one."""
    rc = os.path.join(workdir, "mtoolsrc")
    with open(rc, "w") as f:
        f.write('mtools_skip_check=1\ndrive o: file="/fs/old"\ndrive n: file="/fs/new"\n')
    limits = _tool_limits(size)
    try:
        run_confined(["mcopy", "-s", "-p", "-m", "-Q", "-D", "o", "o:/", "n:/"], {"new": new_path}, limits,
                     f"copying the files of {what} (mcopy)", read_only={"old": old_path, "rc": rc},
                     env={"MTOOLSRC": "/fs/rc"})
    except OperationFailed as e:
        if "full" in str(e).lower():
            raise RefusedTarget(f"the files of {what} do not fit in {format_size(size)}") from None
        raise
    try:
        run_confined(["fsck.fat", "-n", "/fs/new"], {"new": new_path}, limits, f"fsck.fat of the rebuilt {what}")
    except OperationFailed as e:
        raise OperationFailed(f"fsck.fat reports problems on the rebuilt {what}: {e}") from None
    return f"{what}: rebuilt as a {format_size(size)} FAT, files copied"


def shrink_on_host(plan, overlay: str, export_socket: str, workdir: str, replan,
                   fat_files: dict[int, str] | None = None, pinned: dict[int, int] | None = None):
    """The host path of shrink_fs.shrink_filesystems for plans whose filesystems are all in
    HOST_FILESYSTEMS or HOST_REBUILT (`fat_files`: the new, empty FATs shrink_fs made, `pinned`
    their sizes): (minimums, notes, plan carried out)."""
    fat_files, pinned = fat_files or {}, dict(pinned or {})
    measured = [pp for pp in plan.parts if pp.minimum is not None and pp.filesystem in HOST_FILESYSTEMS]
    minimums, notes = {}, []

    def exposed(pp) -> PartitionFiles:
        return PartitionFiles(overlay, export_socket, [(pp.number, pp.old_start, pp.old_size)], workdir, True)
    rebuilt = [pp for pp in plan.shrunk if pp.number in fat_files]
    if measured or rebuilt:  # read-only windows, all in one daemon: measuring and copying from them writes nothing
        windows = [(pp.number, pp.old_start, pp.old_size) for pp in [*measured, *rebuilt]]
        with PartitionFiles(overlay, export_socket, windows, workdir, False) as files:
            for pp in rebuilt:
                notes.append(copy_fat(files.paths[pp.number], fat_files[pp.number], workdir, pp.new_size,
                                      f"partition {pp.number} (vfat)"))
            for pp in measured:
                try:
                    minimums[pp.number] = measure(pp.filesystem, files.paths[pp.number], pp.old_size)
                except OperationFailed as e:  # the estimate stands; the resizer refuses below its minimum
                    sys.stderr.write(f"imgkit: minimum of partition {pp.number} unknown: {e}\n")
    if replan is not None:
        # a FAT the first plan leaves whole stays whole (as on the appliance path); a rebuilt one
        # keeps the size it was made at
        pinned.update({pp.number: pp.old_size for pp in plan.parts
                       if pp.minimum is not None and pp.filesystem not in HOST_FILESYSTEMS and not pp.shrinks})
        plan = replan(minimums, pinned)
        if not plan.fits:
            raise RefusedTarget(f"the filesystems' own minimums do not fit the target: {plan.reason}",
                                hint="; ".join(pp.describe() for pp in plan.parts if pp.minimum_exact))
    for pp in plan.shrunk:
        if pp.number in fat_files:
            continue  # rebuilt above
        if pp.filesystem not in HOST_FILESYSTEMS:
            raise EnvironmentProblem(f"partition {pp.number} ({pp.filesystem}) cannot be shrunk on the host")
        with exposed(pp) as part:
            notes.append(resize(pp.filesystem, part.paths[pp.number], pp.old_size, pp.new_size,
                                f"partition {pp.number} ({pp.filesystem})"))
    return minimums, notes, plan
