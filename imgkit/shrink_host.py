"""Shrink ext2/3/4 and NTFS on the host, without the libguestfs appliance.

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

Filesystems that need a mount to resize (btrfs) or a copy of their files (FAT, rebuilt) keep the
appliance path in shrink_fs.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from .errors import EnvironmentProblem, OperationFailed
from .qemu_tools import SERVING_LIMITS, Limits, find_program, kill_group, limits_for_size, popen
from .sandbox import available as sandbox_available
from .sandbox import run_confined
from .units import format_size

HOST_FILESYSTEMS = ("ext2", "ext3", "ext4", "ntfs")
TOOL_ADDRESS_SPACE = 4 << 30  # resize2fs keeps bitmaps of the whole filesystem in memory


def host_path_usable(filesystems: set[str]) -> bool:
    """True when every filesystem to measure or shrink has host tools, and the host has bubblewrap,
    qemu-storage-daemon and /dev/fuse."""
    if not filesystems <= set(HOST_FILESYSTEMS):
        return False
    if os.environ.get("IMGKIT_SHRINK_APPLIANCE") == "1":  # a test/debug switch: the appliance path
        return False
    from shutil import which
    return sandbox_available() and which("qemu-storage-daemon") is not None and os.path.exists("/dev/fuse")


def _tool_limits(size: int) -> Limits:
    base = limits_for_size(size)
    return Limits(cpu_seconds=base.cpu_seconds * 4, address_space=TOOL_ADDRESS_SPACE,
                  wall_seconds=base.wall_seconds * 4)


class PartitionFile:
    """One partition of the overlay as a plain, writable file in `workdir` (a context manager). One
    qemu-storage-daemon per partition, one at a time: a writable FUSE export takes the `resize`
    permission of its node, which two raw windows on the same qcow2 node cannot both hold. On exit
    the daemon stops (SIGTERM: it flushes the qcow2 and removes its FUSE mount) and the overlay is
    complete."""

    def __init__(self, overlay: str, export_socket: str, number: int, start: int, size: int, workdir: str):
        self.overlay, self.socket, self.workdir = overlay, export_socket, workdir
        self.number, self.start, self.size = number, start, size
        self.path = os.path.join(workdir, f"part{number}.raw")
        self.proc = None

    def _mounted(self) -> bool:
        return os.stat(self.path).st_dev != os.stat(self.workdir).st_dev

    def __enter__(self) -> "PartitionFile":
        node = {"driver": "qcow2", "node-name": "ov",
                "file": {"driver": "file", "filename": self.overlay},
                "backing": {"driver": "raw", "read-only": True,
                            "file": {"driver": "nbd", "read-only": True,
                                     "server": {"type": "unix", "path": self.socket}}}}
        window = {"driver": "raw", "node-name": "part", "file": "ov", "offset": self.start, "size": self.size}
        with open(self.path, "wb"):
            pass
        argv = ["qemu-storage-daemon", "--blockdev", json.dumps(node), "--blockdev", json.dumps(window),
                "--export", f"type=fuse,id=part,node-name=part,mountpoint={self.path},writable=on"]
        find_program("qemu-storage-daemon")
        self.log = open(os.path.join(self.workdir, f"qsd{self.number}.log"), "w+")
        self.proc = popen(argv, SERVING_LIMITS, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not self._mounted():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.flush()
                self.log.seek(0)
                said = [ln for ln in self.log.read().splitlines() if ln.strip()] or ["no output"]
                try:
                    self.close()
                except OperationFailed:
                    pass
                raise OperationFailed(f"qemu-storage-daemon could not expose partition {self.number}: "
                                      f"{said[-1][:300]}")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        if self.proc is None:
            return
        kill_group(self.proc)  # SIGTERM first: qsd closes its block nodes (qcow2 flushed) and exits
        code, self.proc = self.proc.returncode, None
        self.log.close()
        if self._mounted():  # a daemon that died leaves its FUSE mount behind: ours, so we remove it
            subprocess.run(["umount", "-l", self.path], capture_output=True, timeout=30)
        if code not in (0, -15):
            raise OperationFailed(f"qemu-storage-daemon ended with status {code}: the overlay may be incomplete")

    def __exit__(self, *exc) -> None:
        self.close()


def measure(fs: str, path: str, size: int) -> int:
    """The filesystem's own minimum size in bytes (raises OperationFailed when its tool says none)."""
    files, limits = {"part": path}, _tool_limits(size)
    if fs.startswith("ext"):
        out = run_confined(["resize2fs", "-P", "/fs/part"], files, limits, "resize2fs -P").stdout
        m = re.search(r"minimum size of the filesystem:\s*(\d+)", out)
        head = run_confined(["dumpe2fs", "-h", "/fs/part"], files, limits, "dumpe2fs -h").stdout
        b = re.search(r"^Block size:\s*(\d+)", head, re.M)
        if not m or not b:
            raise OperationFailed("resize2fs -P gave no minimum")
        return int(m.group(1)) * int(b.group(1))
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


def shrink_on_host(plan, overlay: str, export_socket: str, workdir: str, replan):
    """The host path of shrink_fs.shrink_filesystems for plans whose filesystems are all in
    HOST_FILESYSTEMS: (minimums, notes, plan carried out)."""
    from .errors import RefusedTarget
    measured = [pp for pp in plan.parts if pp.minimum is not None and pp.filesystem in HOST_FILESYSTEMS]
    minimums, notes = {}, []

    def exposed(pp) -> PartitionFile:
        return PartitionFile(overlay, export_socket, pp.number, pp.old_start, pp.old_size, workdir)
    for pp in measured:
        try:
            with exposed(pp) as part:
                minimums[pp.number] = measure(pp.filesystem, part.path, pp.old_size)
        except OperationFailed as e:  # the estimate stands; the resizer refuses a size below its minimum
            sys.stderr.write(f"imgkit: minimum of partition {pp.number} unknown: {e}\n")
    if replan is not None:
        # a FAT the first plan leaves whole stays whole (as on the appliance path)
        pinned = {pp.number: pp.old_size for pp in plan.parts
                  if pp.minimum is not None and pp.filesystem not in HOST_FILESYSTEMS and not pp.shrinks}
        plan = replan(minimums, pinned)
        if not plan.fits:
            raise RefusedTarget(f"the filesystems' own minimums do not fit the target: {plan.reason}",
                                hint="; ".join(pp.describe() for pp in plan.parts if pp.minimum_exact))
    for pp in plan.shrunk:
        if pp.filesystem not in HOST_FILESYSTEMS:
            raise EnvironmentProblem(f"partition {pp.number} ({pp.filesystem}) cannot be shrunk on the host")
        with exposed(pp) as part:
            notes.append(resize(pp.filesystem, part.path, pp.old_size, pp.new_size,
                                f"partition {pp.number} ({pp.filesystem})"))
    return minimums, notes, plan
