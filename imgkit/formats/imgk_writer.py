"""Writes imgk images (docs/FORMAT.md): volumes under temporary names, chunks in order, then the
sections, directory and trailer; fsync, rename, fsync the directory. Until commit() nothing exists
under the final names, so an interrupted capture never leaves an image that looks complete."""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass

import zstandard

from ..errors import InputError
from ..units import format_size
from ..remote.locations import is_s3
from ..platform.writeback import WRITEBACK_STEP, fsync_parent_dir, publish, start_writeback
from . import imgk_layout as L
from .imgk_settings import DEFAULT_CHUNK_SIZE, LEVEL_HIGH, LEVEL_NONE


# Identical chunks are found among the first 256K stored ones (~50 MiB of table): memory stays bounded
# on any disk size, and the duplicates that matter (zero-like, repeated files) appear early anyway.
DEDUP_TABLE_LIMIT = 1 << 18


_ZERO_CACHE: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZERO_CACHE.get(n)
    if z is None:
        if len(_ZERO_CACHE) > 8:
            _ZERO_CACHE.clear()
        z = _ZERO_CACHE[n] = bytes(n)
    return z


def existing_volumes(path: str) -> list[str]:
    """Files named like the volumes of an image at `path`, in order, up to the first gap."""
    out, n = [], 1
    while os.path.exists(L.volume_path(path, n)):
        out.append(L.volume_path(path, n))
        n += 1
    return out


@dataclass
class PreparedChunk:
    """A chunk made ready for storage in a worker thread: hashed, compressed, sealed."""
    index: int
    length: int
    kind: int
    digest: bytes = b""
    encoding: int = L.ENCODING_RAW
    stored: bytes = b""


class ChunkEncoder:
    """Turns a chunk's bytes into a PreparedChunk. Thread-safe: one zstd compressor per thread."""

    def __init__(self, level: int, sealer=None, hash_algo: int = L.HASH_BLAKE3):
        self.level = level
        self.hash_algo = hash_algo
        self.sealer = sealer
        self.mac_key = sealer.mac_key if sealer else b""
        self._local = threading.local()

    def _compressor(self):
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return c

    def prepare(self, index: int, data: bytes | None, length: int) -> PreparedChunk:
        # Comparing with a zero buffer is a memcmp (~20x faster than bytes.count(0) here).
        if data is None or data == _zeros(len(data)):
            return PreparedChunk(index, length, L.KIND_ZERO)
        digest = L.chunk_digest(self.hash_algo, data, self.mac_key)
        encoding, payload = L.ENCODING_RAW, data
        if self.level != LEVEL_NONE:
            packed = self._compressor().compress(data)
            if len(packed) < len(data):
                encoding, payload = L.ENCODING_ZSTD, packed
        if self.sealer:
            payload = self.sealer.seal_chunk(index, length, encoding, payload)
        return PreparedChunk(index, length, L.KIND_DATA, digest, encoding, payload)


def check_geometry(logical_size: int, chunk_size: int) -> None:
    """Refuse, before anything is read, a chunk size the format cannot hold or whose index (56 bytes
    a chunk, one section of at most 256 MiB) cannot describe the disk, naming the chunk size that
    can (a 15 TiB disk in 2 MiB chunks used to fail at the very end of its capture)."""
    if chunk_size < L.MIN_CHUNK_SIZE or chunk_size > L.MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise InputError(f"chunk size {chunk_size} must be a power of two from 64 KiB to 64 MiB")
    if logical_size > L.max_logical_size(chunk_size):
        from ..units import format_size
        fits = L.chunk_size_for(logical_size)
        if fits is None:
            raise InputError(f"a disk of {format_size(logical_size)} is too large for an imgk image "
                             f"(at most {format_size(L.max_logical_size(L.MAX_CHUNK_SIZE))})")
        raise InputError(f"a disk of {format_size(logical_size)} needs more index entries than "
                         f"{format_size(chunk_size)} chunks allow (at most {format_size(L.max_logical_size(chunk_size))})",
                         hint=f"use --chunk-size {f'{fits >> 20}M' if fits >= 1 << 20 else f'{fits >> 10}K'} or larger")


