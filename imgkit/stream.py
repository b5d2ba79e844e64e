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
    size: int = 0

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) clipped to the disk's end."""
        raise NotImplementedError

    def runs(self) -> Iterator[Run]:
        """Consecutive runs covering [0, size); the default says the whole disk is data."""
        if self.size:
            yield Run(DATA, 0, self.size)

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
    """A window [offset, offset+size) of another stream: a partition of a disk."""

    def __init__(self, base: Stream, offset: int, size: int):
        self.base, self.offset, self.size = base, offset, size

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return b""
        return self.base.read(self.offset + offset, min(length, self.size - offset))

    def runs(self) -> Iterator[Run]:
        lo, hi = self.offset, self.offset + self.size
        for r in self.base.runs():
            if r.end <= lo:
                continue
            if r.offset >= hi:
                break
            s, e = max(r.offset, lo), min(r.end, hi)
            yield Run(r.kind, s - lo, e - s)
