"""Capture: a source disk (Stream) into an imgk image, streaming, on every core, bounded memory."""
from __future__ import annotations

import datetime
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

from ..version import __version__
from ..platform.blockdev import whole_disk
from ..filesystems.disk_info import describe_partitions, optical_facts
from ..filesystems.os_detect import detect_os
from ..errors import InputError, Interrupted, RefusedTarget
from ..formats import imgk_layout as L
from ..formats.imgk_settings import DEFAULT_CHUNK_SIZE, LEVEL_DEFAULT
from ..formats.imgk_writer import (
    ChunkEncoder,
    ImageWriter,
    PreparedChunk,
    check_geometry,
)
from ..formats.byte_source import source_exists
from ..platform.parallel import default_workers, ordered_map
from ..remote.locations import is_s3
from ..progress import NullProgress, Progress
from ..stream import DATA, Stream
from ..platform.targets import check_replaceable, refuse_device_image_path


@dataclass
class CapturePlan:
    """Which bytes of the disk to store. The default keeps every byte (zero chunks are still skipped).
    A filesystem-aware plan marks chunks FREE and blanks unused blocks inside the chunks it keeps."""
    free_chunks: set[int] = field(default_factory=set)
    blank: Callable[[int, bytes], bytes] | None = None  # (chunk offset, data) -> data with free blocks zeroed
    used_maps: list[L.UsedMap] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # merged into the image metadata ("capture" key etc.)


@dataclass
class CaptureResult:
    paths: list[str]
    logical_size: int
    stored_bytes: int
    data_chunks: int
    zero_chunks: int
    free_chunks: int
    deduplicated: int
    seconds: float
    parent_chunks: int = 0  # incremental: chunks unchanged since the base, stored as PARENT entries
    warnings: list[str] = field(default_factory=list)  # e.g. a partition selection that cannot boot


def _device_of_path(path: str) -> int:
    """st_dev of the filesystem that will hold `path` (its directory)."""
    return os.stat(os.path.dirname(os.path.abspath(path)) or ".").st_dev


def refuse_output_on_source(source_path: str, output: str) -> None:
    """Refuse to write an image onto the device being captured, a partition of it, or the source file."""
    if is_s3(output):
        return
    st = os.stat(source_path)
    out_abs = os.path.abspath(output)
    if stat.S_ISREG(st.st_mode):
        if os.path.exists(out_abs) and os.path.samefile(out_abs, source_path):
            raise RefusedTarget(f"{output} is the source itself: refusing to overwrite what is captured")
        return
    if stat.S_ISBLK(st.st_mode):
        out_dev = _device_of_path(out_abs)
        if whole_disk(out_dev) == whole_disk(st.st_rdev) or out_dev == st.st_rdev:
            raise RefusedTarget(f"{output} lies on {source_path}, the device being captured",
                                hint="write the image to another disk")


def existing_volume_names(output: str) -> list[str]:
    """output and every output.NNN that exists (any number: a stale .005 of an older image counts)."""
    directory, base = os.path.split(os.path.abspath(output))
    names = [output] if os.path.lexists(output) else []
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        return names
    for e in sorted(entries):
        suffix = e[len(base) + 1:] if e.startswith(base + ".") else ""
        if suffix.isdigit() and 2 <= int(suffix) <= L.MAX_VOLUMES and suffix == f"{int(suffix):03d}":
            names.append(os.path.join(os.path.dirname(output), e))
    return names


def check_output_names(output: str, force: bool, sources: list[str] = ()) -> None:
    """Every volume name of the new image: never a device or under /dev, replaced only with --force
    and only when a regular file, never one of the files being read (x.imgk.002 captured into x.imgk).
    An S3 output is an object, not a path: capture_stream checks its names."""
    if is_s3(output):
        return
    refuse_device_image_path(output, other=sources[0] if sources else None)
    for name in existing_volume_names(output):
        check_replaceable(name, force, list(sources))


def stale_partials(output: str) -> list[str]:
    """Temporary volumes an earlier capture to `output` left behind when it was killed (kill -9, a
    crash, a power cut): `.NAME.imgkit-partial-PID-RANDOM` beside it, whose PID no longer runs. One
    of a capture still running is not listed."""
    directory, base = os.path.split(os.path.abspath(output))
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    found = []
    for e in sorted(entries):
        if not e.startswith(f".{base}") or ".imgkit-partial-" not in e:
            continue
        name, _, rest = e[1:].partition(".imgkit-partial-")
        if name != base and not (name.startswith(base + ".") and name[len(base) + 1:].isdigit()):
            continue
        pid = rest.split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that process still runs: maybe a capture in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path = os.path.join(directory, e)
        if os.path.isfile(path) and not os.path.islink(path):
            found.append(path)
    return found


def remove_stale_volumes(output: str, count: int) -> None:
    for name in existing_volume_names(output):
        if name != output and int(name.rsplit(".", 1)[1]) > count:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


def build_metadata(source: Stream, source_info: dict, level: int, plan: CapturePlan) -> dict:
    table, parts = describe_partitions(source)
    meta = {
        "imgkit_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_info,
        "compression": {"algorithm": "zstd" if level else "none", "level": level},
        "partition_table": parts,
        "capture": {"mode": "full"},
    }
    optical = optical_facts(source)
    if optical:
        meta["optical"] = optical
    found_os = detect_os(source, parts)
    if found_os:
        meta["os"] = found_os
    meta.update(plan.metadata)
    return meta


