"""Shrink an image's filesystems with their own tools, on a copy-on-write overlay, never on the host.

The image (any Stream) is exported read-only over NBD (nbd_export.py); a qcow2 overlay backed by that
export takes every write, so the image is never changed and the extra disk space is what the resizers
write (their metadata changes and the blocks they move), not a copy of the disk. The libguestfs
appliance (its own kernel, in a VM) opens the overlay read-write and runs, per partition:
  ext2/3/4  e2fsck -f -y, resize2fs to the planned size, e2fsck -f -n after;
  NTFS      ntfsresize to the planned size (its own consistency checks run first);
  btrfs     mounted in the appliance, `btrfs filesystem resize`, `btrfs check` after;
  FAT       rebuilt: a new FAT of the planned size (mkfs.fat on a host file that imgkit made, with the
            old volume id, label and sector size), the files copied by the appliance (cp -a, the new
            FAT mounted `quiet` so ownership is not an error), fsck.fat after. fatresize (libparted)
            cannot shrink most FATs and would run on the host against untrusted data.
Each filesystem's real minimum (vfs-minimum-size: resize2fs -P, ntfsresize --info, btrfs' own) is
checked against the plan first: a plan below it is refused before the target is touched.

When no btrfs is involved, no appliance is launched: shrink_host.py runs the same tools (and, for a
FAT, mcopy drive to drive) on the host, confined by bubblewrap, on the overlay's partitions exposed
as plain files.

The appliance runs in a child process (python -m imgkit.operations.shrink_fs): libguestfs calls can hold the
GIL while qemu reads the overlay's backing file, which the NBD export in this process serves.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from ..errors import EnvironmentProblem, OperationFailed, RefusedTarget
from ..formats.qemu_image import QemuImage, create_overlay, format_node
from ..platform.qemu_tools import end_child
from .shrink_plan import ShrinkPlan
from ..stream import Stream
from ..units import format_size

APPLIANCE_TIMEOUT = 3600
MKFS_TIMEOUT = 600


@dataclass
class Shrunk:
    """The prepared filesystems: read them from `overlay` (a Stream of the whole disk, old offsets)
    or, for a rebuilt FAT, from `fat_files[number]` (a file holding just the new filesystem)."""
    overlay: Stream | None
    fat_files: dict[int, str] = field(default_factory=dict)
    minimums: dict[int, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    overlay_bytes: int = 0  # disk space the overlay and FAT files took (peak extra disk)
    engine: str = "appliance"  # where the resizers ran: "host" (confined, shrink_host.py) or "appliance"


def overlay_blockdevs(export_socket: str, overlay: str, *, node_name: str, fd: int | None = None,
                      writable: bool = False) -> list[str]:
    """qemu-storage-daemon --blockdev options for shrink's overlay: the image's NBD export as node
    "base" (raw, read-only) and the qcow2 overlay over it as `node_name`, its backing given here (never
    taken from its header). Both built by formats/qemu_image.format_node."""
    base = format_node(export_socket, "raw", protocol="nbd", node_name="base")
    top = format_node(overlay, "qcow2", fd=fd, node_name=node_name, own=True, writable=writable, backing="base")
    return ["--blockdev", json.dumps(base), "--blockdev", json.dumps(top)]


class OverlayImage(QemuImage):
    """The qcow2 overlay read through qemu-storage-daemon with its backing (the NBD export) given
    explicitly: the chain is imgkit's, nothing is taken from the overlay's header."""

    def __init__(self, overlay: str, nbd_socket: str, size: int):
        from ..formats.foreign import ForeignImage
        self._backing_socket = nbd_socket
        info = ForeignImage(overlay, "qcow2", size, os.path.getsize(overlay), "overlay",
                            fd=os.open(overlay, os.O_RDONLY | os.O_CLOEXEC))
        super().__init__(overlay, "qcow2", info)

    def _blockdev_args(self) -> list[str]:
        return overlay_blockdevs(self._backing_socket, self.path, fd=self.inspected.fd, node_name="fmt0")

    def _build_host_map(self) -> None:
        self._host_map_built = True  # everything through qemu: the overlay alone is not the disk


def _mkfs_fat_like(image: Stream, start: int, size: int, new_size: int, label: str | None, path: str) -> None:
    """A new, empty FAT of `new_size` bytes with the old one's volume id, label and sector size."""
    import struct
    bs = image.read(start, 512)
    bps = struct.unpack_from("<H", bs, 11)[0]
    fat32 = struct.unpack_from("<H", bs, 22)[0] == 0
    volid = struct.unpack_from("<I", bs, 67 if fat32 else 39)[0]
    with open(path, "wb") as f:
        f.truncate(new_size)
    argv = ["mkfs.fat", "-i", f"{volid:08X}", "-S", str(bps)]
    if fat32 and new_size // 512 >= 66600:  # FAT32 needs 65525 clusters; else mkfs.fat picks FAT12/16
        argv += ["-F", "32"]
    if label:
        argv += ["-n", label[:11]]
    if shutil.which("mkfs.fat") is None:
        raise EnvironmentProblem("mkfs.fat is needed to rebuild a shrunk FAT filesystem", hint="apt install dosfstools")
    try:
        proc = subprocess.run(argv + [path], capture_output=True, text=True, timeout=MKFS_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise OperationFailed(f"mkfs.fat did not finish within {MKFS_TIMEOUT} s: stopped") from None
    if proc.returncode != 0:
        raise OperationFailed(f"mkfs.fat failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


def shrink_filesystems(image: Stream, plan: ShrinkPlan, workdir: str, export_socket: str,
                       replan=None) -> tuple[Shrunk, ShrinkPlan]:
    """Resize the plan's shrunk filesystems on an overlay in `workdir` (the NBD export of `image`
    must be serving on `export_socket`). One appliance launch, two steps: the resizers' real
    minimums of every shrinkable filesystem are measured, `replan(minimums, pinned)` lays the disk
    out again with them (FAT sizes pinned: their new files are made before the launch), then the
    filesystems are resized to the new plan. Returns (what was shrunk, the plan carried out).
    Raises RefusedTarget when the real minimums do not fit, OperationFailed when a tool fails: in
    both cases nothing was written to the target."""
    overlay = os.path.join(workdir, "overlay.qcow2")
    # The appliance's qemu follows this name (the overlay is its drive); imgkit's own daemons give
    # the backing node explicitly instead (overlay_blockdevs).
    backing = "json:" + json.dumps(format_node(export_socket, "raw", protocol="nbd"))
    create_overlay(overlay, image.size, backing=backing)
    fat_files, pinned = {}, {}
    for pp in plan.shrunk:
        if pp.filesystem == "vfat":
            path = os.path.join(workdir, f"fat{pp.number}.raw")
            _mkfs_fat_like(image, pp.old_start, pp.old_size, pp.new_size, pp.label, path)
            fat_files[pp.number], pinned[pp.number] = path, pp.new_size
    for pp in plan.parts:  # a FAT the plan leaves whole has no new file: it stays whole
        if pp.filesystem == "vfat" and pp.minimum is not None and not pp.shrinks:
            pinned[pp.number] = pp.old_size
    from .shrink_host import HOST_FILESYSTEMS, host_path_usable, shrink_on_host
    involved = {pp.filesystem for pp in plan.shrunk}
    # a btrfs the first plan leaves whole may still shrink once measured (appliance); a FAT it
    # leaves whole stays whole on both paths (pinned), so it does not need the appliance
    involved |= {pp.filesystem for pp in plan.parts
                 if pp.minimum is not None and pp.filesystem in (*HOST_FILESYSTEMS, "btrfs")}
    if host_path_usable(involved):  # no appliance: the tools run confined on the host
        minimums, notes, plan = shrink_on_host(plan, overlay, export_socket, workdir, replan, fat_files, pinned)
        used = sum(os.stat(p).st_blocks * 512 for p in [overlay, *fat_files.values()])
        return Shrunk(OverlayImage(overlay, export_socket, image.size), fat_files, minimums, notes, used,
                      engine="host"), plan
    measure = [{"number": pp.number, "fs": pp.filesystem} for pp in plan.parts
               if pp.minimum is not None and pp.filesystem in ("ext2", "ext3", "ext4", "ntfs", "btrfs")]
    log = open(os.path.join(workdir, "appliance.log"), "w+")
    child = subprocess.Popen([sys.executable, "-m", "imgkit.operations.shrink_fs"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=log, text=True, cwd="/")

    def ask(request: dict) -> dict:
        try:
            child.stdin.write(json.dumps(request) + "\n")
            child.stdin.flush()
            line = child.stdout.readline()
            reply = json.loads(line)
        except (ValueError, BrokenPipeError, OSError):
            log.seek(0)
            said = log.read().strip().splitlines() or ["no output"]
            raise OperationFailed("the filesystem shrinker (libguestfs appliance) failed: " + said[-1][:300]) from None
        if "error" in reply:
            cls = {"RefusedTarget": RefusedTarget, "EnvironmentProblem": EnvironmentProblem}.get(
                reply.get("kind"), OperationFailed)
            raise cls(reply["error"], hint=reply.get("hint"))
        return reply

    try:
        first = ask({"overlay": overlay, "fat_files": [fat_files[n] for n in sorted(fat_files)],
                     "measure": measure})
        minimums = {int(k): v for k, v in first["minimums"].items()}
        if replan is not None:
            plan = replan(minimums, pinned)
            if not plan.fits:
                raise RefusedTarget(f"the filesystems' own minimums do not fit the target: {plan.reason}",
                                    hint="; ".join(pp.describe() for pp in plan.parts if pp.minimum_exact))
        jobs = []
        for pp in plan.shrunk:
            job = {"number": pp.number, "fs": pp.filesystem, "new_size": pp.new_size}
            if pp.number in fat_files:
                job["fat_drive"] = sorted(fat_files).index(pp.number)
            jobs.append(job)
        reply = ask({"jobs": jobs})
    finally:
        end_child(child, APPLIANCE_TIMEOUT)
        log.close()
    used = sum(os.stat(p).st_blocks * 512 for p in [overlay, *fat_files.values()])
    ov = OverlayImage(overlay, export_socket, image.size)
    return Shrunk(ov, fat_files, minimums, reply.get("notes", []), used), plan


# -- the child: one appliance, every filesystem ---------------------------------------------------

def _device_of(g, number: int) -> str:
    for p in g.list_partitions():
        if p.startswith("/dev/sda") and g.part_to_partnum(p) == number:
            return p
    raise OperationFailed(f"the appliance does not see partition {number}")


def _measure(g, request: dict) -> dict:
    minimums = {}
    for m in request["measure"]:
        dev = _device_of(g, m["number"])
        where = f"/m{m['number']}"
        try:
            if m["fs"] == "btrfs":  # btrfs answers only while mounted
                g.mkmountpoint(where)
                g.mount(dev, where)
            minimums[m["number"]] = g.vfs_minimum_size(dev)
        except RuntimeError as e:  # the estimate stands; the resizer refuses a size below its minimum
            sys.stderr.write(f"imgkit: minimum of partition {m['number']} unknown: {e}\n")
        finally:
            if m["fs"] == "btrfs":
                try:
                    g.umount(where)
                except RuntimeError:
                    pass
    return {"minimums": minimums}


def _resize(g, request: dict) -> dict:
    from ..filesystems.guestfs_session import first_line
    notes = []
    for job in request["jobs"]:
        n, fs, size = job["number"], job["fs"], job["new_size"]
        dev = _device_of(g, n)
        what = f"partition {n} ({fs})"
        try:
            if fs == "vfat":
                fat_dev = "/dev/sd" + chr(ord("b") + job["fat_drive"])
                src, new = f"/src{n}", f"/new{n}"
                g.mkmountpoint(src)
                g.mkmountpoint(new)
                g.mount_ro(dev, src)
                files = g.du(src) * 1024
                if files > size:
                    raise RefusedTarget(f"{what} holds {format_size(files)} of files: they do not fit "
                                        f"in {format_size(size)}")
                g.mount_options("quiet", fat_dev, new)
                for entry in g.ls(src):
                    g.cp_a(f"{src}/{entry}", new + "/")
                g.umount(new)
                g.umount(src)
                status = g.fsck("vfat", fat_dev)
                if status != 0:
                    raise OperationFailed(f"fsck.fat reports problems on the rebuilt {what} (status {status})")
                notes.append(f"{what}: rebuilt as a {format_size(size)} FAT, files copied")
                continue
            if fs.startswith("ext"):
                g.e2fsck_f(dev)
                g.resize2fs_size(dev, size)
                status = g.fsck(fs, dev)
                if status != 0:
                    raise OperationFailed(f"e2fsck reports problems after shrinking {what} (status {status})")
            elif fs == "ntfs":
                g.ntfsresize_opts(dev, size=size)
            elif fs == "btrfs":
                g.mkmountpoint(f"/b{n}")
                g.mount(dev, f"/b{n}")
                g.btrfs_filesystem_resize(f"/b{n}", size=size)
                g.sync()
                g.umount(f"/b{n}")
                g.btrfs_fsck(dev)
            notes.append(f"{what}: shrunk to {format_size(size)}")
        except RuntimeError as e:
            raise OperationFailed(f"shrinking {what} failed: {first_line(e)[:300]}") from None
    g.sync()
    return {"notes": notes}


def main() -> int:
    """The child: one request per line on stdin (first: the drives and what to measure, then the
    resize jobs), one JSON reply per line on stdout."""
    from ..errors import ImgkitError
    from ..filesystems.guestfs_session import close_handle, first_line, new_handle
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # only replies on the pipe, whatever libguestfs prints
    g = None

    def reply(doc: dict) -> None:
        out.write(json.dumps(doc) + "\n")
        out.flush()
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                if g is None:
                    g, accel = new_handle()
                    g.add_drive_opts(request["overlay"], format="qcow2", readonly=0)
                    for path in request["fat_files"]:
                        g.add_drive_opts(path, format="raw", readonly=0)
                    g.launch()
                    reply(_measure(g, request))
                else:
                    reply(_resize(g, request))
            except ImgkitError as e:
                reply({"error": str(e), "hint": e.hint, "kind": type(e).__name__})
            except RuntimeError as e:  # the binding's errors outside a job
                reply({"error": f"the libguestfs appliance failed: {first_line(e)}"})
    finally:
        if g is not None:
            close_handle(g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
