"""Which operating system a disk holds, from /etc/os-release (os-release(5)) on its ext2/3/4
partitions, read by imgkit's own bounded ext reader: no appliance, no mount, so `info` stays fast.
Other filesystems are not inspected (docs/capture.md)."""
from __future__ import annotations

import shlex
import struct

from .boot_files import _Ext
from ..stream import SliceStream, Stream


def parse_os_release(text: str) -> dict:
    out = {}
    for line in text.splitlines()[:200]:
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            continue
        try:
            words = shlex.split(value, comments=False, posix=True)
        except ValueError:
            continue
        out[key.strip()] = (words[0] if words else "")[:200]
    return out


def detect_os(disk: Stream, partition_table: dict) -> dict | None:
    """{"name", "id", "version_id", "partition"} of the first ext partition with an os-release."""
    candidates = [(p["number"], p["start"], p["size"]) for p in partition_table.get("partitions", [])
                  if (p.get("filesystem") or "").startswith("ext")]
    if partition_table.get("type") == "none" and (partition_table.get("filesystem") or "").startswith("ext"):
        candidates.append((None, 0, disk.size))
    for number, start, size in candidates:
        if start + size > disk.size:
            continue
        try:
            fs = _Ext(SliceStream(disk, start, size))
            raw = fs.read_file("/etc/os-release") or fs.read_file("/usr/lib/os-release")
        except (ValueError, struct.error, IndexError):
            continue
        if raw:
            info = parse_os_release(raw.decode("utf-8", "replace"))
            if info:
                return {"name": info.get("PRETTY_NAME") or info.get("NAME"), "id": info.get("ID"),
                        "version_id": info.get("VERSION_ID"), "partition": number}
    return None
