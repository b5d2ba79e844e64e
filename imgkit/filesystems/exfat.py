"""Used clusters of exFAT from its allocation bitmap (Microsoft "exFAT file system specification":
main boot sector fields, the root directory's Allocation Bitmap entry 0x81, FAT chains). The boot
region and the FAT lie before the cluster heap, outside the map, so they are always kept."""
from __future__ import annotations

import struct

from ..stream import Stream
from .usedmap import NotUsable, UsedBlocks

MAX_CHAIN = 1 << 24


def _chain(part: Stream, fat_offset: int, first: int, clusters: int, limit: int) -> list[int]:
    out, n, seen = [], first, set()
    while 2 <= n < clusters + 2 and len(out) < limit:
        if n in seen:
            raise NotUsable("exfat: a FAT chain loops")
        seen.add(n)
        out.append(n)
        raw = part.read(fat_offset + 4 * n, 4)
        if len(raw) != 4:
            raise NotUsable("exfat: the FAT is truncated")
        n = struct.unpack("<I", raw)[0]
    return out


def used_blocks(part: Stream) -> UsedBlocks:
    bs = part.read(0, 512)
    if len(bs) < 512 or bs[3:11] != b"EXFAT   " or bs[510:512] != b"\x55\xaa":
        raise NotUsable("exfat: no exFAT boot sector")
    vol_len, fat_off, fat_len, heap_off, clusters, root = struct.unpack_from("<QIIIII", bs, 0x48)
    bps_shift, spc_shift = bs[0x6C], bs[0x6D]
    if not 9 <= bps_shift <= 12 or spc_shift > 25 - bps_shift:
        raise NotUsable("exfat: sector or cluster size is invalid")
    bps, cs = 1 << bps_shift, 1 << (bps_shift + spc_shift)
    if vol_len * bps > part.size or heap_off * bps + clusters * cs > part.size or fat_len * bps < 4 * (clusters + 2):
        raise NotUsable("exfat: the cluster heap or FAT does not fit the partition")
    fat_offset, heap = fat_off * bps, heap_off * bps
    bitmap_entry = None
    for c in _chain(part, fat_offset, root, clusters, 1 << 12):
        data = part.read(heap + (c - 2) * cs, cs)
        for pos in range(0, len(data) - 31, 32):
            etype = data[pos]
            if etype == 0:
                break
            if etype == 0x81 and not data[pos + 1] & 1:  # the first allocation bitmap
                bitmap_entry = struct.unpack_from("<IQ", data, pos + 20)
                break
        if bitmap_entry:
            break
    if not bitmap_entry:
        raise NotUsable("exfat: no allocation bitmap in the root directory")
    first, length = bitmap_entry
    need = -(-clusters // 8)
    if length < need:
        raise NotUsable("exfat: the allocation bitmap is too short")
    bitmap = bytearray()
    for c in _chain(part, fat_offset, first, clusters, -(-need // cs)):
        bitmap += part.read(heap + (c - 2) * cs, min(cs, need - len(bitmap)))
    if len(bitmap) < need:  # contiguous bitmaps may have no FAT chain: read them straight
        bitmap = bytearray(part.read(heap + (first - 2) * cs, need))
    return UsedBlocks("exfat", cs, heap, clusters, bitmap)


def volume_label(part: Stream) -> str | None:
    """The volume label: the root directory's Volume Label entry (0x83: a count of UTF-16 units,
    at most 11, then the units). None when there is none or the volume cannot be read."""
    bs = part.read(0, 512)
    if len(bs) < 512 or bs[3:11] != b"EXFAT   " or bs[510:512] != b"\x55\xaa":
        return None
    _, fat_off, _, heap_off, clusters, root = struct.unpack_from("<QIIIII", bs, 0x48)
    bps_shift, spc_shift = bs[0x6C], bs[0x6D]
    if not 9 <= bps_shift <= 12 or spc_shift > 25 - bps_shift:
        return None
    bps, cs = 1 << bps_shift, 1 << (bps_shift + spc_shift)
    if heap_off * bps + clusters * cs > part.size:
        return None
    try:
        chain = _chain(part, fat_off * bps, root, clusters, 1 << 12)
    except NotUsable:
        return None
    for c in chain:
        data = part.read(heap_off * bps + (c - 2) * cs, cs)
        for pos in range(0, len(data) - 31, 32):
            etype = data[pos]
            if etype == 0:
                return None
            if etype == 0x83:
                count = min(data[pos + 1], 11)
                text = data[pos + 2:pos + 2 + 2 * count].decode("utf-16-le", "replace").strip()
                return text or None
    return None
