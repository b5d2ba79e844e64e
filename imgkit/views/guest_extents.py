"""Files of ext filesystems read from the image itself, where the appliance said their blocks are.

Moving every file's bytes through the appliance (FUSE -> helper pipe -> appliance pread -> the
appliance reading our own disk.raw) costs ~0.8 ms per small file and ~100 MB/s under TCG. The
appliance still parses the filesystem (no filesystem is parsed by the host: docs/mount.md), but for
ext2/3/4 it tells us where each regular file's data lies (debugfs extent maps, bounded by
imgkit.filesystems.ext_extents) and the files view reads those byte ranges through the disk's
caching reader, the engine that serves disk.raw.

One debugfs run costs ~0.1 s plus ~0.25 ms an inode under TCG, so files are mapped in batches: the
appliance lists the inode numbers and sizes of the filesystem's regular files once (numbers only),
and a read that misses maps every listed regular file in the aligned window of inode numbers around
it (ext4 gives neighbouring numbers to files made together: ~16 runs map input F's 14,478 files).
Only inodes the appliance's own mounted filesystem reports as regular files are ever asked for (a
free inode may hold stale extents), and a map is used only for a file of the listing whose inode
and size it was made for.

Anything unexpected sends a file, or a whole filesystem, back to the appliance's pread: `read`
returns None and the caller reads through the appliance as before.
"""
from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from typing import Callable

from ..errors import ImgkitError
from ..filesystems.ext_extents import (END_MARK, ExtentMap, ExtFacts, eligibility, parse_maps, regular_files,
                                       uint_or_none)
from .caching_reader import CachingReader

log = logging.getLogger("imgkit.files.extents")
WINDOW = 2048  # inode numbers mapped together
MIN_BATCH = 64  # a failed or cut run (output past the appliance's limit) is retried in halves down to this many
MAX_MAP_BYTES = 16 << 20  # memory of cached maps (~190 bytes a file): least recently used dropped
MIN_MAP_BYTES = 1 << 20  # ... and at least this, whatever the cache size
MAX_KNOWN = 200_000  # regular files remembered per filesystem (~100 bytes each); past it, mapped on demand
READ_AHEAD = 8 << 20  # how far past a read of a big file the disk reader starts decoding
PREFETCH_MAX_FILES = 50_000  # maps of this many files (~190 bytes each) stay well inside MAX_MAP_BYTES
MAP_BYTES_PER_FILE = 190  # what one file's cached map costs, typically (one extent)


