"""Where the stored bytes of an image's volumes come from: a local file (pread) or an object in S3
(ranged GET). The imgk reader sees only pread(length, offset), so every command that reads an
image (info, verify, restore, mount, boot-check, convert) reads from either the same way, and only
the chunks it needs."""
from __future__ import annotations

import os

from ..errors import BadImage, InputError
from ..platform.parallel import default_workers
from ..remote.locations import is_s3
from .sources import open_for_reading


class LocalFile:
    def __init__(self, path: str):
        self.path = path
        self.fd = open_for_reading(path, missing_is_error=False)
        st = os.fstat(self.fd)
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def read_sequentially(self, start: int = 0) -> None:
        try:
            os.posix_fadvise(self.fd, start, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass

    def will_need(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading now (POSIX_FADV_WILLNEED does not block)."""
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# How many chunk reads a consumer should keep in flight: a local file is read ahead by the kernel
# (the CPU-bound decoders set the pace); an object in S3 is fetched ahead in large windows by its
# byte source (s3.S3Object.read_sequentially), so its readers only decode, one more than the cores so
# that the cores stay busy while one waits for a window.
LOCAL_READ_WORKERS = None  # the default: one worker a core
REMOTE_READ_WORKERS = default_workers() + 1


def open_source(location: str):
    """The byte source at `location` (s3://bucket/key or a path). Raises FileNotFoundError if there
    is no such file or object, InputError for other failures."""
    if is_s3(location):
        from ..remote import s3  # the S3 client: only for s3:// images
        try:
            return s3.S3Object(location)
        except InputError as e:
            if str(e).endswith("no such object"):
                raise FileNotFoundError(location) from None
            raise
    return LocalFile(location)


def source_exists(location: str) -> bool:
    if is_s3(location):
        from ..remote import s3
        return s3.exists(location)
    return os.path.exists(location)


def read_workers(location: str) -> int | None:
    return REMOTE_READ_WORKERS if is_s3(location) else LOCAL_READ_WORKERS


def pread_exact(src, length: int, offset: int, what: str) -> bytes:
    data = src.pread(length, offset)
    if len(data) != length:
        raise BadImage(f"{what}: truncated (wanted {length} bytes at {offset}, got {len(data)})")
    return data
