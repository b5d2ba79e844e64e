"""Operations on an existing image's layout and key slot: `passwd`, `split` and `join`.

Nothing here recompresses or re-encrypts a chunk. A chunk's AEAD binds the header core and its
object number, not its volume or offset (docs/FORMAT.md, *Stored chunks*), so split and join copy
stored chunks byte for byte and write a new index (sealed again, with a fresh nonce); passwd
wraps the same data key under a new password and rewrites only the key slot of every header.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

from ..platform.targets import check_replaceable, refuse_device_image_path
from ..errors import InputError
from ..formats import imgk_layout as L
from ..formats.imgk_reader import ImageReader, PasswordProvider
from ..formats.imgk_writer import ImageWriter, existing_volumes
from ..platform.writeback import fsync_parent_dir
from ..platform.parallel import ordered_map
from ..progress import NullProgress, Progress


@dataclass
class RelayoutResult:
    paths: list[str]
    stored_bytes: int
    chunks_copied: int
    seconds: float


def change_password(image: str, old_password: PasswordProvider,
                    new_password: Callable[[], bytes]) -> list[str]:
    """Wrap the image's data key under `new_password()` (asked only once the old password has
    opened the image); rewrite the key slot of every volume.

    The whole image is opened (and so checked) first, with one key derivation. Each volume's header
    is then rewritten in place (4 KiB at offset 0) and fsynced, volume 1 last: readers take the key
    slot from volume 1 only, so until that write the old password works, and after it the new one.
    """
    refuse_device_image_path(image, command="passwd")
    from ..formats.crypto import new_key_slot
    with ImageReader(image, old_password) as img:
        if not img.header.encrypted:
            raise InputError(f"{image} is not encrypted: it has no password to change",
                             hint="capture it again with --encrypt to encrypt it")
        secret = new_password()
        if not secret:
            raise InputError("an empty password is not allowed")
        slot = new_key_slot(secret, img.data_key, img.header.core_digest())
        paths = img.volume_paths
        image_id = img.header.image_id
    for path in paths[1:] + paths[:1]:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, L.HEADER_SIZE, 0)
            if L.Header.decode(raw, where=path).image_id != image_id:  # replaced since we checked it
                raise InputError(f"{path} changed while its password was being changed")
            new = L.replace_key_slot(raw, slot)
            if os.pwrite(fd, new, 0) != len(new):
                raise InputError(f"{path}: short write of the header")
            os.fsync(fd)  # a failed fsync raises and is fatal: never retried
        finally:
            os.close(fd)
    return paths


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def relayout(image: str, output: str | None = None, *, split_size: int | None = None,
             password: PasswordProvider | None = None, force: bool = False,
             progress: Progress | None = None, workers: int | None = None) -> RelayoutResult:
    """Write `image` again in volumes of at most `split_size` bytes (None: one volume, i.e. join),
    to `output` or, without it, in place of `image`. Every stored chunk is authenticated (or
    hash-checked) as it is copied, so damage is refused, not copied. The new volumes are written
    under temporary names and renamed into place only when complete.

    Crash safety in place: the volumes of one image share its id and are found by name from volume
    1, so renaming a new set over an old multi-volume set (volume k new, volume 1 still old) would
    leave no readable image for a while. Each single step is safe instead: a join renames one file
    (volume 1) over the old volume 1, after which the old volumes 2..N are mere strays; a split of a
    one-volume image renames volumes 2..N onto free or stray names, volume 1 last. So an in-place
    re-split of a multi-volume image joins first, then splits: at every instant the old image, the
    joined one or the new one is complete (tests/test_volumes_crash.py kills it at every rename
    and fsync). The price is a second copy pass, only for this case."""
    progress = progress or NullProgress()
    started = time.monotonic()
    refuse_device_image_path(image, command="split/join")
    if output is not None:
        refuse_device_image_path(output, other=image, command="split/join")
    if split_size is not None and (output is None or _same_file(output, image)):
        with ImageReader(image, password) as probe:
            multi = probe.header.volume_count > 1
        if multi:
            joined = relayout(image, split_size=None, password=password, workers=workers)
            result = relayout(image, split_size=split_size, password=password, progress=progress,
                              workers=workers)
            result.seconds = time.monotonic() - started
            result.chunks_copied += joined.chunks_copied
            return result
    src = ImageReader(image, password)  # every volume is checked here, before anything is written
    try:
        in_place = output is None or _same_file(output, image)
        target = image if in_place else output
        old_volumes = src.volume_paths if in_place else existing_volumes(target)
        if not in_place:
            for p in src.volume_paths:
                for q in old_volumes:
                    if _same_file(p, q):
                        raise InputError(f"{q} is a volume of the image being read",
                                         hint="choose another output name")
            for q in old_volumes:  # regular files only, and only with --force
                check_replaceable(q, force)
            if not os.path.isdir(os.path.dirname(os.path.abspath(target))):
                raise InputError(f"{os.path.dirname(os.path.abspath(target))}: no such directory")
        data = [i for i, e in enumerate(src.index) if e.kind == L.KIND_DATA]
        # Deduplicated chunks share one stored copy: place each source copy once.
        shared = Counter((src.index[i].volume, src.index[i].offset) for i in data)
        writer = ImageWriter(target, src.size, src.chunk_size, split_size=split_size,
                             template=src.header, sealer=src.sealer, replace=in_place or force)
        progress.total = src.size
        placed: dict[tuple[int, int], tuple[int, int]] = {}
        copied = 0
        try:
            for i, e in enumerate(src.index):
                if e.kind in (L.KIND_FREE, L.KIND_PARENT):  # a child keeps naming its parent's chunks
                    writer.set_entry(i, e)
            progress.advance(src.size - sum(src.chunk_length(i) for i in data))

            def fetch(i: int):
                stored = src.read_stored(i)
                src.decode_stored(i, stored)  # refuse to copy damage (raises CorruptChunk)
                return i, stored

            with ordered_map(fetch, data, workers) as fetched:
                for i, stored in fetched:
                    e = src.index[i]
                    where = (e.volume, e.offset)
                    if where in placed:
                        volume, offset = placed[where]
                    else:
                        volume, offset = writer.copy_stored(stored)
                        copied += 1
                        if shared[where] > 1:
                            placed[where] = (volume, offset)
                    writer.set_entry(i, replace(e, volume=volume, offset=offset))
                    progress.advance(src.chunk_length(i))
            for m in src.used_maps:
                writer.add_used_map(m)
            writer.set_parent(src.parent_ref)
            paths = writer.commit(src.metadata)
        except BaseException:
            writer.abort()
            raise
    finally:
        src.close()
    # Volumes of the old layout (or of the replaced output) beyond the new count are stale now.
    for stale in old_volumes[len(paths):]:
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    if len(old_volumes) > len(paths):
        fsync_parent_dir(target)
    progress.finish(stored_bytes=writer.stored_bytes)
    return RelayoutResult(paths, sum(os.path.getsize(p) for p in paths), copied,
                          time.monotonic() - started)