class _Fs:
    """One eligible filesystem: its facts and the regular files it is known to hold (changed and
    read under GuestExtents._lock)."""

    def __init__(self, facts: ExtFacts):
        self.facts = facts
        self.known: dict[int, dict[int, int]] = {}  # window -> {inode: size}
        self.count = 0
        self.prefetching = False

    def note(self, ino: int, size: int) -> None:
        window = self.known.setdefault(ino // WINDOW, {})
        if ino not in window and self.count < MAX_KNOWN:
            window[ino] = size
            self.count += 1


class GuestExtents:
    """Extent maps of the files view's ext filesystems, and reads through them. Thread-safe: FUSE
    worker threads call `read` concurrently; one debugfs run serves all readers of a window
    (single-flight), and maps are kept in a byte-bounded LRU."""

    def __init__(self, disk: CachingReader, backend: Callable[[], object], areas: dict[str, tuple[int, int]],
                 max_map_bytes: int | None = None):
        self.disk = disk
        self._backend = backend  # the FilesBackend, started on first use (ImageTree.files)
        self._areas = dict(areas)  # fs -> (start, size) of its partition on the disk, from the table
        self._fs: dict[str, _Fs | None] = {}
        self._fs_number = {fs: k for k, fs in enumerate(sorted(self._areas))}
        # Keyed by one int (filesystem number << 32 | inode), each map packed into one bytes object
        # (None: refused): ~190 bytes a file where a tuple key, an ExtentMap and its array took ~400.
        self._maps: OrderedDict[int, bytes | None] = OrderedDict()
        self._map_bytes = 0
        # The maps are a cache like the decoded chunks: they live inside the disk cache's budget
        # (--cache-size), which gives up what they hold, and take at most a quarter of it.
        if max_map_bytes is None:
            max_map_bytes = min(MAX_MAP_BYTES, max(MIN_MAP_BYTES, disk.cache.max_bytes // 4))
        self._max_map_bytes = max_map_bytes
        disk.cache.include(self)
        self._flights: dict[tuple[str, int], threading.Event] = {}
        self._ends: OrderedDict[tuple[str, int], int] = OrderedDict()  # where each file's last read ended
        self._lock = threading.Lock()
        self._fs_lock = threading.Lock()
        self._closed = False
        self.failed_runs = 0  # debugfs runs that failed even at MIN_BATCH inodes
        self.stats = {"mapped_reads": 0, "fallback_reads": 0, "debugfs_runs": 0, "maps": 0, "refused": 0}

    # which filesystems ------------------------------------------------------------------------
    def _state(self, fs: str) -> _Fs | None:
        if fs in self._fs:
            return self._fs[fs]
        with self._fs_lock:
            if fs not in self._fs:
                self._fs[fs] = self._decide(fs)
            return self._fs[fs]

    def _decide(self, fs: str) -> _Fs | None:
        area = self._areas.get(fs)
        if area is None:
            return None
        backend = self._backend()
        try:
            facts = backend.ext_facts(fs)
            if facts is None:
                return None  # not ext
            if facts.get("error"):
                log.info("files/%s: files read through the appliance: %s", fs, facts["error"])
                return None
            decided, why = eligibility(facts.get("tune2fs"), area[0], area[1], uint_or_none(facts.get("start")),
                                       uint_or_none(facts.get("size")))
            if decided is None:
                log.info("files/%s: files read through the appliance: %s", fs, why)
                return None
            state = _Fs(decided)
            for ino, size in regular_files(backend.ext_regular_files(fs)):
                state.note(ino, size)
        except (ImgkitError, AttributeError, TypeError, ValueError) as e:
            log.warning("files/%s: extent maps unavailable, files read through the appliance: %s", fs, e)
            return None
        log.info("files/%s: files read from the image through extent maps (block size %d, %d regular files "
                 "listed)", fs, decided.block_size, state.count)
        return state

    # reads ------------------------------------------------------------------------------------
    def note_regular(self, fs: str, ino: int, size: int) -> None:
        """A regular file seen in a listing of the files view (found too if the appliance's list
        was cut short)."""
        state = self._fs.get(fs)
        if state is not None and 0 < ino < 1 << 32:
            with self._lock:
                state.note(ino, size)

    def _key(self, fs: str, ino: int) -> int:
        return self._fs_number[fs] << 32 | ino

    def read(self, fs: str, ino: int, size: int, offset: int, length: int) -> bytes | memoryview | None:
        """The file's bytes [offset, offset+length) (clipped to `size`), read from the image, or None
        when this file has no usable map (the caller reads it through the appliance)."""
        state = self._state(fs)
        if state is None or not 0 < ino < 1 << 32:
            return None
        m = self._map(fs, state, ino, size)
        if m is None or m.size != size:
            self.stats["fallback_reads"] += 1
            return None
        start = state.facts.part_start
        # read_buffer: a piece inside one decoded chunk is a view of it, not a copy (the FUSE reply
        # only hands it on); a copy per read also left small buffers in the holes freed chunks
        # leave in the heap, which then grew past them.
        parts = [bytes(n) if poff < 0 else self.disk.read_buffer(start + poff, n)
                 for poff, n in m.pieces(offset, length)]
        self.stats["mapped_reads"] += 1
        end = offset + length
        with self._lock:  # sequential: this read starts where the last one of this file ended
            sequential = self._ends.pop((fs, ino), None) == offset and offset > 0
            self._ends[(fs, ino)] = end
            if len(self._ends) > 256:
                self._ends.popitem(last=False)
        if sequential and end < size:
            self._read_ahead(m, end, start)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def is_cheap(self, fs: str, ino: int, size: int, offset: int, length: int) -> bool:
        """Whether read() of this file is answered from memory now (its map cached, its bytes in the
        disk reader's cache or holes): the FUSE loop then answers it on its own thread."""
        state = self._fs.get(fs)
        if state is None:
            return False
        with self._lock:
            blob = self._maps.get(self._key(fs, ino))
        m = None if blob is None else ExtentMap.unpack(blob, state.facts.block_size)
        if m is None or m.size != size:
            return False
        start = state.facts.part_start
        return all(poff < 0 or self.disk.is_cheap(start + poff, n) for poff, n in m.pieces(offset, length))

    def _read_ahead(self, m: ExtentMap, pos: int, start: int) -> None:
        """Decode what a sequential reader of a big file reads next, as disk.raw's readers get (a
        random reader gets none: it would decode 8 MiB per read for nothing)."""
        if m.size - pos < self.disk.unit_size:
            return
        for poff, n in m.pieces(pos, READ_AHEAD):
            if poff >= 0:
                self.disk.read_ahead(start + poff, n)

    # maps -------------------------------------------------------------------------------------
    def _cached(self, key: int, block_size: int) -> tuple[bool, ExtentMap | None]:
        with self._lock:
            if key in self._maps:
                self._maps.move_to_end(key)
                blob = self._maps[key]
            else:
                return False, None
        return True, None if blob is None else ExtentMap.unpack(blob, block_size)

    def _take_flight(self, flight: tuple[str, int]) -> tuple[bool, threading.Event]:
        """(True, event) for the thread that now maps this window, else (False, the event to wait on)."""
        with self._lock:
            event = self._flights.get(flight)
            if event is not None:
                return False, event
            event = self._flights[flight] = threading.Event()
            return True, event

    def _land(self, flight: tuple[str, int], event: threading.Event) -> None:
        with self._lock:
            del self._flights[flight]
        event.set()

    def _map(self, fs: str, state: _Fs, ino: int, size: int) -> ExtentMap | None:
        key = self._key(fs, ino)
        while True:
            found, m = self._cached(key, state.facts.block_size)
            if found:
                return m
            flight = (fs, ino // WINDOW)
            owner, event = self._take_flight(flight)
            if not owner:
                event.wait()
                found, m = self._cached(key, state.facts.block_size)
                if found:
                    return m
                continue  # that run was for other inodes of the window (or its maps were dropped)
            try:
                found, m = self._cached(key, state.facts.block_size)  # mapped by a run that ended since the first look
                if not found:
                    self._map_window(fs, state, ino // WINDOW, {ino: size})
            finally:
                self._land(flight, event)
            self._start_prefetch(fs, state, ino // WINDOW)
            found, m = self._cached(key, state.facts.block_size)
            return m if found else None

    def _map_window(self, fs: str, state: _Fs, window: int, extra: dict[int, int]) -> None:
        """One debugfs run (or a few, if one fails) for every listed regular file of the window
        that has no map yet, and `extra` (the file being read)."""
        with self._lock:
            for ino, size in extra.items():
                state.note(ino, size)
            wanted = {i: s for i, s in state.known.get(window, {}).items() if self._key(fs, i) not in self._maps}
        wanted.update(extra)
        if wanted:
            self._run(fs, state, dict(sorted(wanted.items())), keep=list(extra))

    # Mapping ahead: once a file of a filesystem has been read, the other windows of its listed files
    # are mapped on one background thread, in inode order from that file's window, so the appliance's
    # debugfs runs (~0.5 s each under TCG) overlap the daemon's reads instead of stalling them. Only for
    # filesystems whose maps all fit the memory bound; others are mapped a window at a time on demand.
    def _start_prefetch(self, fs: str, state: _Fs, window: int) -> None:
        with self._lock:
            if state.prefetching or self._closed or state.count > PREFETCH_MAX_FILES \
                    or state.count * MAP_BYTES_PER_FILE > self._max_map_bytes // 2:  # a small cache
                return
            state.prefetching = True
        threading.Thread(target=self._prefetch, args=(fs, state, window), daemon=True,
                         name=f"imgkit-extents-{fs}").start()

    def _prefetch(self, fs: str, state: _Fs, first: int) -> None:
        with self._lock:
            windows = sorted(state.known)
        order = [w for w in windows if w >= first] + [w for w in windows if w < first]
        for w in order:
            if self._closed:
                return
            owner, event = self._take_flight((fs, w))
            if not owner:
                continue  # a reader is mapping it now
            failed = self.failed_runs
            try:
                self._map_window(fs, state, w, {})
            except ImgkitError as e:  # the appliance is gone (unmount): nothing more to map
                log.info("files/%s: mapping ahead stopped: %s", fs, e)
                return
            finally:
                self._land((fs, w), event)
            if self.failed_runs != failed:  # the appliance fails now: leave the rest to reads on demand
                log.info("files/%s: mapping ahead stopped after a failed debugfs run", fs)
                return

    def close(self) -> None:
        """No more mapping ahead (the appliance is about to shut down)."""
        self._closed = True

    def _run(self, fs: str, state: _Fs, wanted: dict[int, int], keep: list[int] = ()) -> None:
        """Map `wanted` ({inode: size}) in one debugfs run; `keep`: the inodes being read, stored as
        the most recently used (the bound drops others first)."""
        try:
            self.stats["debugfs_runs"] += 1
            text = self._backend().ext_extent_maps(fs, list(wanted)).decode("ascii", "replace")
            # The appliance cuts the output at its message limit without an error: no end mark
            # means the sections after the cut are missing, so a big batch is split like a failure.
            failure = None if END_MARK in text else "output cut at the appliance's limit"
        except ImgkitError as e:
            if self._closed:
                raise  # the appliance is shutting down: nothing more to map (mapping ahead stops)
            text, failure = "", str(e)
        if failure is not None and len(wanted) > MIN_BATCH:
            items = list(wanted.items())
            half = len(items) // 2
            self._run(fs, state, dict(items[:half]), keep)
            self._run(fs, state, dict(items[half:]), keep)
            return
        if failure is not None:
            log.warning("files/%s: debugfs failed for %d inodes (%s): read through the appliance", fs,
                        len(wanted), failure)
            self.failed_runs += 1
        maps = parse_maps(text, wanted, state.facts)  # a missing or cut section: that file is None
        good = sum(m is not None for m in maps.values())
        log.info("files/%s: mapped %d of %d files in one debugfs run (inodes %d-%d)", fs, good, len(maps),
                 min(wanted), max(wanted))
        with self._lock:
            for i, m in maps.items():
                key = self._key(fs, i)
                if key in self._maps:
                    self._map_bytes -= _cost(self._maps.pop(key))
                blob = None if m is None else m.pack()
                self._maps[key] = blob
                self._map_bytes += _cost(blob)
                self.stats["refused" if m is None else "maps"] += 1
            for i in keep:
                if self._key(fs, i) in self._maps:
                    self._maps.move_to_end(self._key(fs, i))
            while self._map_bytes > self._max_map_bytes and self._maps:
                _, old = self._maps.popitem(last=False)
                self._map_bytes -= _cost(old)
        self.disk.cache.make_room()  # the maps grew: the decoded chunks give the room up

    @property
    def nbytes(self) -> int:
        """Memory of the cached maps (counted in the disk cache's budget)."""
        return self._map_bytes

    def summary(self) -> str:
        s = self.stats
        return (f"{s['mapped_reads']} reads from extent maps, {s['fallback_reads']} through the appliance; "
                f"{s['debugfs_runs']} debugfs runs, {s['maps']} files mapped, {s['refused']} refused")


def _cost(blob: bytes | None) -> int:
    """Memory of one cached entry: the packed map (a refused file's None: nothing), its key and the
    LRU's links (~120 bytes, measured with tracemalloc), so the bound covers every entry."""
    return 120 + (0 if blob is None else sys.getsizeof(blob))
