"""Verify: decompress and check every chunk of an image (the structure was checked when it opened)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import CorruptChunk
from ..formats import imgk_layout as L
from ..formats.imgk_reader import ImageReader
from ..platform.parallel import ordered_map
from ..progress import NullProgress, Progress

MAX_LISTED = 100


@dataclass
class VerifyReport:
    chunks: int
    data_chunks: int
    bytes_checked: int
    bad: list[dict] = field(default_factory=list)  # {"offset", "length", "error"}, at most MAX_LISTED
    bad_count: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.bad_count == 0

    @property
    def first_bad_offset(self) -> int | None:
        return self.bad[0]["offset"] if self.bad else None


def verify_image(image: ImageReader, progress: Progress | None = None, workers: int | None = None,
                 shallow: bool = False) -> VerifyReport:
    """Check every chunk that reads as data. Of an incremental image (its parents attached), a
    chunk read from a parent is checked by the parent and against the child's own digest of it;
    `shallow` checks only the chunks the image stores itself."""
    progress = progress or NullProgress()
    progress.total = image.size
    started = time.monotonic()
    wanted = (L.KIND_DATA,) if shallow else (L.KIND_DATA, L.KIND_PARENT)
    data = [i for i, k in enumerate(image.index.kinds()) if k in wanted]
    report = VerifyReport(image.chunk_count, len(data), 0)
    progress.advance(image.size - sum(image.chunk_length(i) for i in data))
    kinds = image.index.kinds()

    def check(i: int):
        try:
            chunk = image.read_chunk(i)
            if kinds[i] == L.KIND_PARENT and L.chunk_digest(image.header.hash_algo, chunk, image.mac_key) \
                    != image.index[i].digest:
                raise CorruptChunk(f"chunk at offset {i * image.chunk_size}, read from the parent, does not "
                                   "match the child's digest of it", i * image.chunk_size)
            return i, None
        except CorruptChunk as e:
            return i, str(e)

    image.read_sequentially()
    with ordered_map(check, data, workers or image.read_workers) as results:
        for i, error in results:
            length = image.chunk_length(i)
            report.bytes_checked += length
            progress.advance(length)
            if error:
                report.bad_count += 1
                if len(report.bad) < MAX_LISTED:
                    report.bad.append({"offset": i * image.chunk_size, "length": length, "error": error})
    report.seconds = time.monotonic() - started
    progress.finish(ok=report.ok)
    return report