def capture_stream(source: Stream, output: str, *, source_info: dict, level: int = LEVEL_DEFAULT,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, split_size: int | None = None,
                   sealer_factory=None, plan: CapturePlan | None = None, force: bool = False,
                   progress: Progress | None = None, workers: int | None = None, base=None,
                   sources: list[str] = ()) -> CaptureResult:
    """Write `source` as an imgk image at `output` (volumes output, output.002, ... with a split
    size). `base`: an opened chain (imgk_chain.open_chain); the new image is its child. `sources` are
    the files being read: no output name may be one of them, even with --force."""
    plan = plan or CapturePlan()
    progress = progress or NullProgress()
    check_geometry(source.size, chunk_size)  # before anything is read
    if is_s3(output):
        if not force:
            for n in (1, 2):
                if source_exists(L.volume_path(output, n)):
                    raise InputError(f"{L.volume_path(output, n)} already exists", hint="use --force to replace it")
    else:
        check_output_names(output, force, sources)
    out_dir = os.path.dirname(os.path.abspath(output))
    if not is_s3(output) and not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: no such directory for the image")
    started = time.monotonic()
    metadata = build_metadata(source, source_info, level, plan)
    if base is not None:
        from ..formats.imgk_chain import parent_ref_for
        metadata["incremental"] = {"base": os.path.basename(base.path), "base_image_id": base.header.image_id.hex()}
    writer = ImageWriter(output, source.size, chunk_size, split_size=split_size, sealer_factory=sealer_factory,
                         used_maps=bool(plan.used_maps), replace=force)
    progress.total = progress.total or source.size
    try:
        encoder = ChunkEncoder(level, writer.sealer, writer.header.hash_algo)
        unchanged = None
        if base is not None:
            writer.set_parent(parent_ref_for(base))
            unchanged = UnchangedTest(base, writer)
        count = writer.header.chunk_count
        # Chunks that touch a data run must be read; the rest are holes and read as zeros.
        has_data = bytearray(count)
        for run in source.runs():
            if run.kind == DATA:
                first, last = run.offset // chunk_size, (run.end - 1) // chunk_size
                has_data[first:last + 1] = b"\1" * (last - first + 1)
        for i in plan.free_chunks:
            if 0 <= i < count:
                has_data[i] = 2
    except BaseException:  # the temporary volume exists already: never leave it behind
        writer.abort()
        raise

    def work(i: int) -> PreparedChunk:  # runs in a worker thread: read, blank, hash, compress, seal
        offset = i * chunk_size
        length = min(chunk_size, source.size - offset)
        if has_data[i] == 2:
            return PreparedChunk(i, length, L.KIND_FREE)
        if not has_data[i]:
            return encoder.prepare(i, None, length)
        data = source.read(offset, length)
        if plan.blank:
            data = plan.blank(offset, data)
        if unchanged is not None:
            same = unchanged.digest_if_same(i, data)
            if same is not None:
                return PreparedChunk(i, length, L.KIND_PARENT, same)
        return encoder.prepare(i, data, length)


    def chunks_to_do():
        # Runs as work is queued, a few chunks ahead of the workers: the disk reads the next chunks
        # while the workers compress the current ones, instead of each worker waiting on its read.
        for i in range(count):
            if has_data[i] == 1:
                source.will_need(i * chunk_size, min(chunk_size, source.size - i * chunk_size))
            yield i

    counts = {L.KIND_DATA: 0, L.KIND_ZERO: 0, L.KIND_FREE: 0, L.KIND_PARENT: 0}
    try:
        with ordered_map(work, chunks_to_do(), workers or default_workers()) as chunks:
            for chunk in chunks:
                writer.put(chunk)
                counts[chunk.kind] += 1
                progress.advance(chunk.length)
        for m in plan.used_maps:
            writer.add_used_map(m)
        paths = writer.commit(metadata)
    except KeyboardInterrupt:
        writer.abort()
        raise Interrupted("capture interrupted: no image was written") from None
    except BaseException:
        writer.abort()
        raise
    if force and not is_s3(output):  # volumes of the replaced image beyond the new count would look like part of it
        remove_stale_volumes(output, len(paths))
    result = CaptureResult(paths, source.size, sum(writer.volume_sizes), counts[L.KIND_DATA],
                           counts[L.KIND_ZERO], counts[L.KIND_FREE], writer.deduplicated,
                           time.monotonic() - started, counts[L.KIND_PARENT])
    progress.finish(stored_bytes=result.stored_bytes)
    return result


class UnchangedTest:
    """Whether a chunk read for a child equals its parent's chunk at the same place, by the parent's
    strong digest of what was read (FORMAT.md, *Incremental images*): the parent's data is never read
    or decompressed for this. A chunk of zeros is not compared (it is a ZERO entry of the child's own)."""

    def __init__(self, parent, writer: ImageWriter):
        kinds = parent.index.kinds()
        self.algo, self.key = parent.header.hash_algo, parent.mac_key
        self.digests = [parent.index[i].digest if k in (L.KIND_DATA, L.KIND_PARENT) else None
                        for i, k in enumerate(kinds)]
        self.lengths = [parent.chunk_length(i) for i in range(len(kinds))]
        self.own_algo, self.own_key = writer.header.hash_algo, writer.mac_key
        # Plain chain, same algorithm: the parent's digest of the bytes is the child's too.
        self.shared = self.algo == self.own_algo and self.key == self.own_key

    def digest_if_same(self, i: int, data: bytes) -> bytes | None:
        """The child's own digest of `data` when it equals the parent's chunk i, else None."""
        if i >= len(self.digests) or self.digests[i] is None or self.lengths[i] != len(data):
            return None
        if L.chunk_digest(self.algo, data, self.key) != self.digests[i]:
            return None
        return self.digests[i] if self.shared else L.chunk_digest(self.own_algo, data, self.own_key)
