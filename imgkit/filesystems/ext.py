"""Used blocks of ext2/3/4 from the block-group bitmaps (the ext4 disk layout, kernel
Documentation/filesystems/ext4/: "Super Block", "Block Group Descriptors", "Block and inode Bitmaps").

Handles flex_bg (bitmaps and inode tables of a flex group live in its first group), 64bit descriptors,
meta_bg, sparse_super/sparse_super2, bigalloc (one bit per cluster) and BLOCK_UNINIT groups, whose
bitmap is implicit: such a group's used blocks are its superblock/descriptor backups and any group's
bitmaps or inode table that lie in it. Every location is checked against the filesystem size.
"""
from __future__ import annotations

import struct

from ..units import format_size
from ..stream import Stream
from .usedmap import NotUsable, UsedBlocks, set_range

INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_BIGALLOC = 0x200
COMPAT_SPARSE_SUPER2 = 0x200
BG_BLOCK_UNINIT = 0x2
MAX_GROUPS = 1 << 22  # 512 TiB of 4 KiB blocks: more is hostile


def _is_power(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


def used_blocks(part: Stream) -> UsedBlocks:
    sb = part.read(1024, 1024)
    if len(sb) < 1024 or sb[0x38:0x3A] != b"\x53\xef":
        raise NotUsable("ext: no superblock")
    (blocks_lo, _r, _f, _fi, first_data_block, log_bs, log_cs, blocks_per_group, clusters_per_group,
     inodes_per_group) = struct.unpack_from("<4xIIIIIIIIII", sb, 0)
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    reserved_gdt = struct.unpack_from("<H", sb, 0xCE)[0]
    desc_size = struct.unpack_from("<H", sb, 0xFE)[0]
    first_meta_bg = struct.unpack_from("<I", sb, 0x104)[0]
    blocks_hi = struct.unpack_from("<I", sb, 0x150)[0]
    backup_bgs = struct.unpack_from("<II", sb, 0x24C)
    if incompat & INCOMPAT_JOURNAL_DEV:
        raise NotUsable("ext: an external journal device, not a filesystem")
    if incompat & INCOMPAT_RECOVER:
        # The on-disk bitmaps may lag the journal: blocks they call free may be in use after replay.
        raise NotUsable("ext: the journal needs recovery (mounted, or not cleanly unmounted)")
    if log_bs > 6:
        raise NotUsable(f"ext: block size 2^{10 + log_bs} is out of range")
    bs = 1024 << log_bs
    is64 = bool(incompat & INCOMPAT_64BIT)
    blocks = blocks_lo | (blocks_hi << 32 if is64 else 0)
    if not is64:
        desc_size = 32
    elif desc_size < 64 or desc_size > 1024 or desc_size & (desc_size - 1):
        raise NotUsable(f"ext: group descriptor size {desc_size} is invalid")
    bigalloc = bool(ro_compat & RO_COMPAT_BIGALLOC)
    ratio = 1 << (log_cs - log_bs) if bigalloc and log_cs >= log_bs and log_cs - log_bs <= 16 else 1
    if bigalloc and ratio == 1 and log_cs != log_bs:
        raise NotUsable("ext: cluster size is invalid")
    per_group = clusters_per_group if bigalloc else blocks_per_group
    if not 8 <= per_group <= 8 * bs or blocks_per_group != per_group * ratio:
        raise NotUsable(f"ext: {per_group} blocks per group does not fit one {bs}-byte bitmap block")
    if first_data_block != (1 if bs == 1024 and not bigalloc else 0):
        raise NotUsable(f"ext: first data block {first_data_block} is invalid for {bs}-byte blocks")
    if blocks <= first_data_block or blocks * bs > part.size:
        raise NotUsable(f"ext: {blocks} blocks of {format_size(bs)} do not fit the {format_size(part.size)} partition "
                        f"({part.size} bytes)")
    groups = -(-(blocks - first_data_block) // blocks_per_group)
    if groups > MAX_GROUPS:
        raise NotUsable(f"ext: {groups} block groups (refused)")
    descs_per_block = bs // desc_size

    sparse = bool(ro_compat & RO_COMPAT_SPARSE_SUPER)
    sparse2 = bool(compat & COMPAT_SPARSE_SUPER2)

    def has_super(g: int) -> bool:
        if g == 0:
            return True
        if sparse2:
            return g in backup_bgs
        if not sparse or g == 1:
            return True
        return g % 2 == 1 and (_is_power(g, 3) or _is_power(g, 5) or _is_power(g, 7))

    def group_start(g: int) -> int:
        return first_data_block + g * blocks_per_group

    gdt_blocks = -(-groups // descs_per_block)
    meta_bg = bool(incompat & INCOMPAT_META_BG)
    # Where each descriptor block lives (meta_bg spreads them over the first group of each meta group).
    desc_block_locations = []
    # The superblock is at byte 1024: block 1 with 1 KiB blocks (also under bigalloc, where the first
    # data block is 0), else block 0; the descriptors follow it (ext2fs_descriptor_block_loc2).
    sb_block = 1024 // bs
    for i in range(gdt_blocks):
        if meta_bg and i >= first_meta_bg:
            g0 = i * descs_per_block
            adjust = 1 if g0 == 0 and sb_block == 1 and first_data_block == 0 else 0
            desc_block_locations.append(group_start(g0) + (1 if has_super(g0) else 0) + adjust)
        else:
            desc_block_locations.append(sb_block + 1 + i)
    raw_desc = bytearray()
    for loc in desc_block_locations:
        if loc >= blocks:
            raise NotUsable(f"ext: group descriptor block {loc} lies past the end")
        raw_desc += part.read(loc * bs, bs)
    if len(raw_desc) < groups * desc_size:
        raise NotUsable("ext: group descriptors are truncated")

    clusters = -(-(blocks - first_data_block) // ratio)
    bitmap = bytearray(-(-clusters // 8))
    per_bitmap_bytes = per_group // 8

    def mark_blocks(first_block: int, count: int) -> None:
        """Mark filesystem blocks [first_block, +count) used (in cluster units)."""
        rel = first_block - first_data_block
        set_range(bitmap, rel // ratio, -(-(rel + count) // ratio) - rel // ratio)

    inode_table_blocks = -(-(inodes_per_group * _inode_size(sb)) // bs)
    meta_blocks = 1 + (0 if meta_bg else gdt_blocks + reserved_gdt)
    for g in range(groups):
        d = raw_desc[g * desc_size:(g + 1) * desc_size]
        bb, ib, it = struct.unpack_from("<III", d, 0)
        flags = struct.unpack_from("<H", d, 0x12)[0]
        if is64:
            bbh, ibh, ith = struct.unpack_from("<III", d, 0x20)
            bb, ib, it = bb | bbh << 32, ib | ibh << 32, it | ith << 32
        for loc, n in ((bb, 1), (ib, 1), (it, inode_table_blocks)):
            if loc < first_data_block or loc + n > blocks:
                raise NotUsable(f"ext: group {g} metadata at block {loc} lies outside the filesystem")
        # Metadata is marked wherever it is, whatever the group flags (flex_bg puts it elsewhere).
        mark_blocks(bb, 1)
        mark_blocks(ib, 1)
        mark_blocks(it, inode_table_blocks)
        start = g * per_group  # cluster index of this group's first cluster
        count = min(per_group, clusters - start)
        if flags & BG_BLOCK_UNINIT:
            if has_super(g):
                mark_blocks(group_start(g), meta_blocks)
            if meta_bg and g % descs_per_block in (0, 1, descs_per_block - 1):
                mark_blocks(group_start(g) + (1 if has_super(g) else 0), 1)
            continue
        raw = part.read(bb * bs, per_bitmap_bytes)
        if len(raw) != per_bitmap_bytes:
            raise NotUsable(f"ext: block bitmap of group {g} is truncated")
        _or_bits(bitmap, start, raw, count)
    # The superblock and primary descriptors (and block 0 with 1 KiB blocks) are kept by first_byte.
    mark_blocks(first_data_block, sb_block + 1 + gdt_blocks - first_data_block)
    kind = "ext4" if incompat & 0x2C0 or ro_compat & 0x78 else ("ext3" if compat & 0x4 else "ext2")
    return UsedBlocks(kind, bs * ratio, first_data_block * bs, clusters, bitmap)


def _inode_size(sb: bytes) -> int:
    rev = struct.unpack_from("<I", sb, 0x4C)[0]
    size = struct.unpack_from("<H", sb, 0x58)[0] if rev >= 1 else 128
    if size < 128 or size & (size - 1) or size > 65536:
        raise NotUsable(f"ext: inode size {size} is invalid")
    return size


def _or_bits(bitmap: bytearray, start: int, raw: bytes, count: int) -> None:
    """OR the first `count` bits of `raw` into `bitmap` at bit `start`."""
    value = int.from_bytes(raw, "little") & ((1 << count) - 1)
    if start % 8 == 0:
        n = -(-count // 8)
        lo = start // 8
        merged = int.from_bytes(bitmap[lo:lo + n], "little") | value
        bitmap[lo:lo + n] = merged.to_bytes(n, "little")
        return
    lo, hi = start // 8, (start + count + 7) // 8
    merged = int.from_bytes(bitmap[lo:hi], "little") | (value << (start % 8))
    bitmap[lo:hi] = merged.to_bytes(hi - lo, "little")
