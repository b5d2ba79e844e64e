"""A filesystem's used-block map, as filesystem modules produce it and fs-aware capture consumes it.

Every filesystem module exposes `used_blocks(part: Stream) -> UsedBlocks` and raises `NotUsable`
(with a reason a user can read) when the filesystem fails a sanity check or uses a feature imgkit does
not understand; the caller then keeps the whole partition. Bytes of a partition outside the map's range
(boot sectors, reserved areas, a backup boot sector at the end) always count as used.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class NotUsable(Exception):
    """The filesystem's allocation map cannot be trusted or read: keep the whole partition."""


@dataclass
class UsedBlocks:
    fs: str  # "ext4", "vfat", ...
    block_size: int  # bytes per map bit (a cluster for FAT/NTFS/bigalloc ext4)
    first_byte: int  # offset of block 0 from the start of the partition
    block_count: int
    bitmap: bytearray = field(repr=False)  # bit i (LSB first) set when block i is used

    def __post_init__(self):
        need = -(-self.block_count // 8)
        if len(self.bitmap) < need:
            raise NotUsable(f"{self.fs}: allocation bitmap holds {len(self.bitmap) * 8} bits, "
                            f"{self.block_count} needed")
        del self.bitmap[need:]
        spare = need * 8 - self.block_count
        if spare:  # bits past the last block are not blocks: clear them so counts are exact
            self.bitmap[-1] &= (1 << (8 - spare)) - 1

    @property
    def end_byte(self) -> int:
        return self.first_byte + self.block_count * self.block_size

    def used_count(self) -> int:
        return int.from_bytes(self.bitmap, "little").bit_count()

    def used_bytes(self, partition_size: int) -> int:
        """Bytes the capture keeps: used blocks plus everything outside the map."""
        outside = partition_size - (self.end_byte - self.first_byte)
        return self.used_count() * self.block_size + max(0, outside)


def bits(bitmap: bytes | bytearray, start: int, count: int) -> int:
    """Bits [start, start+count) of an LSB-first bitmap as an int (bit 0 = block `start`)."""
    if count <= 0:
        return 0
    lo, hi = start // 8, (start + count + 7) // 8
    return (int.from_bytes(bitmap[lo:hi], "little") >> (start % 8)) & ((1 << count) - 1)


def set_range(bitmap: bytearray, start: int, count: int) -> None:
    """Mark blocks [start, start+count) used (clipped to the bitmap)."""
    end = min(start + count, len(bitmap) * 8)
    start = max(0, start)
    while start < end and start % 8:
        bitmap[start // 8] |= 1 << (start % 8)
        start += 1
    while start + 8 <= end:
        whole = (end - start) // 8
        bitmap[start // 8:start // 8 + whole] = b"\xff" * whole
        start += whole * 8
    while start < end:
        bitmap[start // 8] |= 1 << (start % 8)
        start += 1
