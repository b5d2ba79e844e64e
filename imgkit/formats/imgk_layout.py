"""The imgk on-disk layout: the one module that encodes docs/FORMAT.md.

Structs, constants and pure encode/decode functions only; every decode bounds what it reads and
raises BadImage naming the structure. What the fields *mean* (reading chunks, writing volumes) lives
in imgk_reader.py and imgk_writer.py.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

import blake3

from ..errors import BadImage, NewerFormat

MAGIC = b"\x89IMGK\r\n\x1a"
TRAILER_MAGIC = b"IMGKEND1"
DIRECTORY_MAGIC = b"IMGKDIR1"
VERSION_MAJOR = 1
VERSION_MINOR = 0
HEADER_SIZE = 4096
TRAILER_SIZE = 128
INDEX_ENTRY_SIZE = 56
DIRECTORY_HEAD_SIZE = 16
DIRECTORY_ENTRY_SIZE = 64
DIGEST_SIZE = 32

MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20
MAX_STORED_OVERHEAD = 65536  # a stored chunk may exceed chunk_size by at most this (zstd frame, tag)
MAX_SECTIONS = 4096
MAX_SECTION_LENGTH = 256 << 20
MAX_METADATA_LENGTH = 16 << 20
MAX_VOLUMES = 65535
MAX_USED_MAPS = 1024
MAX_PARENT_NAME = 1024  # bytes of the parent's file-name hint (a base name, UTF-8)
MAX_CHAIN_DEPTH = 256  # links a reader follows before calling a chain a loop

HASH_SHA256 = 1
HASH_BLAKE3 = 2
KNOWN_HASHES = (HASH_SHA256, HASH_BLAKE3)
CIPHER_NONE = 0
CIPHER_AES_256_GCM = 1
KDF_ARGON2ID = 1
AEAD_TAG_SIZE = 16
AEAD_NONCE_SIZE = 12
# A sealed section is nonce (12, random) || ciphertext || tag (16): FORMAT.md, *Sections*.
SECTION_SEAL_OVERHEAD = AEAD_NONCE_SIZE + AEAD_TAG_SIZE

# required_features bits
FEATURE_ENCRYPTED = 1 << 0
FEATURE_MULTI_VOLUME = 1 << 1
FEATURE_PARENT = 1 << 2
KNOWN_REQUIRED_FEATURES = FEATURE_ENCRYPTED | FEATURE_MULTI_VOLUME | FEATURE_PARENT
# Bits outside the header core: they describe the layout (volumes) or the chain (parent), which
# split/join and consolidate --into change without re-sealing the chunks bound to the core.
LAYOUT_FEATURES = FEATURE_MULTI_VOLUME | FEATURE_PARENT
# optional_features bits
OPTIONAL_USED_MAPS = 1 << 0

# index entry kinds
KIND_ZERO = 0
KIND_DATA = 1
KIND_FREE = 2
KIND_PARENT = 3
KIND_NAMES = {KIND_ZERO: "zero", KIND_DATA: "data", KIND_FREE: "free", KIND_PARENT: "parent"}

# chunk / section encodings
ENCODING_RAW = 0
ENCODING_ZSTD = 1
KNOWN_ENCODINGS = (ENCODING_RAW, ENCODING_ZSTD)

# section types
SECTION_INDEX = 1
SECTION_METADATA = 2
SECTION_VOLUMES = 3
SECTION_USED_MAP = 4
SECTION_PARENT = 5
SECTION_FLAG_REQUIRED = 1

# key-slot caps a reader enforces before deriving anything (a hostile header cannot force a huge KDF)
KDF_MAX_ITERATIONS = 16
# 64 MiB: what imgkit writes (RFC 9106's second option). A hostile header can then make a reader
# spend at most 64 MiB on the derivation (the 100 MiB bound on crafted input, issue 13).
KDF_MAX_MEMORY_KIB = 64 << 10
KDF_MIN_MEMORY_KIB = 8
KDF_MAX_LANES = 16

_HEADER_FIXED = struct.Struct("<8sHHIQQ16sIIQIBBHQ")  # bytes 0..79
_KEY_SLOT = struct.Struct("<B3xIII16s12s48s")  # 92 bytes used of 256
_INDEX_ENTRY = struct.Struct("<BBHIQQ32s")
_DIRECTORY_HEAD = struct.Struct("<8sI4x")
_DIRECTORY_ENTRY = struct.Struct("<IIQQQ32s")
_TRAILER = struct.Struct("<8s16sQII32s32s24s")
_USED_MAP_HEAD = struct.Struct("<IIQQ")
USED_MAP_HEAD_SIZE = _USED_MAP_HEAD.size
_PARENT_HEAD = struct.Struct("<16s32sQIH2x")
PARENT_SECTION_MAX = _PARENT_HEAD.size + MAX_PARENT_NAME
KEY_SLOT_OFFSET = 128
KEY_SLOT_SIZE = 256
HEADER_CHECKSUM_OFFSET = HEADER_SIZE - DIGEST_SIZE
assert _HEADER_FIXED.size == 80 and _INDEX_ENTRY.size == INDEX_ENTRY_SIZE
assert _DIRECTORY_ENTRY.size == DIRECTORY_ENTRY_SIZE and _TRAILER.size == TRAILER_SIZE


def chunk_digest(hash_algo: int, data: bytes, key: bytes = b"") -> bytes:
    """The digest of a chunk's logical bytes under the image's hash_algo (FORMAT.md, *Integrity*).
    BLAKE3 (the default) hashes 4.6 GB/s on one core here against SHA-256's 1.1 GB/s, which made the
    hash the largest cost of a restore; keyed BLAKE3 under mac_key for encrypted images."""
    if hash_algo == HASH_BLAKE3:
        return (blake3.blake3(data, key=key) if key else blake3.blake3(data)).digest()
    return digest(data, key)


def digest(data: bytes, key: bytes = b"") -> bytes:
    """The image's integrity function: SHA-256, or HMAC-SHA256 under mac_key for encrypted images.
    Chosen by measurement: with SHA-NI, hashlib's SHA-256 hashes 1.2 GB/s here, BLAKE2b 0.53 GB/s."""
    if key:
        return hmac.digest(key, data, "sha256")
    return hashlib.sha256(data).digest()