class ImageWriter:
    def __init__(self, path: str, logical_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
                 split_size: int | None = None, sealer_factory=None, template: L.Header | None = None,
                 sealer=None, used_maps: bool = False, replace: bool = False):
        """sealer_factory(image_id, core_digest) -> (Sealer, KeySlot) for encrypted images.
        `template` (with its `sealer`) writes an existing image in a new volume layout (split/join):
        its header core and key slot are kept, so stored chunks, bound to the core, move byte for byte.
        `used_maps`: the image will hold USED_MAP sections. The optional-features field is part of the
        header core, which the key slot and every chunk are bound to, so it is fixed here, not at commit.
        `replace`: commit may replace existing volume names (--force, an in-place re-split); without
        it a name that appeared meanwhile is never replaced (writeback.publish)."""
        check_geometry(logical_size, chunk_size)
        if split_size is not None and split_size < chunk_size + L.MAX_STORED_OVERHEAD + 2 * L.HEADER_SIZE:
            raise InputError(f"split size {format_size(split_size)} ({split_size} bytes) is too small for "
                             f"{format_size(chunk_size)} chunks",
                             hint="use a split size of at least a few MiB")
        self.path = path
        self.replace = replace
        self.split_size = split_size
        if template is not None:
            if template.encrypted != (sealer is not None):
                raise ValueError("an encrypted template needs its sealer (and a plain one none)")
            self.header = dataclasses.replace(template, volume_number=1, volume_count=1)
            self.sealer = sealer
        else:
            required = L.FEATURE_ENCRYPTED if sealer_factory else 0
            self.header = L.Header(image_id=os.urandom(16), logical_size=logical_size, chunk_size=chunk_size,
                                   required_features=required,
                                   optional_features=L.OPTIONAL_USED_MAPS if used_maps else 0,
                                   cipher=L.CIPHER_AES_256_GCM if sealer_factory else L.CIPHER_NONE,
                                   created=int(time.time()))
            self.sealer = None
            if sealer_factory:
                self.sealer, self.header.key_slot = sealer_factory(self.header.image_id,
                                                                   self.header.core_digest())
        self.mac_key = self.sealer.mac_key if self.sealer else b""
        self._index = bytearray(self.header.chunk_count * L.INDEX_ENTRY_SIZE)  # all ZERO entries
        self._dedup: dict[bytes, bytes] = {}  # digest -> encoded index entry
        self._volumes: list = []  # LocalVolume or remote.s3.MultipartSink, one a volume
        self._sizes: list[int] = []
        self._used_maps: list[L.UsedMap] = []
        self._parent: L.ParentRef | None = None
        self.stored_bytes = 0
        self.deduplicated = 0
        self._committed = False
        try:
            self._new_volume()
        except BaseException:
            self.abort()
            raise

    # -- volumes --------------------------------------------------------------------------------
    def _new_volume(self) -> None:
        number = len(self._volumes) + 1
        if number > L.MAX_VOLUMES:
            raise InputError(f"more than {L.MAX_VOLUMES} volumes: choose a larger split size")
        final = L.volume_path(self.path, number)
        if is_s3(final):
            from ..remote.s3 import MultipartSink, part_size_for
            sink = MultipartSink(final, part_size_for(min(self.split_size or self.header.logical_size,
                                                          self.header.logical_size)))
        else:
            sink = LocalVolume(final, self.replace)
        self._volumes.append(sink)
        self._sizes.append(0)
        self.header.volume_number = number
        self._write(self.header.encode())

    def _write(self, data: bytes) -> int:
        """Append to the current volume; return the offset it was written at."""
        offset = self._sizes[-1]
        self._volumes[-1].write(data)
        self._sizes[-1] += len(data)
        return offset

    def _room_for(self, n: int) -> None:
        if self.split_size and self._sizes[-1] > L.HEADER_SIZE and self._sizes[-1] + n > self.split_size:
            self._new_volume()

    # -- chunks ---------------------------------------------------------------------------------
    def put(self, chunk: PreparedChunk) -> None:
        """Record one chunk; chunks may come in any order but each index once."""
        if chunk.kind == L.KIND_ZERO:
            return  # the index is pre-filled with ZERO entries
        if chunk.kind == L.KIND_FREE:
            encoded = L.FREE_ENTRY.encode()
        elif chunk.kind == L.KIND_PARENT:  # unchanged since the parent: only the digest is kept
            encoded = L.IndexEntry(L.KIND_PARENT, digest=chunk.digest).encode()
        else:
            encoded = self._dedup.get(chunk.digest)
            if encoded is None:
                self._room_for(len(chunk.stored))
                offset = self._write(chunk.stored)
                self.stored_bytes += len(chunk.stored)
                encoded = L.IndexEntry(L.KIND_DATA, chunk.encoding, len(self._volumes), len(chunk.stored),
                                       offset, chunk.index, chunk.digest).encode()
                if len(self._dedup) < DEDUP_TABLE_LIMIT:
                    self._dedup[chunk.digest] = encoded
            else:
                self.deduplicated += 1
        pos = chunk.index * L.INDEX_ENTRY_SIZE
        self._index[pos:pos + L.INDEX_ENTRY_SIZE] = encoded

    def copy_stored(self, stored: bytes) -> tuple[int, int]:
        """Append one stored chunk byte for byte, taken from another layout of this image
        (split/join); returns its (volume, offset) for the index entry (see set_entry)."""
        self._room_for(len(stored))
        offset = self._write(stored)
        self.stored_bytes += len(stored)
        return len(self._volumes), offset

    def set_entry(self, index: int, entry: L.IndexEntry) -> None:
        """Set chunk `index`'s index entry as given (split/join, with copy_stored)."""
        pos = index * L.INDEX_ENTRY_SIZE
        self._index[pos:pos + L.INDEX_ENTRY_SIZE] = entry.encode()

    def set_parent(self, ref: L.ParentRef | None) -> None:
        """Make this image a child of `ref` (a PARENT section; the PARENT feature bit, outside the
        header core, follows it at commit)."""
        if ref is not None and (ref.chunk_size != self.header.chunk_size):
            raise ValueError("a child has its parent's chunk size")
        self._parent = ref

    def add_used_map(self, used_map: L.UsedMap) -> None:
        if not self.header.optional_features & L.OPTIONAL_USED_MAPS:
            raise ValueError("ImageWriter(used_maps=True) is needed to store used-block maps")
        self._used_maps.append(used_map)

    # -- completion -----------------------------------------------------------------------------
    def commit(self, metadata: dict, before_publish=None) -> list[str]:
        """Write sections, directory and trailer; make the image durable and visible. Returns paths.
        `before_publish()` runs once every volume is durable, before any is renamed into place (the
        crash tests of consolidate stop there)."""
        z = zstandard.ZstdCompressor(level=LEVEL_HIGH)  # sections are small and written once
        meta_raw = json.dumps(metadata, sort_keys=True).encode()
        if len(meta_raw) > L.MAX_METADATA_LENGTH:
            raise InputError("image metadata exceeds 16 MiB")
        sections: list[tuple[int, int, bytes, bytes]] = [  # (type, flags, decoded, stored-unsealed)
            (L.SECTION_INDEX, L.SECTION_FLAG_REQUIRED, bytes(self._index), None),
            (L.SECTION_METADATA, L.SECTION_FLAG_REQUIRED, meta_raw, None),
        ]
        for m in self._used_maps:
            sections.append((L.SECTION_USED_MAP, 0, m.encode(), None))
        if self._parent is not None:
            sections.append((L.SECTION_PARENT, L.SECTION_FLAG_REQUIRED, self._parent.encode(), None))
            self.header.required_features |= L.FEATURE_PARENT
        else:
            self.header.required_features &= ~L.FEATURE_PARENT
        encoded = []
        for seq, (stype, flags, raw, _) in enumerate(sections):
            if len(raw) > L.MAX_SECTION_LENGTH:
                raise InputError(f"section {stype} exceeds {L.MAX_SECTION_LENGTH} bytes (disk too large "
                                 "for this chunk size: choose a larger --chunk-size)")
            encoded.append((stype, flags, raw, raw if stype == L.SECTION_PARENT else z.compress(raw)))
        # The volume table is the last section: its own volume's size must include everything after it,
        # so find the final layout first (sections never straddle volumes).
        n_sections = len(encoded) + 1
        tag = L.SECTION_SEAL_OVERHEAD if self.sealer else 0
        tail = (sum(len(e[3]) + tag for e in encoded) + 8 * (len(self._volumes) + 1) + tag
                + L.DIRECTORY_HEAD_SIZE + n_sections * L.DIRECTORY_ENTRY_SIZE + L.TRAILER_SIZE)
        if self.split_size and tail + L.HEADER_SIZE > self.split_size:
            raise InputError(f"split size {format_size(self.split_size)} cannot hold the image's index "
                             f"({format_size(tail)}, {tail} bytes)",
                             hint="choose a larger split size or chunk size")
        self._room_for(tail)
        count = len(self._volumes)
        directory: list[L.SectionEntry] = []

        def put_section(stype: int, flags: int, raw_len: int, stored: bytes) -> None:
            seq = len(directory)
            if self.sealer:
                stored = self.sealer.seal_section(stype, seq, stored)
            offset = self._write(stored)
            directory.append(L.SectionEntry(stype, flags, offset, len(stored), raw_len,
                                            L.digest(stored, self.mac_key)))

        for stype, flags, raw, packed in encoded:
            put_section(stype, flags, len(raw), packed)
        # The last volume's final size is now known: this section's size + directory + trailer.
        dir_len = L.DIRECTORY_HEAD_SIZE + n_sections * L.DIRECTORY_ENTRY_SIZE
        final_last = self._sizes[-1] + 8 * count + tag + dir_len + L.TRAILER_SIZE
        sizes = self._sizes[:-1] + [final_last]
        put_section(L.SECTION_VOLUMES, L.SECTION_FLAG_REQUIRED, 8 * count, L.encode_volume_table(sizes))
        dir_raw = L.encode_directory(directory)
        dir_offset = self._write(dir_raw)
        self.header.volume_count = count
        # The feature bit follows the layout (it is outside the core, so this changes no binding).
        if count > 1:
            self.header.required_features |= L.FEATURE_MULTI_VOLUME
        else:
            self.header.required_features &= ~L.FEATURE_MULTI_VOLUME
        trailer = L.Trailer(self.header.image_id, dir_offset, len(dir_raw), count,
                            self.header.core_digest(), L.digest(dir_raw, self.mac_key))
        self._write(trailer.encode(self.mac_key))
        assert self._sizes[-1] == final_last
        # Every header now learns the volume count; then durability, then names.
        for number, sink in enumerate(self._volumes, start=1):
            self.header.volume_number = number
            sink.pwrite_head(self.header.encode(), 0)
            sink.sync()
        if before_publish is not None:
            before_publish()
        finals = [L.volume_path(self.path, n) for n in range(1, count + 1)]
        order = list(range(1, count)) + [0]  # volume 1, the name users open, appears last
        published: list[str] = []
        for i in order:
            try:
                self._volumes[i].publish()
            except FileExistsError as e:
                for name in published:  # ours, and incomplete without the rest: take them back
                    os.unlink(name)
                raise InputError(f"{finals[i]}: {e.strerror}", hint="use --force to replace it") from None
            published.append(finals[i])
        if not is_s3(self.path):
            fsync_parent_dir(self.path)
        self._committed = True
        return finals

    @property
    def volume_sizes(self) -> list[int]:
        return list(self._sizes)

    def abort(self) -> None:
        """Remove every temporary volume, abort every upload (called on error or Ctrl-C)."""
        if self._committed:
            return
        for sink in self._volumes:
            sink.abort()


