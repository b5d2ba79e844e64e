"""A bounded, single-flight LRU of decoded chunks, shared by the image reader and the mount.

Bounded by bytes, so memory does not depend on the chunk size. Single-flight: when several threads
want the same chunk at once (qemu-img reading 64 KiB pieces 16 at a time over NBD, FUSE readahead),
one decodes it and the others wait for it instead of decoding it again (measured: 25% duplicate
decodes before). Failures are not cached: a corrupt chunk fails every read that touches it.

One budget for several caches: a cache made with `within=other` keeps its bytes inside `other`'s
bound too (the mount's guest-file cache inside the disk cache's --cache-size), and so does anything
else registered with `other.include(...)` that has an `nbytes` (the files view's extent maps): what
they hold, `other` gives up, least recently used first, so together they keep to the one budget."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable


class _Pending:
    __slots__ = ("event", "value", "error")

    def __init__(self):
        self.event = threading.Event()
        self.value = None
        self.error = None


class ChunkCache:
    """Bounded (by bytes) LRU of decompressed chunks. Concurrent requests for one chunk decompress it
    once (the others wait). Failures are not cached: a corrupt chunk fails every read that touches it."""

    def __init__(self, max_bytes: int, *, within: "ChunkCache | None" = None):
        self.max_bytes = max(0, max_bytes)
        self._data: OrderedDict[int, bytes] = OrderedDict()
        self._bytes = 0
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._within = within
        self._inner: list = []  # holders (with nbytes) whose bytes count against this one's bound
        if within is not None:
            within.include(self)
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        """The bytes held now."""
        return self._bytes

    def include(self, holder) -> None:
        """Count `holder.nbytes` against this cache's bound (the holder calls make_room() when
        it grew)."""
        with self._lock:
            self._inner.append(holder)

    def _evict(self) -> None:
        """Drop least recently used entries until this cache and those inside its budget fit
        max_bytes (under self._lock; the holders' counts are read without their locks: an int, at
        worst one insert old)."""
        while self._data and self._bytes + sum(c.nbytes for c in self._inner) > self.max_bytes:
            _, old = self._data.popitem(last=False)
            self._bytes -= len(old)

    def make_room(self) -> None:
        with self._lock:
            self._evict()

    def __contains__(self, key: int) -> bool:
        with self._lock:
            return key in self._data or key in self._pending

    def cached(self, key: int) -> bool:
        """Whether key's bytes are here now (not merely being loaded by another thread)."""
        with self._lock:
            return key in self._data

    def get(self, key: int, load: Callable[[int], bytes]) -> bytes:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                self.hits += 1
                return data
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
                self.misses += 1
        if not owner:
            pending.event.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value
        try:
            data = load(key)
            pending.value = data
            return data
        except BaseException as e:
            pending.error = e
            raise
        finally:
            with self._lock:
                del self._pending[key]
                if pending.error is None and len(pending.value) <= self.max_bytes:
                    self._data[key] = pending.value
                    self._bytes += len(pending.value)
                    self._evict()
            if self._within is not None:  # after our lock is released: locks are taken inner first
                self._within.make_room()
            pending.event.set()

    def peek(self, key: int) -> bytes | None:
        """key's bytes if they are here now (counted as a use), else None; never loads."""
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
