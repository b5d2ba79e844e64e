"""The core abstraction: a read-only disk of `size` bytes with read(offset, length) and runs().

Everything that copies, converts, mounts or boots an image sees it only through this interface, so a
new container format or a new view is one new module. runs() lets every consumer stay sparse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

DATA = "data"
ZERO = "zero"
FREE = "free"  # unused by the filesystem: reads as zeros, need not be written


@dataclass(frozen=True)
class Run:
    kind: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class Stream:
    """A read-only disk. Besides read() and runs(), a stream declares what it offers, so that the one
    caching reader (imgkit/views/caching_reader.py) never has to probe for attributes. The defaults here
    describe the plainest stream: byte-addressable, no stored units, not safe to read from several
    threads, nothing cheap, no hint to give the kernel."""

    size: int = 0
    # The units the stream stores, decodes and hashes (an imgk image's chunks), 0 when it has none:
    # a read of part of a unit costs the whole unit, so the reader caches and reads ahead in units.
    unit_size: int = 0
    # Where this stream's byte 0 lies inside its first unit (a partition of a chunked image starts
    # mid-chunk): unit i covers [i*unit_size - unit_phase, (i+1)*unit_size - unit_phase).
    unit_phase: int = 0
    # Whether read()/read_unit() may run on several threads at once (otherwise the reader serialises).
    thread_safe: bool = False
    # How far ahead of a sequential reader decoding pays (0: never read ahead).
    read_ahead_bytes: int = 4 << 20
    # The container format when the stream knows it ("imgk", "qcow2", ...); None for plain bytes.
    format_name: str | None = None
    # What the image records about itself (an imgk image's metadata); None for a bare disk.
    metadata: dict | None = None
    # When the image was last written (ns since the epoch), if the stream knows.
    mtime_ns: int | None = None
    # Reads worth keeping in flight for a bulk pass (an image in S3: several GETs); None: one a core.
    read_workers: int | None = None
    # The id the image records for itself (an imgk image's 128-bit image id); None when it has none.
    image_id: bytes | None = None
    # Whether the image's data is encrypted (an output in clear from it then needs --decrypt).
    encrypted: bool = False
    # The filesystems' used-block maps the image stored at capture (imgk USED_MAP sections); None
    # when it stored none.
    used_maps: list | None = None

    def read_sequentially(self) -> None:
        """A hint: the caller is about to read everything in order (an image in S3 is then fetched in
        large windows instead of one request a chunk). No-op here."""

    def paths(self) -> list[str]:
        """The files that hold this stream's bytes (every volume of a split image), so that nothing
        is ever written over its own source. Empty when the stream does not know."""
        return []

    def raw_path(self) -> str | None:
        """The local file or block device whose bytes this stream is, as they are (partclone and the
        mounted-filesystem checks may then use it directly); None for anything decoded."""
        return None

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) clipped to the disk's end."""
        raise NotImplementedError

    def runs(self) -> Iterator[Run]:
        """Consecutive runs covering [0, size); the default says the whole disk is data."""
        if self.size:
            yield Run(DATA, 0, self.size)

    # -- units (for the caching reader) ---------------------------------------------------------
    def unit_span(self, i: int, unit: int | None = None) -> tuple[int, int]:
        """[start, end) of unit i in this stream's bytes (`unit`: the reader's unit for a stream
        without its own)."""
        unit = unit or self.unit_size
        phase = self.unit_phase if self.unit_size else 0
        return max(0, i * unit - phase), min(self.size, (i + 1) * unit - phase)

    def read_unit(self, i: int, unit: int | None = None) -> bytes:
        """The bytes of unit i, verified. The default reads them; streams with stored units decode one."""
        start, end = self.unit_span(i, unit)
        return self.read(start, end - start)

    def unit_is_stored(self, i: int) -> bool:
        """False when unit i is known to read as zeros without any work (a hole): not worth caching."""
        return True

    def unit_is_cheap(self, i: int) -> bool:
        """Whether loading unit i costs less than handing the read to a worker thread (a small
        stored chunk: tens of microseconds)."""
        return False

    def will_need(self, offset: int, length: int) -> None:
        """A hint: [offset, offset+length) will be read soon (start the disk reads now). No-op here."""

    def describe(self) -> dict:
        """What the source is, for metadata and `info`."""
        return {"kind": "stream", "size": self.size}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_runs(runs) -> Iterator[Run]:
    """Join adjacent runs of the same kind."""
    pending: Run | None = None
    for r in runs:
        if r.length == 0:
            continue
        if pending and pending.kind == r.kind and pending.end == r.offset:
            pending = Run(r.kind, pending.offset, pending.length + r.length)
        else:
            if pending:
                yield pending
            pending = r
    if pending:
        yield pending


class SliceStream(Stream):
    """A window [offset, offset+size) of another stream: a partition of a disk. Its units are the base
    stream's units seen through the window, so a partition starting mid-chunk still reads whole chunks."""

    def __init__(self, base: Stream, offset: int, size: int):
        self.base, self.offset, self.size = base, offset, size
        self.unit_size = base.unit_size
        self.unit_phase = (base.unit_phase + offset) % base.unit_size if base.unit_size else 0
        self.thread_safe = base.thread_safe
        self.read_ahead_bytes = base.read_ahead_bytes
        self.read_workers = base.read_workers

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return b""
        return self.base.read(self.offset + offset, min(length, self.size - offset))

    def _base_unit(self, i: int) -> int:
        """The base stream's unit holding this window's unit i (the same bytes, or a part of them)."""
        start = self.offset + max(0, i * self.unit_size - self.unit_phase)
        return (start + self.base.unit_phase) // self.unit_size

    def read_unit(self, i: int, unit: int | None = None) -> bytes:
        if not self.unit_size:
            return super().read_unit(i, unit)
        start, end = self.unit_span(i)
        j = self._base_unit(i)
        bstart, _ = self.base.unit_span(j)
        data = self.base.read_unit(j)
        lo = self.offset + start - bstart
        return data[lo:lo + end - start]

    def unit_is_stored(self, i: int) -> bool:
        return self.base.unit_is_stored(self._base_unit(i)) if self.unit_size else True

    def unit_is_cheap(self, i: int) -> bool:
        return self.base.unit_is_cheap(self._base_unit(i)) if self.unit_size else False

    def will_need(self, offset: int, length: int) -> None:
        if offset < self.size:
            self.base.will_need(self.offset + offset, min(length, self.size - offset))

    def describe(self) -> dict:
        return {"kind": "slice", "offset": self.offset, "size": self.size, "of": self.base.describe()}

    def paths(self) -> list[str]:
        return self.base.paths()

    def read_sequentially(self) -> None:
        self.base.read_sequentially()

    def runs(self) -> Iterator[Run]:
        lo, hi = self.offset, self.offset + self.size
        for r in self.base.runs():
            if r.end <= lo:
                continue
            if r.offset >= hi:
                break
            s, e = max(r.offset, lo), min(r.end, hi)
            yield Run(r.kind, s - lo, e - s)
