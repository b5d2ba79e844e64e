"""The one read engine: every view of an image reads its bytes through a CachingReader over a Stream.

The mount (vfs + the FUSE adapter), the NBD export (convert to qcow2/VHD/..., boot-check), restore and
convert to raw all read here, whatever the stream is (an imgk image, a raw file or device, a foreign
image read through qemu, a partition of any of them). Nothing else caches decoded bytes or reads
ahead. What the engine does, once:

- the unit walk: a read is cut where the stream's units are (an imgk chunk; 1 MiB for streams without
  units of their own), so a read never decodes a unit twice and holes cost nothing;
- the byte-bounded, single-flight cache (chunk_cache.ChunkCache) of decoded units;
- per-handle sequential detection (ReadHandle: a FUSE file handle, an NBD connection) and read-ahead
  of the next units on worker threads, after a kernel hint (Stream.will_need) for their stored bytes,
  so decoding runs ahead of the reader, in parallel, aligned to the units it will ask for;
- the "answer inline" rule (is_cheap / read_if_cached): a read that is only cache hits, holes and at
  most one small unit is answered on the caller's thread, where a hand-off to a worker would cost
  more than the read (a FUSE request loop, an NBD connection thread);
- bulk reads in order on a thread pool (map_pieces), with the kernel told what comes next.

A stream that is not thread-safe (Stream.thread_safe False) is read under one lock; every stream of
imgkit's own (imgk, raw, qemu-backed) is thread-safe, so foreign images are read in parallel too.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from .chunk_cache import ChunkCache
from ..errors import ImgkitError
from ..platform.parallel import default_workers, ordered_map
from ..stream import Run, Stream

DEFAULT_UNIT = 1 << 20  # streams without units of their own are cached and read ahead in 1 MiB pieces
INLINE_MAX_UNITS = 32  # a 1 MiB read of 64 KiB chunks, found in the cache, is joined in place
_ZEROS = memoryview(bytes(1 << 20)).toreadonly()  # holes, as read_buffer() answers them (up to a FUSE request)


class CachingReader(Stream):
    """A thread-safe, caching view of `stream` (itself a Stream: it can be handed to anything that
    reads one). `cache_bytes` bounds the decoded units kept; `workers` threads read ahead, at most
    `read_ahead_bytes` ahead of a sequential reader (default: what the stream declares).
    Closing the reader stops its read-ahead; the stream stays open (its owner closes it)."""

    def __init__(self, stream: Stream, cache_bytes: int = 32 << 20, workers: int | None = None,
                 read_ahead_bytes: int | None = None):
        self.stream = stream
        self.size = stream.size
        self.unit_size = stream.unit_size or DEFAULT_UNIT
        self.unit_phase = stream.unit_phase if stream.unit_size else 0
        self.thread_safe = True
        self.format_name, self.metadata = stream.format_name, stream.metadata
        self.mtime_ns, self.read_workers = stream.mtime_ns, stream.read_workers
        # Read-ahead never wants more than half the cache: what it decodes must still be there when
        # the reader arrives.
        wanted = stream.read_ahead_bytes if read_ahead_bytes is None else read_ahead_bytes
        self.read_ahead_bytes = max(0, min(wanted, cache_bytes // 2))
        self.cache = ChunkCache(cache_bytes)
        self._load_lock = None if stream.thread_safe else threading.Lock()
        self._workers = max(1, workers or default_workers())
        self._pool: ThreadPoolExecutor | None = None
        self._queued: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.units_read_ahead = 0

    # -- units ------------------------------------------------------------------------------------
    def unit_of(self, pos: int) -> int:
        return (pos + self.unit_phase) // self.unit_size

    def span(self, i: int) -> tuple[int, int]:
        return self.stream.unit_span(i, self.unit_size)

    def _load(self, i: int) -> bytes:
        if self._load_lock is None:
            return self.stream.read_unit(i, self.unit_size)
        with self._load_lock:
            return self.stream.read_unit(i, self.unit_size)

    def unit_is_stored(self, i: int) -> bool:
        return self.stream.unit_is_stored(i)

    def unit_is_cheap(self, i: int) -> bool:
        return not self.stream.unit_is_stored(i) or self.cache.cached(i) or self.stream.unit_is_cheap(i)

    def read_unit(self, i: int, unit: int | None = None) -> bytes:
        if self.stream.unit_is_stored(i):
            return self.cache.get(i, self._load)
        start, end = self.span(i)
        return bytes(end - start)

    # -- reads ------------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0 or offset < 0:
            return b""
        end = min(self.size, offset + length)
        if not self.cache.max_bytes and not self.stream.unit_size:
            # Nothing to cache and no units to align to (a front-to-back copy of a raw or foreign
            # disk): the stream's own read, without cutting it into pieces and joining them again.
            if self._load_lock is None:
                return self.stream.read(offset, end - offset)
            with self._load_lock:
                return self.stream.read(offset, end - offset)
        parts = self._pieces(offset, end, False)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_buffer(self, offset: int, length: int) -> bytes | memoryview:
        """The bytes of read(offset, length), not copied when they lie in one unit: a read-only view
        into the cached unit (or into a shared buffer of zeros for a hole). For a server that only
        hands them on (the FUSE adapter's reply): a 1 MiB answer out of a 2 MiB chunk then costs no
        1 MiB allocation and copy. Reads spanning units are joined, as read() does."""
        if offset >= self.size or length <= 0 or offset < 0:
            return b""
        end = min(self.size, offset + length)
        if not self.cache.max_bytes and not self.stream.unit_size:
            return self.read(offset, length)
        parts = self._pieces(offset, end, True)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _pieces(self, offset: int, end: int, views: bool) -> list:
        """The pieces of [offset, end), one a unit: bytes, or with `views` memoryviews where a piece
        is part of a unit or a hole."""
        parts = []
        pos = offset
        while pos < end:
            i = self.unit_of(pos)
            start, stop = self.span(i)
            piece_end = min(end, stop)
            whole = pos == start and piece_end == stop
            if not self.stream.unit_is_stored(i):
                n = piece_end - pos
                parts.append(_ZEROS[:n] if views and n <= len(_ZEROS) else bytes(n))
            else:
                # Single-flight with read-ahead and other readers; with cache_bytes 0, a plain load.
                data = self.cache.get(i, self._load)
                if not whole:
                    data = memoryview(data)[pos - start:piece_end - start] if views else data[pos - start:piece_end - start]
                parts.append(data)
            pos = piece_end
        return parts

    def read_if_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes of [offset, offset+length) when they lie in one unit that is cached or a hole,
        else None; never loads. Lets a server answer small reads on its own thread."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            return None
        i = self.unit_of(offset)
        start, stop = self.span(i)
        if offset + length > stop:
            return None
        if not self.stream.unit_is_stored(i):
            return bytes(length)
        data = self.cache.peek(i)
        return None if data is None else data[offset - start:offset - start + length]

    def is_cheap(self, offset: int, length: int) -> bool:
        """Whether read(offset, length) is only cache hits, holes and at most one cheap unit to load,
        so doing it on the caller's thread costs less than handing it to a worker. A unit another
        thread is still loading is not cheap: the caller (a FUSE loop) would wait for it."""
        if length <= 0 or offset >= self.size:
            return True
        first, last = self.unit_of(offset), self.unit_of(min(self.size, offset + length) - 1)
        if last - first >= INLINE_MAX_UNITS:
            return False
        to_load = 0
        for i in range(first, last + 1):
            if self.stream.unit_is_stored(i) and not self.cache.cached(i):
                to_load += 1
                if to_load > 1 or not self.stream.unit_is_cheap(i):
                    return False
        return True

    # -- read-ahead -------------------------------------------------------------------------------
    def read_ahead(self, offset: int, length: int) -> None:
        """Start loading the stored units of [offset, offset+length) on worker threads (those neither
        cached nor already being loaded); returns at once. Load errors are left for the read that
        needs the unit."""
        if self.read_ahead_bytes <= 0 or self._closed or offset >= self.size or length <= 0:
            return
        first, last = self.unit_of(offset), self.unit_of(min(self.size, offset + length) - 1)
        wanted = []
        with self._lock:
            if self._closed:
                return
            for i in range(first, last + 1):
                if i in self._queued or not self.stream.unit_is_stored(i) or i in self.cache:
                    continue
                self._queued.add(i)
                wanted.append(i)
            if not wanted:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="imgkit-read-ahead")
            pool = self._pool
        lo, hi = self.span(wanted[0])[0], self.span(wanted[-1])[1]
        self.stream.will_need(lo, hi - lo)  # the disk reads start now, the decoders find them cached
        for i in wanted:
            try:
                fut = pool.submit(self._load_ahead, i)
            except RuntimeError:  # closing
                with self._lock:
                    self._queued.difference_update(wanted)
                return
            fut.add_done_callback(lambda _f, i=i: self._unqueue(i))

    def _load_ahead(self, i: int) -> None:
        try:
            self.cache.get(i, self._load)
            self.units_read_ahead += 1
        except ImgkitError:
            pass

    def _unqueue(self, i: int) -> None:
        with self._lock:
            self._queued.discard(i)

    def handle(self, start: int = 0, size: int | None = None, *, eager: bool = False) -> "ReadHandle":
        """A reader's position over [start, start+size) of the stream (a file of the mount, an NBD
        connection). `eager`: read ahead after every read (a bulk reader such as qemu-img, whose many
        requests in flight arrive out of order and skip holes)."""
        return ReadHandle(self, start, self.size - start if size is None else size, eager)

    # -- bulk -------------------------------------------------------------------------------------
    def map_pieces(self, pieces: Iterable[tuple[int, int]], workers: int | None = None) -> Iterator[tuple[tuple[int, int], bytes]]:
        """((offset, length), bytes) for each piece, in order, read on `workers` threads; the kernel is
        told about each piece as it is queued, a few ahead of the workers. Pieces cut at unit
        boundaries (cut_pieces) never make one unit load twice."""
        def queued():
            for p in pieces:
                self.stream.will_need(*p)
                yield p
        return ordered_map(lambda p: (p, self.read(*p)), queued(), workers or self.stream.read_workers)

    def cut_pieces(self, runs: Iterable[Run], kinds: set[str], piece: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) pieces of at most `piece` bytes (default: one unit) covering the runs of
        the given kinds, cut where the units are cut."""
        piece = piece or self.unit_size
        phase = self.unit_phase
        for run in runs:
            if run.kind not in kinds:
                continue
            pos = run.offset
            while pos < run.end:
                n = min(run.end - pos, piece - (phase + pos) % piece)
                yield pos, n
                pos += n

    # -- the rest of Stream -------------------------------------------------------------------------
    def runs(self) -> Iterator[Run]:
        return self.stream.runs()

    def will_need(self, offset: int, length: int) -> None:
        self.stream.will_need(offset, length)

    def describe(self) -> dict:
        return self.stream.describe()

    def paths(self) -> list[str]:
        return self.stream.paths()

    def read_sequentially(self) -> None:
        self.stream.read_sequentially()

    def clear(self) -> None:
        """Drop every cached unit (after probing reads that a long-lived reader will not repeat)."""
        self.cache.clear()

    def close(self) -> None:
        """Stop reading ahead: queued loads are dropped, running ones waited for, so none reads a
        stream its owner is about to close."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class ReadHandle:
    """One reader's position: consecutive reads that start near where the previous ones ended are
    sequential, and a sequential reader gets what follows loaded ahead of it (a window growing to
    read_ahead_bytes). Near, not exactly at: qemu-img keeps several requests in flight and they
    arrive slightly out of order."""

    def __init__(self, reader: CachingReader, start: int, size: int, eager: bool):
        self.reader, self.start, self.size = reader, start, max(0, size)
        self._frontier: int | None = None  # where the furthest read so far ended
        self._eager = eager
        self._lock = threading.Lock()
        self.sequential = 0

    def read(self, offset: int, length: int) -> bytes:
        return self._read(offset, length, self.reader.read)

    def read_buffer(self, offset: int, length: int) -> bytes | memoryview:
        """read(), without copying what lies in one unit (CachingReader.read_buffer)."""
        return self._read(offset, length, self.reader.read_buffer)

    def _read(self, offset: int, length: int, fetch):
        """Clip to the handle, read through `fetch` (the reader's read or read_buffer), note it."""
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        data = fetch(self.start + offset, length)
        self.note(offset, length)
        return data

    def is_cheap(self, offset: int, length: int) -> bool:
        return self.reader.is_cheap(self.start + offset, min(length, max(0, self.size - offset)))

    def read_if_cached(self, offset: int, length: int) -> bytes | None:
        if offset + length > self.size:
            return None
        return self.reader.read_if_cached(self.start + offset, length)

    def note(self, offset: int, length: int) -> None:
        """Record a read of [offset, offset+length) (relative to the handle) and read ahead if the
        reader is sequential."""
        r = self.reader
        slack = max(r.read_ahead_bytes, 16 * length)
        with self._lock:
            if self._eager:
                near = True  # a bulk reader: whatever it reads, it reads what follows next
            elif self._frontier is None:
                near = False
            else:
                near = self._frontier - slack <= offset <= self._frontier + r.unit_size
            self.sequential = self.sequential + 1 if near else 0
            end = offset + length
            self._frontier = max(self._frontier, end) if near and self._frontier is not None else end
            frontier = self._frontier
            ahead = self.read_ahead_window(length)
        if ahead and frontier < self.size:
            r.read_ahead(self.start + frontier, min(ahead, self.size - frontier))

    def read_ahead_window(self, length: int) -> int:
        """How far past the frontier to read ahead after a read of `length`: nothing for a reader
        not (yet) sequential; then twice the read (at least two units), doubling with each further
        sequential read up to the reader's read_ahead_bytes, as the kernel ramps its own window. A
        reader that goes on sequentially gets decoding far enough ahead to keep every worker busy
        through the pauses of its own side (a mount: the kernel copying pages, `dd` writing), one
        that stops after two reads costs little decoding for nothing."""
        if self.sequential < 1:
            return 0
        r = self.reader
        return min(r.read_ahead_bytes, (2 * max(length, r.unit_size)) << min(self.sequential - 1, 16))
