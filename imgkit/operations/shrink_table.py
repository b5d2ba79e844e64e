"""The partition table of a shrunk restore: the image's own table with new starts and sizes.

Everything else is copied from the image byte for byte: the MBR boot code and disk signature, the
GPT disk GUID, each entry's type and unique GUIDs, name and attribute bits, the EBRs' unused bytes.
GPT (UEFI 2.10 section 5.3): both headers rewritten for the new disk size (alternate LBA, last usable
LBA, entry array CRC, header CRC), the backup array and header at the disk's end, the protective
MBR's size. MBR: primary entries, the extended container and each logical's EBR (relative starts,
the link to the next EBR). CHS fields are set to the LBA-only marker (1023/254/63) where the start
or end lies past what CHS can address, as fdisk does.
"""
from __future__ import annotations

import struct
import zlib

from ..errors import BadImage
from ..formats.partitions import PartitionTable
from .shrink_plan import ShrinkPlan
from ..stream import Stream


def _chs(lba: int) -> bytes:
    heads, sectors = 255, 63
    c = lba // (heads * sectors)
    if c > 1023:
        return bytes((254, 0xFF, 0xFF))
    h = (lba // sectors) % heads
    s = lba % sectors + 1
    return bytes((h, ((c >> 2) & 0xC0) | s, c & 0xFF))


def _set_mbr_entry(sector: bytearray, base: int, index: int, lba: int, count: int) -> None:
    off = base + 16 * index
    sector[off + 1:off + 4] = _chs(lba)
    sector[off + 5:off + 8] = _chs(lba + count - 1) if count else b"\0\0\0"
    struct.pack_into("<II", sector, off + 8, lba, count)


def table_writes(image: Stream, table: PartitionTable, plan: ShrinkPlan) -> list[tuple[int, bytes]]:
    """(offset, bytes) writes that put the shrunk table on the target, head (LBA 0..) included.
    The caller writes the image's bytes before the first partition first, then these over them."""
    ss = table.sector_size
    moved = {pp.number: pp for pp in plan.parts}
    if table.type == "gpt":
        return _gpt_writes(image, ss, moved, plan.target_size)
    return _mbr_writes(image, table, ss, moved)


def _gpt_writes(image: Stream, ss: int, moved: dict, target_size: int) -> list[tuple[int, bytes]]:
    hdr = bytearray(image.read(ss, ss))
    if hdr[:8] != b"EFI PART":
        raise BadImage("the image's primary GPT header is missing: cannot lay its partitions out anew")
    hsize, = struct.unpack_from("<I", hdr, 12)
    entries_lba, n_entries, entry_size = struct.unpack_from("<QII", hdr, 72)
    array = bytearray(image.read(entries_lba * ss, n_entries * entry_size))
    for i in range(n_entries):
        pp = moved.get(i + 1)
        e = i * entry_size
        if pp is None or array[e:e + 16] == bytes(16):
            continue
        struct.pack_into("<QQ", array, e + 32, pp.new_start // ss, (pp.new_start + pp.new_size) // ss - 1)
    total = target_size // ss
    array_sectors = -(-len(array) // ss)
    last_lba = total - 1
    backup_entries = last_lba - array_sectors
    array_crc = zlib.crc32(array)

    def header(my: int, alt: int, entries: int) -> bytes:
        h = bytearray(hdr[:hsize])
        struct.pack_into("<QQ", h, 24, my, alt)
        struct.pack_into("<Q", h, 48, backup_entries - 1)  # last usable LBA
        struct.pack_into("<Q", h, 72, entries)
        struct.pack_into("<I", h, 88, array_crc)
        struct.pack_into("<I", h, 16, 0)
        struct.pack_into("<I", h, 16, zlib.crc32(h))
        return bytes(h) + bytes(ss - hsize)

    mbr = bytearray(image.read(0, 512))
    for i in range(4):  # the protective entry covers the disk (or as much as 32 bits say)
        if mbr[446 + 16 * i + 4] == 0xEE:
            count = min(total - 1, 0xFFFFFFFF)
            _set_mbr_entry(mbr, 446, i, 1, count)
    return [(0, bytes(mbr)), (ss, header(1, last_lba, entries_lba)), (entries_lba * ss, bytes(array)),
            (backup_entries * ss, bytes(array)), (last_lba * ss, header(last_lba, 1, backup_entries))]


def _mbr_writes(image: Stream, table: PartitionTable, ss: int, moved: dict) -> list[tuple[int, bytes]]:
    mbr = bytearray(image.read(0, 512))
    writes = []
    for i in range(4):
        pp = moved.get(i + 1)
        if pp is not None and mbr[446 + 16 * i + 4] != 0:
            _set_mbr_entry(mbr, 446, i, pp.new_start // ss, pp.new_size // ss)
    writes.append((0, bytes(mbr)))
    ext = next((p for p in table.partitions if p.is_extended), None)
    if ext is None:
        return writes
    new_ext = moved[ext.number]
    logicals = sorted((p for p in table.partitions if p.logical), key=lambda p: p.number)
    for k, p in enumerate(logicals):
        pp = moved[p.number]
        new_ebr = pp.new_start - (p.start - p.ebr_offset)
        ebr = bytearray(image.read(p.ebr_offset, 512))
        _set_mbr_entry(ebr, 446, 0, (pp.new_start - new_ebr) // ss, pp.new_size // ss)
        if k + 1 < len(logicals):
            nxt, npp = logicals[k + 1], moved[logicals[k + 1].number]
            next_ebr = npp.new_start - (nxt.start - nxt.ebr_offset)
            _set_mbr_entry(ebr, 446, 1, (next_ebr - new_ext.new_start) // ss,
                           (npp.new_start + npp.new_size - next_ebr) // ss)
        else:
            ebr[446 + 16:446 + 32] = bytes(16)
        writes.append((new_ebr, bytes(ebr)))
    return writes
