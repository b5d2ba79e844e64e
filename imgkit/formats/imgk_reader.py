"""Reads imgk images (docs/FORMAT.md) as a Stream: every volume, size and offset is checked before
any data is handed out, and every chunk is authenticated/hashed as it is read."""
from __future__ import annotations

import functools
import json
import os
import threading
from typing import Callable, Iterator

import zstandard

from ..units import format_size
from ..errors import BadImage, CorruptChunk, InputError
from ..stream import DATA, FREE, ZERO, Run, Stream, merge_runs
from . import imgk_layout as L
from .byte_source import open_source, pread_exact, read_workers, source_exists

PasswordProvider = Callable[[], bytes]
_READABLE = (L.KIND_DATA, L.KIND_PARENT)


def bounded_decompress(dctx, data: bytes, cap: int) -> bytes:
    """Decompress one zstd frame into at most `cap` bytes. python-zstandard trusts a frame's declared
    content size over max_output_size, so a forged header could ask for any allocation: check it first.
    Raises zstandard.ZstdError on anything wrong."""
    declared = zstandard.get_frame_parameters(data).content_size
    if declared == zstandard.CONTENTSIZE_ERROR or (declared != zstandard.CONTENTSIZE_UNKNOWN and declared > cap):
        raise zstandard.ZstdError(f"frame declares {declared} bytes, more than {cap}")
    return dctx.decompress(data, max_output_size=cap)


_pread_exact = pread_exact


