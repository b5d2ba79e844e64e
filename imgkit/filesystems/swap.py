"""Linux swap: only the header page (signature, version, bad-page list) matters; the rest is
scratch space that is meaningless once the machine is off (mm/swapfile.c, union swap_header)."""
from __future__ import annotations

from ..stream import Stream
from .usedmap import NotUsable, UsedBlocks


def used_blocks(part: Stream) -> UsedBlocks:
    for page in (4096, 8192, 16384, 65536):
        sig = part.read(page - 10, 10)
        if sig in (b"SWAPSPACE2", b"SWAP-SPACE"):
            count = part.size // page
            bitmap = bytearray(-(-count // 8))
            bitmap[0] = 1
            return UsedBlocks("swap", page, 0, count, bitmap)
    raise NotUsable("swap: no swap signature")
