"""Which used-block reader serves which filesystem (the names filesystems.probe reports)."""
from __future__ import annotations

from ..stream import Stream
from . import exfat, ext, fat, ntfs, partclone_map, swap
from .usedmap import NotUsable, UsedBlocks

OWN_PARSERS = {"ext2": ext, "ext3": ext, "ext4": ext, "vfat": fat, "ntfs": ntfs, "exfat": exfat, "swap": swap}
PARTCLONE = ("xfs", "btrfs")


def read_used_blocks(fs: str | None, part: Stream, path: str | None = None, offset: int = 0) -> UsedBlocks:
    """The used-block map of a partition holding filesystem `fs`. `path`/`offset` name the file or
    device it lives on (needed by the partclone-backed readers). Raises NotUsable with the reason."""
    if fs in OWN_PARSERS:
        used = OWN_PARSERS[fs].used_blocks(part)
    elif fs in PARTCLONE:
        used = partclone_map.used_blocks(fs, path, offset, part.size)
    else:
        raise NotUsable(f"no allocation map for {fs or 'an unknown filesystem'}")
    if used.first_byte < 0 or used.end_byte > part.size or used.block_size <= 0:
        raise NotUsable(f"{fs}: the map covers bytes outside the partition")
    return used
