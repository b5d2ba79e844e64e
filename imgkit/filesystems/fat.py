"""Used clusters of FAT12/16/32 from the first FAT (Microsoft "FAT: General Overview of On-Disk
Format", 2000: BPB fields, FAT type by cluster count, free entry = 0). The reserved area, the FATs and
the FAT12/16 root directory lie before the data area, outside the map, so they are always kept."""
from __future__ import annotations

import struct

from ..stream import Stream
from .usedmap import NotUsable, UsedBlocks

SCAN_PIECE = 1 << 20  # read the FAT a MiB at a time


def used_blocks(part: Stream) -> UsedBlocks:
    bs = part.read(0, 512)
    if len(bs) < 512 or bs[510:512] != b"\x55\xaa":
        raise NotUsable("fat: no boot sector signature")
    bps, spc, reserved, nfats, root_entries, total16, _media, fat16 = struct.unpack_from("<HBHBHHBH", bs, 11)
    total32 = struct.unpack_from("<I", bs, 32)[0]
    fat32_size = struct.unpack_from("<I", bs, 36)[0]
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or spc > 128:
        raise NotUsable(f"fat: {bps} bytes per sector / {spc} sectors per cluster are invalid")
    if reserved == 0 or not 1 <= nfats <= 4:
        raise NotUsable(f"fat: {reserved} reserved sectors / {nfats} FATs are invalid")
    fat_sectors = fat16 or fat32_size
    total = total16 or total32
    root_sectors = (root_entries * 32 + bps - 1) // bps
    data_start = reserved + nfats * fat_sectors + root_sectors
    if fat_sectors == 0 or total * bps > part.size or data_start >= total:
        raise NotUsable(f"fat: {total} sectors (data from sector {data_start}) do not fit the partition")
    clusters = (total - data_start) // spc
    kind = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    if (kind == 32) != (fat16 == 0):
        raise NotUsable(f"fat: {clusters} clusters mean FAT{kind}, the boot sector says otherwise")
    entries = clusters + 2
    fat_bytes = {12: (entries * 3 + 1) // 2, 16: entries * 2, 32: entries * 4}[kind]
    if fat_bytes > fat_sectors * bps:
        raise NotUsable(f"fat: the FAT ({fat_sectors} sectors) cannot describe {clusters} clusters")
    fat_offset = reserved * bps
    bitmap = bytearray(-(-clusters // 8))
    if kind == 12:
        fat = part.read(fat_offset, fat_bytes)
        for n in range(2, entries):
            v = struct.unpack_from("<H", fat, n + n // 2)[0] if n + n // 2 + 1 < len(fat) else 0xFFF
            v = v >> 4 if n & 1 else v & 0xFFF
            if v:
                bitmap[(n - 2) // 8] |= 1 << ((n - 2) % 8)
    else:
        width = kind // 8
        per_piece = SCAN_PIECE // width
        for first in range(0, entries, per_piece):
            count = min(per_piece, entries - first)
            raw = part.read(fat_offset + first * width, count * width)
            if len(raw) != count * width:
                raise NotUsable("fat: the FAT is truncated")
            if raw.count(0) == len(raw):
                continue  # all free
            values = memoryview(raw).cast("H" if width == 2 else "I")
            mask = 0xFFFF if width == 2 else 0x0FFFFFFF
            for k, v in enumerate(values):
                n = first + k
                if n >= 2 and v & mask:
                    bitmap[(n - 2) // 8] |= 1 << ((n - 2) % 8)
    return UsedBlocks("vfat", spc * bps, data_start * bps, clusters, bitmap)
