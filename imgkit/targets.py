"""Is a block device safe to overwrite? Mounted (mountinfo), in use (holders, O_EXCL), or the device
an image is read from. Linux-specific: reads /proc/self/mountinfo, /proc/swaps and /sys/dev/block."""
from __future__ import annotations

import os
import stat

from .errors import RefusedTarget


def _sys_dir(dev: int) -> str:
    return os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")


def _dev_of(sys_dir: str) -> int | None:
    try:
        with open(os.path.join(sys_dir, "dev")) as f:
            major, minor = f.read().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def device_family(dev: int) -> set[int]:
    """The device itself, its partitions, and (for a partition) its whole disk."""
    family = {dev}
    base = _sys_dir(dev)
    if os.path.exists(os.path.join(base, "partition")):
        parent = _dev_of(os.path.dirname(base))
        if parent is not None:
            family.add(parent)
    try:
        for entry in os.listdir(base):
            sub = os.path.join(base, entry)
            if os.path.exists(os.path.join(sub, "partition")):
                d = _dev_of(sub)
                if d is not None:
                    family.add(d)
    except OSError:
        pass
    return family


def mounted_devices() -> dict[int, str]:
    """device number -> a mount point, from /proc/self/mountinfo (field 3 is major:minor)."""
    out: dict[int, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                major, minor = fields[2].split(":")
                out.setdefault(os.makedev(int(major), int(minor)), fields[4])
    except OSError:
        pass
    return out


def check_block_target_free(path: str, rdev: int) -> None:
    """Refuse a device that is mounted, used as swap, or held by another device (LVM, RAID, dm);
    for a whole disk, the same for each of its partitions."""
    devices = {rdev} | _children(rdev)
    mounts = mounted_devices()
    for d in devices:
        if d in mounts:
            raise RefusedTarget(f"{path} is mounted (on {mounts[d]})", hint="unmount it first")
        try:
            held = os.listdir(os.path.join(_sys_dir(d), "holders"))
        except OSError:
            held = []
        if held:
            raise RefusedTarget(f"{path} is in use by {', '.join(held)}", hint="stop what holds it first")
    try:
        with open("/proc/swaps") as f:
            swaps = [line.split()[0] for line in list(f)[1:]]
    except OSError:
        swaps = []
    for name in swaps:
        try:
            if os.stat(name).st_rdev in devices:
                raise RefusedTarget(f"{path} is used as swap", hint="swapoff it first")
        except FileNotFoundError:
            pass


def _is_partition(dev: int) -> bool:
    return os.path.exists(os.path.join(_sys_dir(dev), "partition"))


def _children(dev: int) -> set[int]:
    """The partitions of a whole disk (none for a partition)."""
    return set() if _is_partition(dev) else device_family(dev) - {dev}


def refuse_image_on_target(image_paths: list[str], target_path: str, target_rdev: int) -> None:
    """Refuse restoring onto the device (or a partition of it) that holds the image being read,
    or onto a loop device backed by the image file itself."""
    family = device_family(target_rdev)
    for p in image_paths:
        st = os.stat(p)
        if st.st_dev in family:
            raise RefusedTarget(f"{target_path} holds the image being read ({p})",
                                hint="restore to another disk")
        backing = os.path.join(_sys_dir(target_rdev), "loop", "backing_file")
        try:
            with open(backing) as f:
                if os.path.samefile(f.read().strip(), p):
                    raise RefusedTarget(f"{target_path} is a loop device backed by the image itself")
        except (OSError, ValueError):
            pass


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