class ImageReader(Stream):
    """An imgk image opened for reading. `password` is a callable asked only if the image is
    encrypted (so plain images never prompt). Its units are its chunks; it keeps no cache (the
    caching reader does: imgkit/views/caching_reader.py) and may be read from several threads."""

    thread_safe = True  # pread on fixed descriptors, one decompressor per thread
    format_name = "imgk"
    parent: "ImageReader | None" = None  # an incremental image's parent, attached by imgk_chain.py
    INLINE_STORED = 96 << 10  # decompressing this much takes tens of microseconds: less than a thread hop

    def __init__(self, path: str, password: PasswordProvider | None = None):
        self.path = path
        self._fds: list = []  # byte sources (byte_source.py), one a volume
        self.read_workers = read_workers(path)  # reads worth keeping in flight (S3: several)
        try:
            self._open(path, password)
        except BaseException:
            self.close()
            raise
        self._local = threading.local()

    # -- opening --------------------------------------------------------------------------------
    def _open_volume(self, number: int) -> tuple[object, L.Header, int]:
        vpath = L.volume_path(self.path, number)
        try:
            fd = open_source(vpath)
        except FileNotFoundError:
            if number == 1:
                raise InputError(f"{vpath}: no such file") from None
            raise BadImage(f"volume {number} ({vpath}) is missing",
                           hint="put every volume of the image in the same directory") from None
        except IsADirectoryError:
            raise InputError(f"{vpath}: is a directory") from None
        except PermissionError:
            raise InputError(f"{vpath}: permission denied") from None
        self._fds.append(fd)
        size = fd.size
        header = L.Header.decode(fd.pread(L.HEADER_SIZE, 0), where=vpath)
        return fd, header, size

    def _open(self, path: str, password: PasswordProvider | None) -> None:
        fd, header, size = self._open_volume(1)
        if header.volume_number != 1:
            raise BadImage(f"{path} is volume {header.volume_number} of an image, not its first volume",
                           hint="open the volume named without a .NNN suffix")
        self.header = header
        self.volume_sizes = [size]
        core = header.core()
        for n in range(2, header.volume_count + 1):
            vfd, vh, vsize = self._open_volume(n)
            vpath = L.volume_path(path, n)
            if vh.image_id != header.image_id or vh.core() != core:
                raise BadImage(f"volume {n} ({vpath}) belongs to another image")
            if vh.volume_number != n:
                raise BadImage(f"{vpath} is volume {vh.volume_number}, expected volume {n} (renamed?)")
            if vh.volume_count != header.volume_count:
                raise BadImage(f"volume {n} ({vpath}) says the image has {vh.volume_count} volumes, "
                               f"volume 1 says {header.volume_count}")
            self.volume_sizes.append(vsize)
        self.stray_volume = None
        extra = L.volume_path(path, header.volume_count + 1)
        if source_exists(extra):
            # Not fatal to reading, but a sign of a mix-up the user should hear about.
            self.stray_volume = extra
        self.sealer = None
        self.data_key = None
        if header.encrypted:
            if password is None:
                raise InputError(f"{path} is encrypted: a password is needed")
            from .crypto import ImageKeys, Sealer, unwrap_data_key
            data_key = unwrap_data_key(password(), header.key_slot, header.core_digest())
            self.data_key = data_key  # kept for `passwd`, which wraps it again under a new password
            self.sealer = Sealer(ImageKeys.from_data_key(data_key, header.image_id), header.core_digest())
        self.mac_key = self.sealer.mac_key if self.sealer else b""
        last_fd, last_size = self._fds[-1], self.volume_sizes[-1]
        last_path = L.volume_path(path, header.volume_count)
        if last_size < L.HEADER_SIZE + L.TRAILER_SIZE:
            raise BadImage(f"volume {header.volume_count} ({last_path}) is truncated: no trailer")
        try:
            trailer = L.Trailer.decode(_pread_exact(last_fd, L.TRAILER_SIZE, last_size - L.TRAILER_SIZE,
                                                    "trailer"), last_size, self.mac_key)
        except BadImage as e:  # name the volume: with several, the user must know which one
            raise BadImage(f"volume {header.volume_count} ({last_path}): {e}", hint=e.hint) from None
        if trailer.image_id != header.image_id or trailer.core_digest != header.core_digest():
            raise BadImage("the trailer does not match the header (damaged, or volumes of different images)")
        if trailer.volume_count != header.volume_count:
            raise BadImage(f"the trailer counts {trailer.volume_count} volumes, the header "
                           f"{header.volume_count}")
        dir_raw = _pread_exact(last_fd, trailer.directory_length, trailer.directory_offset, "directory")
        if L.digest(dir_raw, self.mac_key) != trailer.directory_digest:
            raise BadImage("section directory checksum mismatch")
        self.sections = L.decode_directory(dir_raw, trailer.directory_offset)
        budgets = L.check_section_budgets(self.sections, header)  # before decoding anything
        by_type: dict[int, list[bytes]] = {}
        self._used_map_entries: list[tuple[int, L.SectionEntry]] = []
        for seq, entry in enumerate(self.sections):
            if entry.type not in budgets:
                if entry.required:
                    raise BadImage(f"image needs section type {entry.type} unknown to this imgkit "
                                   "(made by a newer imgkit)")
                continue
            if entry.type == L.SECTION_USED_MAP:
                # Checked now (digest, seal, length, head) in constant memory, decoded only when
                # asked for (split/join copy them): the maps of a huge declared disk cost nothing.
                self._check_used_map(seq, entry, header.logical_size)
                self._used_map_entries.append((seq, entry))
                continue
            by_type.setdefault(entry.type, []).append(self._read_section(seq, entry))
        expected = L.decode_volume_table(by_type[L.SECTION_VOLUMES][0], header.volume_count)
        for n, (want, have) in enumerate(zip(expected, self.volume_sizes), start=1):
            if want != have:
                state = "truncated" if have < want else "longer than written"
                raise BadImage(f"volume {n} ({L.volume_path(path, n)}) is {state}: {format_size(have)} ({have} bytes), "
                               f"expected {format_size(want)} ({want} bytes)")
        self.index = L.decode_index(by_type[L.SECTION_INDEX][0], header, self.volume_sizes)
        self._kinds = self.index.kinds()  # one byte a chunk: kind tests on the read path decode no entry
        try:
            metadata = json.loads(by_type[L.SECTION_METADATA][0])
        except (ValueError, RecursionError):
            raise BadImage("image metadata is not a JSON object") from None
        self.metadata = L.check_metadata(metadata)  # types, ranges, lengths: before any command reads it
        # An incremental image names its parent here; imgk_chain.py finds, checks and attaches it.
        parents = by_type.get(L.SECTION_PARENT, [])
        self.parent_ref = L.ParentRef.decode(parents[0]) if parents else None
        self.parent: "ImageReader | None" = None
        self.size = header.logical_size
        self.chunk_size = self.unit_size = header.chunk_size

    @property
    def image_id(self) -> bytes:
        return self.header.image_id

    @property
    def encrypted(self) -> bool:
        return bool(self.header.encrypted)

    @functools.cached_property
    def chain_digest(self) -> bytes:
        """What this image's children pin it by (docs/FORMAT.md, *Incremental images*), computed once."""
        return L.chain_digest(self.header, self.index)

    @property
    def used_maps(self) -> list[L.UsedMap]:
        """The USED_MAP sections, decoded now (they were checked when the image was opened)."""
        return [L.UsedMap.decode(self._read_section(seq, entry), self.header.logical_size)
                for seq, entry in self._used_map_entries]

    def _check_used_map(self, seq: int, entry: L.SectionEntry, logical_size: int) -> None:
        """What decoding would check, streaming the frame through a small buffer."""
        stored = self._stored_section(seq, entry)
        reader = zstandard.ZstdDecompressor().stream_reader(stored)
        head, total = b"", 0
        try:
            while True:
                piece = reader.read(1 << 20)
                if not piece:
                    break
                if len(head) < L.USED_MAP_HEAD_SIZE:
                    head += piece[:L.USED_MAP_HEAD_SIZE - len(head)]
                total += len(piece)
                if total > entry.length:
                    break
        except zstandard.ZstdError as e:
            raise BadImage(f"section {seq} (type {entry.type}) does not decompress: {e}") from None
        if total != entry.length:
            raise BadImage(f"section {seq} (type {entry.type}) decodes to {'more than ' if total > entry.length else ''}"
                           f"{total} bytes, expected {entry.length}")
        L.UsedMap.check_head(head, total, logical_size)

    def _stored_section(self, seq: int, entry: L.SectionEntry) -> bytes:
        stored = _pread_exact(self._fds[-1], entry.stored_length, entry.offset, f"section {entry.type}")
        if L.digest(stored, self.mac_key) != entry.digest:
            raise BadImage(f"section {seq} (type {entry.type}) checksum mismatch")
        if self.sealer:
            stored = self.sealer.open_section(entry.type, seq, stored)
        return stored

    def _read_section(self, seq: int, entry: L.SectionEntry) -> bytes:
        stored = self._stored_section(seq, entry)
        if entry.type in (L.SECTION_VOLUMES, L.SECTION_PARENT):
            raw = stored
        else:
            try:
                raw = bounded_decompress(zstandard.ZstdDecompressor(), stored, entry.length)
            except zstandard.ZstdError as e:
                raise BadImage(f"section {seq} (type {entry.type}) does not decompress: {e}") from None
        if len(raw) != entry.length:
            raise BadImage(f"section {seq} (type {entry.type}) decodes to {len(raw)} bytes, expected {entry.length}")
        return raw

    # -- chunks ---------------------------------------------------------------------------------
    @property
    def chunk_count(self) -> int:
        return len(self.index)

    def chunk_length(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def _decompressor(self):
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def _is_data(self, i: int) -> bool:
        """Chunk i has bytes to read: stored here (DATA) or in a parent (PARENT)."""
        return self._kinds[i] in _READABLE

    def own_data(self) -> list[int]:
        """The chunks this image stores itself (not its parents)."""
        return [i for i, k in enumerate(self._kinds) if k == L.KIND_DATA]

    @property
    def is_child(self) -> bool:
        return self.parent_ref is not None

    def read_stored(self, i: int, e: L.IndexEntry | None = None) -> bytes:
        """The stored bytes of DATA chunk i (`e`: its index entry, when the caller has it)."""
        e = e or self.index[i]
        return _pread_exact(self._fds[e.volume - 1], e.stored_length, e.offset,
                            f"chunk {i} in volume {e.volume}")

    def read_sequentially(self) -> None:
        """The caller reads every stored chunk in order (restore, verify, convert, split): an image in
        S3 is then fetched in large windows instead of one GET a chunk."""
        for src in self._fds:
            src.read_sequentially(L.HEADER_SIZE)  # the pass reads the chunks; the header was read at open
        if self.parent is not None:  # the chunks a child does not store are read from its parent, in order too
            self.parent.read_sequentially()

    def will_need(self, offset: int, length: int) -> None:
        """Ask the byte sources to start reading the stored bytes of the chunks under
        [offset, offset+length) now (a file: POSIX_FADV_WILLNEED, which does not block), so that the
        decoder threads find them cached instead of each waiting on a synchronous read (a cold
        sequential mount read was I/O-bound without it). Chunks kept by a parent: the parent's."""
        if length <= 0 or offset >= self.size:
            return
        if self.parent is not None:
            self.parent.will_need(offset, length)
        first, last = offset // self.chunk_size, (min(self.size, offset + length) - 1) // self.chunk_size
        for i in range(max(0, first), last + 1):
            if self._kinds[i] == L.KIND_DATA:
                e = self.index[i]
                self._fds[e.volume - 1].will_need(e.offset, e.stored_length)

    # -- what the caching reader asks of a stream with units --------------------------------------
    def read_unit(self, i: int, unit: int | None = None) -> bytes:
        return self.read_chunk(i)

    def unit_is_stored(self, i: int) -> bool:
        return self._is_data(i)

    def unit_is_cheap(self, i: int) -> bool:
        # A chunk read from a parent: its stored size is the parent's; count it as a whole chunk.
        kind = self._kinds[i]
        return kind not in _READABLE or (kind == L.KIND_DATA and self.index[i].stored_length <= self.INLINE_STORED)

    def describe(self) -> dict:
        path = self.path if "://" in self.path else os.path.abspath(self.path)  # s3://... stays a URL
        return {"path": path, "kind": "image", "size": self.size}

    def read_chunk(self, i: int) -> bytes:
        """The verified bytes of chunk i (zeros for ZERO and FREE chunks). Raises CorruptChunk."""
        kind = self._kinds[i]
        if kind == L.KIND_PARENT:
            return self.read_parent_chunk(i)
        if kind != L.KIND_DATA:
            return bytes(self.chunk_length(i))
        e = self.index[i]
        return self.decode_stored(i, self.read_stored(i, e), e)

    def read_parent_chunk(self, i: int) -> bytes:
        """Chunk i of a PARENT entry, read from the parent. The parent authenticates its own chunks,
        and its identity (chain_digest, covering every chunk digest) was checked against this
        image's authenticated PARENT section when it was attached, so no second hash is needed here
        (verify of a chain checks this image's own digest of the chunk too)."""
        if self.parent is None:
            raise BadImage(f"{self.path} is an incremental image and its parent is not open",
                           hint="open it with imgkit.open_image (it finds the parent)")
        return self.parent.read_chunk(i)

    def decode_stored(self, i: int, stored: bytes, e: L.IndexEntry | None = None) -> bytes:
        """Authenticate, decompress and hash-check the stored bytes of DATA chunk i."""
        e = e or self.index[i]
        length = self.chunk_length(i)
        offset = i * self.chunk_size
        if self.sealer:
            stored = self.sealer.open_chunk(e.object, length, e.encoding, stored, offset)
        if e.encoding == L.ENCODING_ZSTD:
            try:
                data = bounded_decompress(self._decompressor(), stored, length)
            except zstandard.ZstdError:
                raise CorruptChunk(f"chunk at offset {offset} does not decompress (damaged)", offset) from None
        else:
            data = stored
        if len(data) != length or L.chunk_digest(self.header.hash_algo, data, self.mac_key) != e.digest:
            raise CorruptChunk(f"chunk at offset {offset} failed its hash check (damaged)", offset)
        return data

    # -- Stream ---------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        end = min(self.size, offset + length)
        parts = []
        pos = offset
        while pos < end:
            i = pos // self.chunk_size
            base = i * self.chunk_size
            if not self._is_data(i):
                n = min(end, base + self.chunk_length(i)) - pos
                parts.append(bytes(n))
            elif pos == base and end - base >= self.chunk_length(i):
                parts.append(self.read_chunk(i))
            else:  # part of a chunk costs the whole chunk: repeated small reads go through a CachingReader
                data = self.read_chunk(i)
                parts.append(data[pos - base:end - base])
            pos = base + self.chunk_length(i)
        return b"".join(parts)

    def runs(self) -> Iterator[Run]:
        kinds = {L.KIND_DATA: DATA, L.KIND_PARENT: DATA, L.KIND_ZERO: ZERO, L.KIND_FREE: FREE}
        return merge_runs(Run(kinds[k], i * self.chunk_size, self.chunk_length(i))
                          for i, k in enumerate(self._kinds))

    def close(self) -> None:
        if self.parent is not None:
            self.parent.close()
        for fd in self._fds:
            try:
                fd.close()
            except OSError:
                pass
        self._fds = []

    # -- facts for info -------------------------------------------------------------------------
    @property
    def volume_paths(self) -> list[str]:
        return [L.volume_path(self.path, n) for n in range(1, self.header.volume_count + 1)]

    @property
    def mtime_ns(self) -> int:
        """When the first volume was last written (the mount shows it as the disk's time)."""
        return self._fds[0].mtime_ns

    def paths(self) -> list[str]:
        return self.volume_paths

    def stored_size(self) -> int:
        return sum(self.volume_sizes)
