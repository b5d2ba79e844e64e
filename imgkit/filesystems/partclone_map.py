"""Used blocks of XFS and btrfs from partclone's domain map (`partclone.<fs> -D`): their allocation
data lives in B-trees (XFS free-space btrees, the btrfs extent tree) that a well-kept tool already
walks. partclone needs a device, so the partition is exposed read-only through a loop device
(`losetup -r -o OFFSET --sizelimit SIZE`), detached afterwards. Needs root and a file or device source.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from .usedmap import NotUsable, UsedBlocks, set_range

MAP_BLOCK = 4096
TIMEOUT = 300


def _parse_domain(text: str, size: int) -> bytearray:
    count = size // MAP_BLOCK
    bitmap = bytearray(-(-count // 8))
    for line in text.splitlines():
        fields = line.split()
        if line.startswith("#") or len(fields) != 3 or fields[2] != "+":
            continue
        try:
            pos, length = int(fields[0], 16), int(fields[1], 16)
        except ValueError:
            raise NotUsable(f"partclone domain map has a bad line: {line[:60]!r}") from None
        if pos < 0 or length < 0 or pos + length > size:
            raise NotUsable("partclone domain map names bytes past the end of the partition")
        first = pos // MAP_BLOCK
        set_range(bitmap, first, -(-(pos + length) // MAP_BLOCK) - first)
    return bitmap


def used_blocks(fs: str, path: str | None, offset: int, size: int) -> UsedBlocks:
    tool = shutil.which(f"partclone.{fs}")
    if tool is None:
        raise NotUsable(f"{fs}: partclone.{fs} is not installed (apt install partclone)")
    if path is None:
        raise NotUsable(f"{fs}: the map comes from partclone, which needs a file or device source")
    if os.geteuid() != 0:
        raise NotUsable(f"{fs}: reading the map with partclone needs root (a loop device)")
    try:
        loop = subprocess.run(["losetup", "-r", "-f", "--show", "-o", str(offset), "--sizelimit", str(size),
                               path], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NotUsable(f"{fs}: losetup failed ({e})") from None
    if loop.returncode != 0:
        raise NotUsable(f"{fs}: losetup failed: {loop.stderr.strip()[:200]}")
    device = loop.stdout.strip()
    try:
        with tempfile.TemporaryDirectory(prefix="imgkit-domain-") as tmp:
            out = os.path.join(tmp, "domain")
            proc = subprocess.run([tool, "-D", "-q", "-s", device, "-o", out, "-L", os.path.join(tmp, "log")],
                                  capture_output=True, text=True, timeout=TIMEOUT)
            if proc.returncode != 0 or not os.path.exists(out):
                raise NotUsable(f"{fs}: partclone.{fs} could not map the filesystem (exit {proc.returncode})")
            with open(out) as f:
                text = f.read(64 << 20)
    except subprocess.TimeoutExpired:
        raise NotUsable(f"{fs}: partclone.{fs} took longer than {TIMEOUT} s") from None
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)
    count = size // MAP_BLOCK
    return UsedBlocks(fs, MAP_BLOCK, 0, count, _parse_domain(text, count * MAP_BLOCK))
