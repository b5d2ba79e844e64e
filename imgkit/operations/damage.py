"""restore --keep-going: a damaged chunk does not stop a restore. Its range is written as zeros,
and the report names each damaged range, the partition it lies in and, where the filesystem lets
imgkit tell (ext2/3/4 through debugfs icheck/ncheck on the restored target), the files it hit.

One job: tolerate and describe damage. The restore itself is restore.py's."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from dataclasses import asdict, dataclass

from ..errors import CorruptChunk
from ..stream import Stream

MAX_FILES_NAMED = 50  # per range: a damaged inode table could name thousands


class ZeroOnDamage(Stream):
    """A view of an image that reads a chunk failing its check as zeros and remembers where."""

    def __init__(self, image: Stream):
        self.image = image
        self.size = image.size
        self.chunk_size = image.unit_size or 1 << 20
        # What the image declares (stream.py), so that the caching reader cuts and reads this view
        # as it would the image: its chunks, in parallel, with as many reads in flight.
        self.unit_size, self.unit_phase = image.unit_size, image.unit_phase
        self.thread_safe, self.read_workers = image.thread_safe, image.read_workers
        self.metadata, self.format_name, self.mtime_ns = image.metadata, image.format_name, image.mtime_ns
        self._lock = threading.Lock()
        self._damaged: dict[int, int] = {}  # chunk start -> length

    # What else the image declares (stream.py): nothing reaches past this view to the image.
    image_id = property(lambda self: self.image.image_id)
    encrypted = property(lambda self: self.image.encrypted)
    used_maps = property(lambda self: self.image.used_maps)

    def raw_path(self) -> str | None:
        return self.image.raw_path()

    def read_sequentially(self) -> None:
        self.image.read_sequentially()

    def will_need(self, offset: int, length: int) -> None:
        self.image.will_need(offset, length)

    def paths(self) -> list[str]:
        return self.image.paths()

    def runs(self):
        return self.image.runs()

    def describe(self) -> dict:
        return self.image.describe()

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self.image.read(offset, length)
        except CorruptChunk:
            pass
        end = min(self.size, offset + length)
        parts, pos = [], offset
        while pos < end:  # chunk by chunk: only the damaged ones become zeros
            start = pos - pos % self.chunk_size
            stop = min(end, start + self.chunk_size)
            try:
                parts.append(self.image.read(pos, stop - pos))
            except CorruptChunk:
                with self._lock:
                    self._damaged[start] = min(self.chunk_size, self.size - start)
                parts.append(bytes(stop - pos))
            pos = stop
        return b"".join(parts)

    def damaged_ranges(self) -> list[tuple[int, int]]:
        """Merged (offset, length) ranges read as zeros."""
        out: list[list[int]] = []
        for start in sorted(self._damaged):
            length = self._damaged[start]
            if out and out[-1][0] + out[-1][1] == start:
                out[-1][1] += length
            else:
                out.append([start, length])
        return [(a, b) for a, b in out]


@dataclass
class DamagedRange:
    offset: int
    length: int
    partition: int | None = None      # None: outside every partition (or no partition table)
    filesystem: str | None = None
    files: list[str] | None = None    # None: not known (no ext filesystem, or debugfs could not tell)
    files_note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        where = f"partition {self.partition}" if self.partition is not None else "outside any partition"
        text = f"bytes {self.offset}..{self.offset + self.length - 1} ({where}"
        text += f", {self.filesystem})" if self.filesystem else ")"
        if self.files:
            text += ": " + ", ".join(self.files)
        elif self.files_note:
            text += f": {self.files_note}"
        return text


def _partitions(image: Stream) -> list[dict]:
    """Partitions from the image's metadata (authenticated, and intact even when the chunk holding
    the partition table is the damaged one)."""
    table = (image.metadata or {}).get("partition_table") or {}
    return [p for p in table.get("partitions") or [] if isinstance(p.get("start"), int)]


def report(image: Stream, ranges: list[tuple[int, int]], target: str) -> list[DamagedRange]:
    """Describe damaged ranges after `target` was restored (with zeros in them)."""
    parts = _partitions(image)
    out: list[DamagedRange] = []
    for offset, length in ranges:
        pieces = []  # cut each range at partition edges
        pos, end = offset, offset + length
        for p in sorted(parts, key=lambda p: p["start"]):
            lo, hi = max(pos, p["start"]), min(end, p["start"] + p["size"])
            if lo < hi:
                if lo > pos:
                    pieces.append(DamagedRange(pos, lo - pos))
                pieces.append(DamagedRange(lo, hi - lo, p["number"], p.get("filesystem")))
                pos = hi
        if pos < end:
            table = (image.metadata or {}).get("partition_table") or {}
            fs = table.get("filesystem") if not parts else None
            pieces.append(DamagedRange(pos, end - pos, None, fs))
        out.extend(pieces)
    by_number = {p["number"]: p for p in parts}
    for r in out:
        fs = (r.filesystem or "")
        if fs.startswith("ext"):
            start = by_number[r.partition]["start"] if r.partition is not None else 0
            r.files, r.files_note = ext_files(target, start, r.offset - start, r.length)
    return out


def ext_files(target: str, fs_offset: int, offset: int, length: int) -> tuple[list[str] | None, str | None]:
    """The files of the ext filesystem at byte `fs_offset` of `target` whose blocks lie in
    [offset, offset + length) of the filesystem: debugfs icheck (block -> inode) and ncheck (inode ->
    path), read-only (debugfs opens read-only by default), on the restored target."""
    debugfs = shutil.which("debugfs")
    if debugfs is None:
        return None, "files unknown (debugfs, e2fsprogs, is not installed)"
    device = f"{target}?offset={fs_offset}" if fs_offset else target
    try:
        stats = _debugfs(debugfs, device, "stats")
        m = re.search(r"^Block size:\s+(\d+)", stats, re.M)
        if not m:
            return None, "files unknown (the filesystem's superblock is unreadable: damaged?)"
        bs = int(m.group(1))
        first, last = offset // bs, (offset + length - 1) // bs
        blocks = " ".join(str(b) for b in range(first, last + 1))
        inodes = set()
        for line in _debugfs(debugfs, device, f"icheck {blocks}").splitlines()[1:]:
            fields = line.split()
            if len(fields) == 2 and fields[1].isdigit():
                inodes.add(int(fields[1]))
        if not inodes:
            return [], "no file uses these blocks (free space or filesystem metadata)"
        names = []
        listing = _debugfs(debugfs, device, "ncheck -c " + " ".join(str(i) for i in sorted(inodes)[:MAX_FILES_NAMED]))
        for line in listing.splitlines()[1:]:
            fields = line.split(None, 1)
            if len(fields) == 2 and fields[0].isdigit():
                names.append("/" + fields[1].strip().lstrip("/"))  # debugfs prints "//name" for the root
        more = len(inodes) - MAX_FILES_NAMED
        return sorted(set(names)), (f"and {more} more inodes" if more > 0 else None)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"files unknown (debugfs: {e})"


def _debugfs(debugfs: str, device: str, request: str) -> str:
    proc = subprocess.run([debugfs, "-R", request, device], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, LC_ALL="C"))
    return proc.stdout