@dataclass
class KeySlot:
    kdf: int
    iterations: int
    memory_kib: int
    lanes: int
    salt: bytes
    wrap_nonce: bytes
    wrapped_key: bytes

    def encode(self) -> bytes:
        raw = _KEY_SLOT.pack(self.kdf, self.iterations, self.memory_kib, self.lanes, self.salt,
                             self.wrap_nonce, self.wrapped_key)
        return raw.ljust(KEY_SLOT_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> "KeySlot":
        kdf, t, m, p, salt, nonce, wrapped = _KEY_SLOT.unpack_from(raw)
        if kdf != KDF_ARGON2ID:
            raise NewerFormat(f"key slot uses unknown key derivation {kdf}", hint="made by a newer imgkit?")
        if not (1 <= t <= KDF_MAX_ITERATIONS and KDF_MIN_MEMORY_KIB <= m <= KDF_MAX_MEMORY_KIB
                and 1 <= p <= KDF_MAX_LANES and m >= 8 * p):
            raise BadImage(f"key slot asks for Argon2id t={t} m={m} KiB p={p}, beyond the caps "
                           f"(t<={KDF_MAX_ITERATIONS}, m<={KDF_MAX_MEMORY_KIB} KiB, p<={KDF_MAX_LANES}, m>=8p): "
                           "refusing a hostile or damaged header")
        return cls(kdf, t, m, p, salt, nonce, wrapped)


KEY_SLOT_USED = _KEY_SLOT.size
# Header byte ranges that are reserved (FORMAT.md, *Header*, *Key slot*): all must be zero.
_RESERVED_RANGES = ((70, 72), (80, KEY_SLOT_OFFSET), (KEY_SLOT_OFFSET + KEY_SLOT_USED, KEY_SLOT_OFFSET + KEY_SLOT_SIZE),
                    (KEY_SLOT_OFFSET + KEY_SLOT_SIZE, HEADER_CHECKSUM_OFFSET))


def _nonzero_reserved(raw: bytes, encrypted: bool) -> int | None:
    """The offset of the first non-zero reserved header byte (the whole key slot when the image is
    not encrypted, and the key slot's 3 padding bytes), or None."""
    ranges = list(_RESERVED_RANGES) + [(KEY_SLOT_OFFSET + 1, KEY_SLOT_OFFSET + 4)]
    if not encrypted:
        ranges.append((KEY_SLOT_OFFSET, KEY_SLOT_OFFSET + KEY_SLOT_SIZE))
    for lo, hi in ranges:
        chunk = raw[lo:hi]
        if chunk.count(0) != len(chunk):
            return lo + next(i for i, b in enumerate(chunk) if b)
    return None


@dataclass
class Header:
    image_id: bytes
    logical_size: int
    chunk_size: int
    volume_number: int = 1
    volume_count: int = 1
    required_features: int = 0
    optional_features: int = 0
    hash_algo: int = HASH_BLAKE3
    cipher: int = CIPHER_NONE
    created: int = 0
    key_slot: KeySlot | None = None
    version_major: int = VERSION_MAJOR
    version_minor: int = VERSION_MINOR

    @property
    def chunk_count(self) -> int:
        return -(-self.logical_size // self.chunk_size)

    @property
    def encrypted(self) -> bool:
        return bool(self.required_features & FEATURE_ENCRYPTED)

    def _fixed(self) -> bytes:
        return _HEADER_FIXED.pack(MAGIC, self.version_major, self.version_minor, HEADER_SIZE,
                                  self.required_features, self.optional_features, self.image_id,
                                  self.volume_number, self.volume_count, self.logical_size,
                                  self.chunk_size, self.hash_algo, self.cipher, 0, self.created)

    def core(self) -> bytes:
        """The bytes that never change after capture (FORMAT.md, *Header*: the core). The
        MULTI_VOLUME and PARENT bits read as 0 here: they describe the volume layout and the chain,
        which split/join and consolidate --into change without re-encrypting the chunks that the core
        is bound into (the PARENT section, bound by the trailer, says which parent)."""
        fixed = bytearray(self._fixed())
        fixed[16:24] = struct.pack("<Q", self.required_features & ~LAYOUT_FEATURES)
        return bytes(fixed[:48] + fixed[56:80])

    def core_digest(self) -> bytes:
        return digest(self.core())

    def encode(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        buf[:80] = self._fixed()
        if self.key_slot is not None:
            buf[KEY_SLOT_OFFSET:KEY_SLOT_OFFSET + KEY_SLOT_SIZE] = self.key_slot.encode()
        buf[HEADER_CHECKSUM_OFFSET:] = digest(bytes(buf[:HEADER_CHECKSUM_OFFSET]))
        return bytes(buf)

    @classmethod
    def decode(cls, raw: bytes, where: str = "image") -> "Header":
        if len(raw) < len(MAGIC) or raw[:len(MAGIC)] != MAGIC:
            raise BadImage(f"{where}: not an imgk image (no imgk magic at offset 0)")
        if len(raw) < HEADER_SIZE:
            raise BadImage(f"{where}: truncated header ({len(raw)} of {HEADER_SIZE} bytes)")
        (_magic, major, minor, header_size, required, optional, image_id, vol_no, vol_count, size,
         chunk_size, hash_algo, cipher, _res, created) = _HEADER_FIXED.unpack_from(raw)
        if major > VERSION_MAJOR:
            raise NewerFormat(f"{where}: format version {major}.{minor} was made by a newer imgkit",
                              hint="upgrade imgkit to read this image")
        if digest(raw[:HEADER_CHECKSUM_OFFSET]) != raw[HEADER_CHECKSUM_OFFSET:HEADER_SIZE]:
            raise BadImage(f"{where}: header checksum mismatch (the header is damaged)")
        unknown = required & ~KNOWN_REQUIRED_FEATURES
        if unknown:
            raise NewerFormat(f"{where}: uses required features 0x{unknown:x} unknown to this imgkit "
                              "(made by a newer imgkit)", hint="upgrade imgkit to read this image")
        if header_size != HEADER_SIZE:
            raise BadImage(f"{where}: header size {header_size}, expected {HEADER_SIZE}")
        if (chunk_size < MIN_CHUNK_SIZE or chunk_size > MAX_CHUNK_SIZE
                or chunk_size & (chunk_size - 1)):
            raise BadImage(f"{where}: chunk size {chunk_size} is not a power of two in 64 KiB..64 MiB")
        if hash_algo not in KNOWN_HASHES:
            raise NewerFormat(f"{where}: unknown hash algorithm {hash_algo}")
        if not (1 <= vol_no <= vol_count <= MAX_VOLUMES):
            raise BadImage(f"{where}: volume {vol_no} of {vol_count} is out of range")
        if (vol_count > 1) != bool(required & FEATURE_MULTI_VOLUME):
            # The bit is outside the core (split/join change it), so it must agree with the count.
            raise BadImage(f"{where}: {vol_count} volume(s) but the multi-volume feature is "
                           f"{'off' if vol_count > 1 else 'on'}")
        encrypted = bool(required & FEATURE_ENCRYPTED)
        if encrypted != (cipher == CIPHER_AES_256_GCM) or cipher not in (CIPHER_NONE, CIPHER_AES_256_GCM):
            raise BadImage(f"{where}: cipher {cipher} does not match the encryption feature bit")
        reserved = _nonzero_reserved(raw, encrypted)
        if reserved is not None:
            # Reserved bytes are outside every keyed MAC, so they must be zero: otherwise a changed
            # byte with a recomputed (unkeyed) header checksum would go unnoticed.
            raise BadImage(f"{where}: reserved header byte {reserved} is not zero (damaged or tampered with)")
        slot = KeySlot.decode(raw[KEY_SLOT_OFFSET:KEY_SLOT_OFFSET + KEY_SLOT_SIZE]) if encrypted else None
        return cls(image_id=image_id, logical_size=size, chunk_size=chunk_size, volume_number=vol_no,
                   volume_count=vol_count, required_features=required, optional_features=optional,
                   hash_algo=hash_algo, cipher=cipher, created=created, key_slot=slot,
                   version_major=major, version_minor=minor)


@dataclass(frozen=True)
class IndexEntry:
    kind: int
    encoding: int = ENCODING_RAW
    volume: int = 0
    stored_length: int = 0
    offset: int = 0
    object: int = 0
    digest: bytes = bytes(DIGEST_SIZE)

    def encode(self) -> bytes:
        return _INDEX_ENTRY.pack(self.kind, self.encoding, self.volume, self.stored_length,
                                 self.offset, self.object, self.digest)


ZERO_ENTRY = IndexEntry(KIND_ZERO)
FREE_ENTRY = IndexEntry(KIND_FREE)


class IndexTable:
    """The decoded index: a read-only sequence of IndexEntry. Every entry is bound-checked once when
    the table is built; entries are kept as their 56 encoded bytes and decoded on access, so a
    reader holds 56 bytes per chunk (a 1 TiB disk in 1 MiB chunks: 56 MiB), not Python objects."""

    def __init__(self, raw: bytes, header: Header, volume_sizes: list[int]):
        count = header.chunk_count
        if len(raw) != count * INDEX_ENTRY_SIZE:
            raise BadImage(f"index holds {len(raw)} bytes, expected {count} entries of {INDEX_ENTRY_SIZE}")
        max_stored = header.chunk_size + MAX_STORED_OVERHEAD
        has_parent = bool(header.required_features & FEATURE_PARENT)
        for i, (kind, encoding, volume, stored, offset, obj, _digest) in enumerate(_INDEX_ENTRY.iter_unpack(raw)):
            if kind == KIND_PARENT and not has_parent:
                raise BadImage(f"index entry {i} (offset {i * header.chunk_size}): a parent entry in an "
                               "image without a parent")
            if kind in (KIND_ZERO, KIND_FREE, KIND_PARENT):
                if encoding or volume or stored or offset or obj:
                    raise BadImage(f"index entry {i} (offset {i * header.chunk_size}): a {KIND_NAMES[kind]} "
                                   "entry with a stored place")
                continue
            if kind != KIND_DATA:
                raise BadImage(f"index entry {i} (offset {i * header.chunk_size}): unknown kind {kind}")
            if encoding not in KNOWN_ENCODINGS:
                raise BadImage(f"index entry {i}: unknown encoding {encoding}")
            if not 1 <= volume <= len(volume_sizes):
                raise BadImage(f"index entry {i}: volume {volume} of {len(volume_sizes)}")
            if stored == 0 or stored > max_stored or offset < HEADER_SIZE or offset + stored > volume_sizes[volume - 1]:
                raise BadImage(f"index entry {i} (offset {i * header.chunk_size}): stored chunk at "
                               f"{offset}+{stored} lies outside volume {volume}")
            if obj >= count:
                raise BadImage(f"index entry {i}: object {obj} is not a chunk index")
        self._raw = bytes(raw)
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> IndexEntry:
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(i)
        pos = i * INDEX_ENTRY_SIZE
        kind = self._raw[pos]
        if kind == KIND_ZERO:
            return ZERO_ENTRY
        if kind == KIND_FREE:
            return FREE_ENTRY
        return IndexEntry(*_INDEX_ENTRY.unpack_from(self._raw, pos))

    def __iter__(self):
        for fields in _INDEX_ENTRY.iter_unpack(self._raw):
            kind = fields[0]
            yield ZERO_ENTRY if kind == KIND_ZERO else FREE_ENTRY if kind == KIND_FREE else IndexEntry(*fields)

    def kinds(self) -> bytes:
        """One byte per chunk: its kind (cheap scans for runs and counts)."""
        return self._raw[::INDEX_ENTRY_SIZE]


def decode_index(raw: bytes, header: Header, volume_sizes: list[int]) -> IndexTable:
    """Decode and bound-check every entry (FORMAT.md, *Index entry*)."""
    return IndexTable(raw, header, volume_sizes)


@dataclass(frozen=True)
class SectionEntry:
    type: int
    flags: int
    offset: int
    stored_length: int
    length: int
    digest: bytes

    @property
    def required(self) -> bool:
        return bool(self.flags & SECTION_FLAG_REQUIRED)


def encode_directory(entries: list[SectionEntry]) -> bytes:
    out = [_DIRECTORY_HEAD.pack(DIRECTORY_MAGIC, len(entries))]
    out += [_DIRECTORY_ENTRY.pack(e.type, e.flags, e.offset, e.stored_length, e.length, e.digest)
            for e in entries]
    return b"".join(out)


def decode_directory(raw: bytes, directory_offset: int) -> list[SectionEntry]:
    if len(raw) < DIRECTORY_HEAD_SIZE:
        raise BadImage("section directory is truncated")
    magic, count = _DIRECTORY_HEAD.unpack_from(raw)
    if magic != DIRECTORY_MAGIC:
        raise BadImage("section directory has a bad magic")
    if count > MAX_SECTIONS or len(raw) != DIRECTORY_HEAD_SIZE + count * DIRECTORY_ENTRY_SIZE:
        raise BadImage(f"section directory claims {count} sections in {len(raw)} bytes")
    out = []
    for i in range(count):
        t, flags, off, stored, length, digest = _DIRECTORY_ENTRY.unpack_from(
            raw, DIRECTORY_HEAD_SIZE + i * DIRECTORY_ENTRY_SIZE)
        if off < HEADER_SIZE or off + stored > directory_offset or stored > MAX_SECTION_LENGTH + 4096 \
                or length > MAX_SECTION_LENGTH:
            raise BadImage(f"section {i} (type {t}) at {off}+{stored} is out of bounds")
        out.append(SectionEntry(t, flags, off, stored, length, digest))
    return out


@dataclass(frozen=True)
class SectionBudget:
    """What a reader will decode of one section type, known from the header before any section is
    read or decompressed (FORMAT.md, *Section budgets*)."""
    name: str
    min_count: int
    max_count: int
    max_total: int                   # decoded bytes of all sections of this type together
    exact_length: int | None = None  # each section's decoded length, when the header fixes it


def max_logical_size(chunk_size: int) -> int:
    """The largest disk whose index (chunk_count x 56 bytes) fits in one section."""
    return (MAX_SECTION_LENGTH // INDEX_ENTRY_SIZE) * chunk_size


def chunk_size_for(logical_size: int) -> int | None:
    """The smallest valid chunk size whose index holds a disk of `logical_size`, or None."""
    size = MIN_CHUNK_SIZE
    while size <= MAX_CHUNK_SIZE:
        if logical_size <= max_logical_size(size):
            return size
        size <<= 1
    return None


def used_map_bitmap_bytes(logical_size: int) -> int:
    """The bitmap bytes all USED_MAPs of a disk can need together: maps cover disjoint partitions
    with blocks of at least 512 bytes, so one bit per 512-byte sector of the disk at most."""
    return -(-logical_size // (512 * 8))


def section_budgets(header: "Header") -> dict[int, SectionBudget]:
    """The budget of every section type this reader decodes. Types without a budget are not decoded
    (unknown and not required) or refused (unknown and required). A new section type (e.g. PARENT)
    gets its entry here, or it is never decoded."""
    index_length = header.chunk_count * INDEX_ENTRY_SIZE
    return {
        SECTION_INDEX: SectionBudget("index", 1, 1, index_length, index_length),
        SECTION_METADATA: SectionBudget("metadata", 1, 1, MAX_METADATA_LENGTH),
        SECTION_VOLUMES: SectionBudget("volume table", 1, 1, 8 * header.volume_count, 8 * header.volume_count),
        SECTION_USED_MAP: SectionBudget(
            "used-block map", 0, MAX_USED_MAPS,
            MAX_USED_MAPS * (USED_MAP_HEAD_SIZE + 1) + used_map_bitmap_bytes(header.logical_size)),
        # Exactly one when the PARENT bit is set, else none: checked both ways, so a header whose
        # PARENT bit was cleared (it is outside the core) cannot make a child read as a full image.
        SECTION_PARENT: SectionBudget("parent", *((1, 1) if header.required_features & FEATURE_PARENT else (0, 0)),
                                      PARENT_SECTION_MAX),
    }


def check_section_budgets(sections: list["SectionEntry"], header: "Header") -> dict[int, SectionBudget]:
    """Check the directory as a whole against the budgets before anything is decoded, so the
    decoded bytes of any image are bounded by its declared geometry: one index of chunk_count x 56
    bytes, one volume table, metadata <= 16 MiB, and all used-block maps together no larger than
    one bit per sector of the disk (a crafted directory pointing 1024 entries at one small frame
    that decodes to 256 MiB is refused here, not after decoding it 1024 times)."""
    budgets = section_budgets(header)
    counts: dict[int, int] = {}
    totals: dict[int, int] = {}
    for e in sections:
        b = budgets.get(e.type)
        if b is None:
            continue
        counts[e.type] = counts.get(e.type, 0) + 1
        totals[e.type] = totals.get(e.type, 0) + e.length
        if b.exact_length is not None and e.length != b.exact_length:
            raise BadImage(f"the {b.name} section declares {e.length} bytes, expected {b.exact_length}")
    for t, b in budgets.items():
        n = counts.get(t, 0)
        if not b.min_count <= n <= b.max_count:
            want = f"exactly {b.min_count}" if b.min_count == b.max_count else f"at most {b.max_count}"
            raise BadImage(f"the image has {n} {b.name} sections, expected {want}")
        if totals.get(t, 0) > b.max_total:
            raise BadImage(f"the {b.name} sections declare {totals[t]} decoded bytes, more than the "
                           f"{b.max_total} this image's size allows: refusing a crafted or damaged image")
    return budgets


@dataclass
class Trailer:
    image_id: bytes
    directory_offset: int
    directory_length: int
    volume_count: int
    core_digest: bytes
    directory_digest: bytes

    def _body(self) -> bytes:
        return _TRAILER.pack(TRAILER_MAGIC, self.image_id, self.directory_offset, self.directory_length,
                             self.volume_count, self.core_digest, self.directory_digest, b"")[:104]

    def encode(self, mac_key: bytes = b"") -> bytes:
        body = self._body()
        return body + digest(body, mac_key)[:24]

    @classmethod
    def decode(cls, raw: bytes, volume_size: int, mac_key: bytes = b"") -> "Trailer":
        if len(raw) != TRAILER_SIZE or raw[:8] != TRAILER_MAGIC:
            raise BadImage("no trailer at the end of the last volume: the image is truncated or was "
                           "never completed")
        _m, image_id, d_off, d_len, vols, core, d_digest, mac = _TRAILER.unpack(raw)
        if digest(raw[:104], mac_key)[:24] != mac:
            raise BadImage("trailer checksum mismatch (the trailer is damaged or tampered with)")
        if d_len < DIRECTORY_HEAD_SIZE or d_len > DIRECTORY_HEAD_SIZE + MAX_SECTIONS * DIRECTORY_ENTRY_SIZE:
            raise BadImage(f"trailer gives the directory an impossible length {d_len}")
        if d_off < HEADER_SIZE or d_off + d_len != volume_size - TRAILER_SIZE:
            raise BadImage(f"trailer points to a directory at {d_off}+{d_len}, outside the volume")
        return cls(image_id, d_off, d_len, vols, core, d_digest)


def volume_path(path: str, number: int) -> str:
    """The file of volume `number` (1-based) of the image at `path`: NAME.imgk, NAME.imgk.002, ..."""
    return path if number == 1 else f"{path}.{number:03d}"


def encode_volume_table(sizes: list[int]) -> bytes:
    return struct.pack(f"<{len(sizes)}Q", *sizes)


def decode_volume_table(raw: bytes, volume_count: int) -> list[int]:
    if len(raw) != 8 * volume_count:
        raise BadImage(f"volume table has {len(raw)} bytes for {volume_count} volumes")
    return list(struct.unpack(f"<{volume_count}Q", raw))


@dataclass
class UsedMap:
    """Which blocks of one partition the filesystem uses (FORMAT.md, section USED_MAP)."""
    partition_number: int
    block_size: int
    first_byte: int
    block_count: int
    bitmap: bytes = field(repr=False)

    def encode(self) -> bytes:
        return _USED_MAP_HEAD.pack(self.partition_number, self.block_size, self.first_byte,
                                   self.block_count) + self.bitmap

    @staticmethod
    def check_head(head: bytes, length: int, logical_size: int | None = None) -> None:
        """Check a map's 24-byte head against its decoded `length` (and the disk's size)."""
        if len(head) < _USED_MAP_HEAD.size or length < _USED_MAP_HEAD.size:
            raise BadImage("used-block map is truncated")
        part, bs, first, count = _USED_MAP_HEAD.unpack_from(head)
        if bs < 512 or bs > (1 << 20) or bs & (bs - 1) or length - _USED_MAP_HEAD.size != -(-count // 8):
            raise BadImage(f"used-block map of partition {part} is inconsistent")
        if logical_size is not None and (first > logical_size or count > -(-(logical_size - first) // bs)):
            raise BadImage(f"used-block map of partition {part} covers blocks beyond the disk")

    @classmethod
    def decode(cls, raw: bytes, logical_size: int | None = None) -> "UsedMap":
        cls.check_head(raw[:_USED_MAP_HEAD.size], len(raw), logical_size)
        part, bs, first, count = _USED_MAP_HEAD.unpack_from(raw)
        return cls(part, bs, first, count, raw[_USED_MAP_HEAD.size:])


def chunk_nonce(obj: int) -> bytes:
    return b"\0\0\0\0" + struct.pack("<Q", obj)


def chunk_ad(core_digest: bytes, obj: int, length: int, encoding: int) -> bytes:
    return b"imgkit-chunk-v1" + core_digest + struct.pack("<QIB", obj, length, encoding)


def replace_key_slot(raw_header: bytes, slot: KeySlot) -> bytes:
    """A volume's header with a new key slot and checksum, every other byte as it was (`passwd`)."""
    if len(raw_header) != HEADER_SIZE:
        raise BadImage("header is truncated")
    buf = bytearray(raw_header)
    buf[KEY_SLOT_OFFSET:KEY_SLOT_OFFSET + KEY_SLOT_SIZE] = slot.encode()
    buf[HEADER_CHECKSUM_OFFSET:] = digest(bytes(buf[:HEADER_CHECKSUM_OFFSET]))
    return bytes(buf)


def section_ad(core_digest: bytes, section_type: int, seq: int) -> bytes:
    return b"imgkit-section-v1" + core_digest + struct.pack("<IQ", section_type, seq)


def wrap_ad(core_digest: bytes) -> bytes:
    return b"imgkit-wrap-v1" + core_digest


@dataclass(frozen=True)
class ParentRef:
    """The PARENT section (FORMAT.md, *Incremental images*): which image this one is a child of."""
    image_id: bytes
    content_digest: bytes  # chain_digest() of the parent
    logical_size: int
    chunk_size: int
    name: str  # the parent's file name when the child was made: a hint, never trusted as a path

    def encode(self) -> bytes:
        name = self.name.encode()
        return _PARENT_HEAD.pack(self.image_id, self.content_digest, self.logical_size, self.chunk_size,
                                 len(name)) + name

    @classmethod
    def decode(cls, raw: bytes) -> "ParentRef":
        if len(raw) < _PARENT_HEAD.size:
            raise BadImage("parent section is truncated")
        image_id, content, size, chunk_size, name_len = _PARENT_HEAD.unpack_from(raw)
        name_raw = raw[_PARENT_HEAD.size:]
        if name_len > MAX_PARENT_NAME or len(name_raw) != name_len:
            raise BadImage("parent section: the file-name hint does not fit its declared length")
        try:
            name = name_raw.decode()
        except UnicodeDecodeError:
            raise BadImage("parent section: the file-name hint is not UTF-8") from None
        if not valid_parent_name(name):
            raise BadImage(f"parent section: the file-name hint {name!r} is not a plain file name")
        if chunk_size < MIN_CHUNK_SIZE or chunk_size > MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
            raise BadImage(f"parent section: chunk size {chunk_size} is impossible")
        return cls(image_id, content, size, chunk_size, name)


def valid_parent_name(name: str) -> bool:
    """A hint is a base name only: a hostile child cannot make a reader open /etc/shadow or ../x."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name \
        and len(name.encode()) <= MAX_PARENT_NAME


def chain_digest(header: Header, index: "IndexTable") -> bytes:
    """The identity a child pins its parent by (FORMAT.md, *Incremental images*): SHA-256 over the
    image id, sizes, hash algorithm and, per chunk, whether it holds data and that data's digest.
    It ignores where chunks are stored (split/join), the key slot (passwd) and whether a chunk is
    stored here or in a further parent (consolidate), so those keep a chain valid, while any change
    of content, of the image's identity or of its digests changes it."""
    h = hashlib.sha256(b"imgkit-chain-v1")
    h.update(header.image_id + struct.pack("<QIB", header.logical_size, header.chunk_size, header.hash_algo))
    raw = memoryview(index._raw)
    none = bytes(1 + DIGEST_SIZE)
    for pos in range(0, len(raw), INDEX_ENTRY_SIZE):
        kind = raw[pos]
        if kind in (KIND_DATA, KIND_PARENT):
            h.update(b"\1")
            h.update(raw[pos + 24:pos + 24 + DIGEST_SIZE])
        else:
            h.update(none)
    return h.digest()


# -- metadata schema (FORMAT.md, *Metadata*) -------------------------------------------------------
# The metadata is JSON written by imgkit, but read from an untrusted image: every key a reader uses
# is checked for its type, range and length when the image is opened, so no command meets a string
# where it wants a number (a traceback) or a gigabyte-long label. Unknown keys are allowed (newer
# writers add keys; readers ignore them).
MAX_META_TEXT = 4096
MAX_META_LIST = 4096
U64_MAX = (1 << 64) - 1


class _Spec:
    nullable = False

    def check(self, value, where: str) -> None:
        if value is None:
            if not self.nullable:
                raise BadImage(f"image metadata: {where} is null, expected {self.describe()}")
            return
        self._check(value, where)

    def describe(self) -> str:
        return self.name

    def _wrong(self, value, where: str):
        got = type(value).__name__ if not isinstance(value, (dict, list)) else {dict: "object", list: "list"}[type(value)]
        raise BadImage(f"image metadata: {where} is a {got}, expected {self.describe()}")


class _Text(_Spec):
    name = "text"

    def __init__(self, max_len: int = MAX_META_TEXT, nullable: bool = True, choices: tuple = ()):
        self.max_len, self.nullable, self.choices = max_len, nullable, choices

    def _check(self, value, where):
        if not isinstance(value, str):
            self._wrong(value, where)
        if len(value) > self.max_len:
            raise BadImage(f"image metadata: {where} is {len(value)} characters long (at most {self.max_len})")
        if self.choices and value not in self.choices:
            raise BadImage(f"image metadata: {where} is {value[:40]!r}, expected one of {', '.join(self.choices)}")


class _Int(_Spec):
    name = "integer"

    def __init__(self, lo: int = 0, hi: int = U64_MAX, nullable: bool = False):
        self.lo, self.hi, self.nullable = lo, hi, nullable

    def _check(self, value, where):
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong(value, where)
        if not self.lo <= value <= self.hi:
            raise BadImage(f"image metadata: {where} = {value} is out of range ({self.lo}..{self.hi})")


class _Bool(_Spec):
    name = "boolean"

    def __init__(self, nullable: bool = False):
        self.nullable = nullable

    def _check(self, value, where):
        if not isinstance(value, bool):
            self._wrong(value, where)


class _List(_Spec):
    name = "list"

    def __init__(self, item: _Spec, max_len: int = MAX_META_LIST, nullable: bool = False):
        self.item, self.max_len, self.nullable = item, max_len, nullable

    def _check(self, value, where):
        if not isinstance(value, list):
            self._wrong(value, where)
        if len(value) > self.max_len:
            raise BadImage(f"image metadata: {where} has {len(value)} items (at most {self.max_len})")
        for i, v in enumerate(value):
            self.item.check(v, f"{where}[{i}]")


class _Object(_Spec):
    name = "object"

    def __init__(self, fields: dict, nullable: bool = False, required: tuple = ()):
        self.fields, self.nullable, self.required = fields, nullable, required

    def _check(self, value, where):
        if not isinstance(value, dict):
            self._wrong(value, where)
        for key in self.required:
            if key not in value:
                raise BadImage(f"image metadata: {where or 'the top level'} lacks {key!r}")
        for key, spec in self.fields.items():
            if key in value:
                spec.check(value[key], f"{where}.{key}" if where else key)


_SIZE = _Int()
_SECTOR = _Int(1, 1 << 20, nullable=True)
_FS_FACTS = {"filesystem": _Text(64), "label": _Text(), "used_bytes": _Int(nullable=True),
             "capture_mode": _Text()}
METADATA_SCHEMA = _Object({
    "imgkit_version": _Text(64),
    "created": _Text(64),
    "source": _Object({"path": _Text(), "kind": _Text(64), "size": _Int(nullable=True),
                       "logical_sector_size": _SECTOR, "physical_sector_size": _SECTOR,
                       "model": _Text(), "serial": _Text()}, nullable=True),
    "compression": _Object({"algorithm": _Text(32), "level": _Int(-(1 << 31), 1 << 31, nullable=True)},
                           nullable=True),
    "partition_table": _Object({
        "type": _Text(16, nullable=False, choices=("mbr", "gpt", "none")), "disk_id": _Text(64),
        "sector_size": _SECTOR, "problems": _List(_Text()),
        "partitions": _List(_Object({
            "number": _Int(0, 1 << 20), "start": _SIZE, "size": _SIZE, "type": _Text(64),
            "type_name": _Text(nullable=False), "uuid": _Text(64), "name": _Text(),
            "bootable": _Bool(nullable=True), "logical": _Bool(nullable=True), **_FS_FACTS},
            required=("number", "start", "size", "type", "type_name"))),
        **_FS_FACTS}, nullable=True, required=("type", "partitions")),
    "optical": _Object({"sector_size": _SECTOR, "volume_id": _Text(), "el_torito": _Bool(nullable=True)},
                       nullable=True),
    "capture": _Object({"mode": _Text(32), "partitions": _List(_Int(0, 1 << 20), nullable=True),
                        "warnings": _List(_Text())}, nullable=True),
    "os": _Object({"name": _Text(), "id": _Text(), "version_id": _Text(), "partition": _Int(0, 1 << 20, nullable=True)},
                  nullable=True),
    # Incremental images (FORMAT.md, *Incremental images*): descriptive only; the PARENT section,
    # not these, is what a reader resolves a chain by.
    "incremental": _Object({"base": _Text(), "base_image_id": _Text(64)}, nullable=True),
    "consolidated": _Object({"from": _List(_Text(), max_len=MAX_CHAIN_DEPTH + 1), "at": _Text(64)}, nullable=True),
})


def check_metadata(meta) -> dict:
    """The image's metadata object, checked against METADATA_SCHEMA; BadImage names the first
    field that does not fit."""
    if not isinstance(meta, dict):
        raise BadImage("image metadata is not a JSON object")
    METADATA_SCHEMA.check(meta, "")
    return meta
