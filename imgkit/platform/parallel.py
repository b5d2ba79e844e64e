"""An ordered, bounded thread-pool map: the shape of capture, restore and verify.

zstd, hashlib and AES-GCM release the GIL on large buffers, so plain threads use every core; the
bound on work in flight keeps memory flat whatever the disk size. Chunk-sized buffers are kept by the
allocator once freed (keep_freed_buffers), so they are not faulted in and zeroed again for every chunk.
"""
from __future__ import annotations

import functools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters (malloc.h)


@functools.cache
def keep_freed_buffers() -> bool:
    """Make glibc keep freed multi-MiB buffers for reuse instead of returning each to the kernel.

    By default a 2 MiB buffer is mmapped or trimmed back when freed, so the next chunk's buffer is
    faulted in and zeroed again, page by page. Measured on a filesystem-aware capture of bench disk F
    (6 alternating runs): 32k page faults and 1.27 s median before, 11k and 1.23 s after. The heap
    then keeps what the work in flight needs: peak RSS 46 -> 49 MiB there, 47 -> 77 MiB on the 16 GiB
    disk D (its larger allocation maps stay resident). Process-wide and done once; False where the C
    library has no mallopt (musl) and nothing changed."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # Below 64 MiB (the largest chunk) from the heap, and up to 32 MiB of free heap top kept (the
    # chunks in flight; 16 and 256 MiB measured the same within noise).
    return bool(mallopt(M_MMAP_THRESHOLD, 64 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 32 << 20))


@functools.cache
def share_one_heap() -> bool:
    """For a long-lived server whose threads share a cache of chunk-sized buffers (the mount
    daemon): one malloc arena for every thread, and freed chunk buffers kept for reuse
    (keep_freed_buffers). glibc's default gives each thread its own arena, each of which grew to its
    own high-water mark as the cache's chunks were decoded by one thread and freed by another;
    measured on a cold `dd` of bench disk F's disk.raw through the mount (64 MiB cache): daemon peak
    RSS 127-137 -> 117-119 MiB, page faults 65-70k -> 26k. Call it before the threads start; False
    where the C library has no mallopt."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, 1)) and keep_freed_buffers()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                inflight: int | None = None) -> "OrderedMap[R]":
    """fn(item) in input order, with at most `inflight` items submitted but not yet handed out.
    Iterate it inside `with` (or close() it): a caller that stops early or raises then leaves no
    worker threads behind, even while something (a traceback) still holds the iterator."""
    return OrderedMap(fn, items, workers, inflight)


class OrderedMap(Generic[R]):
    """The iterator ordered_map returns. Its pool of worker threads lives from the first next() to
    the end of the items, an error (of fn or of the items), or close(): close() cancels what has not
    started and waits for what has, so no thread outlives it. A plain generator could not do this:
    its pool is shut down only when the generator is closed or collected, and a caller that raised
    mid-iteration and is handling the error still holds it through the traceback's frames."""

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], workers: int | None, inflight: int | None):
        self._fn = fn
        self._items = iter(items)
        self._workers = workers or default_workers()
        self._inflight = inflight or self._workers * 3
        self._pending: deque = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = self._exhausted = False
        keep_freed_buffers()

    def __iter__(self) -> "OrderedMap[R]":
        return self

    def __next__(self) -> R:
        if self._closed:
            raise StopIteration
        try:
            if self._workers == 1:
                return self._fn(next(self._items))
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="imgkit")
            while not self._exhausted and len(self._pending) < self._inflight:
                try:
                    item = next(self._items)
                except StopIteration:
                    self._exhausted = True
                    break
                self._pending.append(self._pool.submit(self._fn, item))
            if not self._pending:
                raise StopIteration
            return self._pending.popleft().result()
        except BaseException:  # the end, an error of fn or of the items, Ctrl-C: no thread stays
            self.close()
            raise

    def close(self) -> None:
        """Stop: what was not started is cancelled, what runs is waited for; idempotent."""
        if self._closed:
            return
        self._closed = True
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        close_items = getattr(self._items, "close", None)
        if close_items is not None:
            close_items()  # a generator of items ends here too (its finally blocks run now)

    def __del__(self) -> None:
        # Dropped unclosed (a plain for loop left by an exception): cancel what has not started and
        # let the workers end once idle, without waiting (a collector may run this on any thread).
        if not getattr(self, "_closed", True):
            self._closed = True
            for f in self._pending:
                f.cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "OrderedMap[R]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
