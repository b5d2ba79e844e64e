"""Is a block device safe to overwrite? Mounted (mountinfo), in use (holders, O_EXCL), or the device
an image is read from. Linux-specific: reads /proc/self/mountinfo, /proc/swaps and /sys/dev/block."""
from __future__ import annotations

import os
import stat

from .blockdev import holders, loop_backing_file, mounts, partitions, whole_disk
from .errors import RefusedTarget


def device_family(dev: int) -> set[int]:
    """The device itself, its partitions, and (for a partition) its whole disk."""
    return {dev, whole_disk(dev), *partitions(dev).values()}


def check_block_target_free(path: str, rdev: int) -> None:
    """Refuse a device that is mounted, used as swap, or held by another device (LVM, RAID, dm);
    for a whole disk, the same for each of its partitions."""
    devices = {rdev, *partitions(rdev).values()}  # a partition has none of its own
    mounted = mounts()
    for d in devices:
        if d in mounted:
            raise RefusedTarget(f"{path} is mounted (on {mounted[d]})", hint="unmount it first")
        held = holders(d)
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


def refuse_image_on_target(image_paths: list[str], target_path: str, target_rdev: int) -> None:
    """Refuse restoring onto the device (or a partition of it) that holds the image being read,
    or onto a loop device backed by the image file itself."""
    family = device_family(target_rdev)
    for p in image_paths:
        st = os.stat(p)
        if stat.S_ISBLK(st.st_mode) and (st.st_rdev in family or whole_disk(st.st_rdev) in family):
            raise RefusedTarget(f"{target_path} is the device being read ({p})",
                                hint="restore to another disk")
        if st.st_dev in family:
            raise RefusedTarget(f"{target_path} holds the image being read ({p})",
                                hint="restore to another disk")
        backing = loop_backing_file(target_rdev)
        try:
            if backing and os.path.samefile(backing, p):
                raise RefusedTarget(f"{target_path} is a loop device backed by the image itself")
        except OSError:
            pass


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