class LocalVolume:
    """A volume file written under a temporary name beside its final one, renamed by publish()."""

    def __init__(self, final: str, replace: bool = False):
        self.final, self.replace = final, replace
        self.tmp = os.path.join(os.path.dirname(os.path.abspath(final)),
                                f".{os.path.basename(final)}.imgkit-partial-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            # O_EXCL | O_NOFOLLOW: a planted symlink or file at the temporary name is never followed.
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise InputError(f"{final}: cannot create the image ({e.strerror})") from None
        self.size = 0
        self._flushed = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as e:  # ENOSPC, EIO, EFBIG: the error names the image, not just the errno
                raise OSError(e.errno, e.strerror, self.final) from None
            view = view[n:]
        self.size += len(data)
        if self.size - self._flushed >= WRITEBACK_STEP:
            # The fsync in commit() then waits for the tail only (see writeback.py).
            start = max(0, self._flushed - WRITEBACK_STEP)  # again: pages then under writeback stayed
            start_writeback(self.fd, start, self.size - start)
            self._flushed = self.size

    def pwrite_head(self, data: bytes, offset: int) -> None:
        os.pwrite(self.fd, data, offset)

    def sync(self) -> None:
        try:
            os.fsync(self.fd)  # a failed fsync raises and is fatal: never retried
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.final) from None

    def publish(self) -> None:
        # Never over a name that appeared meanwhile, unless replacing was asked (writeback.publish).
        publish(self.tmp, self.final, replace=self.replace)
        os.close(self.fd)
        self.fd = -1
        self.tmp = None

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None
