"""Where a VHDX keeps its data, from its Block Allocation Table (MS-VHDX 2.5). qemu's VHDX driver
reports no block status (every byte "data"), so without this a mostly empty VHDX is read, through
qemu, as gigabytes of zeros. With it: absent blocks are zero runs, fully present blocks are read
with pread at their file offset. Only used after formats/foreign.py inspected the file (no parent,
regions inside the file); any doubt (a pending log, an entry outside the file) returns None and
imgkit falls back to reading everything through qemu.
"""
from __future__ import annotations

import os
import struct

from ..stream import DATA, ZERO, Run, merge_runs
from .foreign import ForeignImage, VhdxLayout

MiB = 1 << 20
FULLY_PRESENT = 6
ABSENT = (0, 1, 2, 3)  # not present, undefined, zero, unmapped: read as zeros without a parent
MAX_BAT_BYTES = 256 << 20


def read_layout(inspected: ForeignImage):
    """(runs, extents) — extents are (guest start, length, file offset) — or None when unsure. The
    BAT's place, the block and sector sizes come from inspection (foreign.py), which bounded them."""
    layout = inspected.layout
    if not isinstance(layout, VhdxLayout):
        return None
    if inspected.fd < 0:
        return None
    # The inspected descriptor, not the path: the file qemu reads is the file that was inspected.
    with os.fdopen(os.dup(inspected.fd), "rb") as f:
        size = f.seek(0, 2)
        if size != inspected.file_size:
            return None  # the file changed since it was inspected
        try:
            return _layout(f, size, inspected.virtual_size, layout)
        except (ValueError, struct.error, ZeroDivisionError):
            return None


def _layout(f, file_size: int, vsize: int, layout: VhdxLayout):
    if layout.log_pending or layout.sector_size not in (512, 4096) or layout.block_size < MiB:
        return None
    block_size = layout.block_size
    chunk_ratio = (1 << 23) * layout.sector_size // block_size
    blocks = -(-vsize // block_size)
    entries = blocks + (blocks - 1) // chunk_ratio
    if entries * 8 > min(layout.bat_length, MAX_BAT_BYTES) or layout.bat_offset + entries * 8 > file_size:
        return None
    f.seek(layout.bat_offset)
    bat = f.read(entries * 8)
    runs, extents = [], []
    for i in range(blocks):
        (entry,) = struct.unpack_from("<Q", bat, 8 * (i + i // chunk_ratio))
        state, host = entry & 7, (entry >> 20) * MiB
        start = i * block_size
        length = min(block_size, vsize - start)
        if state in ABSENT:
            runs.append(Run(ZERO, start, length))
        elif state == FULLY_PRESENT and host >= MiB and host + length <= file_size:
            runs.append(Run(DATA, start, length))
            extents.append((start, length, host))
        else:
            return None
    return list(merge_runs(runs)), extents
