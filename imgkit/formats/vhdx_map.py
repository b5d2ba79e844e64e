"""Where a VHDX keeps its data, from its Block Allocation Table (MS-VHDX 2.5). qemu's VHDX driver
reports no block status (every byte "data"), so without this a mostly empty VHDX is read, through
qemu, as gigabytes of zeros. With it: absent blocks are zero runs, fully present blocks are read
with pread at their file offset. Only used after formats/foreign.py inspected the file (no parent,
regions inside the file); any doubt (a pending log, an entry outside the file) returns None and
imgkit falls back to reading everything through qemu.
"""
from __future__ import annotations

import struct
import uuid

from ..stream import DATA, ZERO, Run, merge_runs
from .foreign import VHDX_BAT, VHDX_FILE_PARAMETERS, VHDX_METADATA, VHDX_VIRTUAL_DISK_SIZE

VHDX_LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
MiB = 1 << 20
FULLY_PRESENT = 6
ABSENT = (0, 1, 2, 3)  # not present, undefined, zero, unmapped: read as zeros without a parent
MAX_BAT_BYTES = 256 << 20


def read_layout(path: str, virtual_size: int):
    """(runs, extents) — extents are (guest start, length, file offset) — or None when unsure."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)

        def at(off: int, n: int) -> bytes:
            if off < 0 or n < 0 or off + n > size:
                raise ValueError
            f.seek(off)
            return f.read(n)
        try:
            return _layout(at, size, virtual_size)
        except (ValueError, struct.error, ZeroDivisionError):
            return None


def _layout(at, file_size: int, virtual_size: int):
    headers = []
    for off in (64 << 10, 128 << 10):
        h = at(off, 64)
        if h[:4] == b"head":
            seq = struct.unpack_from("<Q", h, 8)[0]
            headers.append((seq, h))
    if not headers or any(h[48:64] != bytes(16) for _, h in headers):
        return None  # a log to replay: the BAT on disk may be stale
    rt = at(192 << 10, 64 << 10)
    (count,) = struct.unpack_from("<I", rt, 8)
    regions = {}
    for i in range(min(count, 2047)):
        guid, off, length, _req = struct.unpack_from("<16sQII", rt, 16 + 32 * i)
        regions[uuid.UUID(bytes_le=guid)] = (off, length)
    bat_off, bat_len = regions[VHDX_BAT]
    meta_off, _ = regions[VHDX_METADATA]
    mt = at(meta_off, 64 << 10)
    (mcount,) = struct.unpack_from("<H", mt, 10)
    items = {}
    for i in range(min(mcount, 2047)):
        guid, ioff, ilen, _flags = struct.unpack_from("<16sIII", mt, 32 + 32 * i)
        items[uuid.UUID(bytes_le=guid)] = meta_off + ioff
    block_size, _flags = struct.unpack("<II", at(items[VHDX_FILE_PARAMETERS], 8))
    (vsize,) = struct.unpack("<Q", at(items[VHDX_VIRTUAL_DISK_SIZE], 8))
    (sector,) = struct.unpack("<I", at(items[VHDX_LOGICAL_SECTOR_SIZE], 4))
    if vsize != virtual_size or sector not in (512, 4096) or block_size < MiB:
        return None
    chunk_ratio = (1 << 23) * sector // block_size
    blocks = -(-vsize // block_size)
    entries = blocks + (blocks - 1) // chunk_ratio
    if entries * 8 > min(bat_len, MAX_BAT_BYTES):
        return None
    bat = at(bat_off, entries * 8)
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
