"""An ordered, bounded thread-pool map: the shape of capture, restore and verify.

zstd, hashlib and AES-GCM release the GIL on large buffers, so plain threads use every core; the
bound on work in flight keeps memory flat whatever the disk size.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                inflight: int | None = None) -> Iterator[R]:
    """Yield fn(item) in input order, with at most `inflight` items submitted but not yet yielded."""
    workers = workers or default_workers()
    inflight = inflight or workers * 3
    if workers == 1:
        for item in items:
            yield fn(item)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgkit") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= inflight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
