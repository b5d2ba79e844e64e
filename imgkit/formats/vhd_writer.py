"""Write any Stream as a dynamic VHD, natively (the same reason as qcow2_writer.py: the caching reader
decodes the chunks in parallel, in order, and the blocks go straight into the file).

Layout (Microsoft "Virtual Hard Disk Image Format Specification" 1.0, 2006; qemu block/vpc.c):
a copy of the footer (512 bytes), the dynamic disk header (1024), the block allocation table (one
big-endian sector number a block, 0xFFFFFFFF unallocated, padded to a sector), then the blocks, each
a sector bitmap (all ones: every sector present) and 2 MiB of data, and the footer again at the end.
Blocks that are all zeros stay unallocated. The footer's creator application is "qem2", which tells
qemu (and Hyper-V's own "win " alike) that the current size is exact rather than rounded to a CHS
geometry: the same as `qemu-img convert -O vpc -o subformat=dynamic,force_size=on`.
"""
from __future__ import annotations

import struct
import time
import uuid
from typing import Callable

from ..stream import DATA, Stream
from ..platform.writeback import OutputWriter

SECTOR = 512
BLOCK = 2 << 20
BITMAP = BLOCK // SECTOR // 8  # 512 bytes: one sector
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z
UNALLOCATED = 0xFFFFFFFF
_ZERO_BLOCK = bytes(BLOCK)


def _checksum(data: bytes) -> int:
    return ~sum(data) & 0xFFFFFFFF


def geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track): the specification's CHS algorithm (appendix), as qemu."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        secs, heads = 255, 16
        cth = total // secs
    else:
        secs = 17
        cth = total // secs
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            secs, heads = 31, 16
            cth = total // secs
        if cth >= heads * 1024:
            secs, heads = 63, 16
            cth = total // secs
    return cth // heads, heads, secs


def footer(size: int, disk_id: bytes, timestamp: int) -> bytes:
    cyls, heads, secs = geometry(size)
    f = bytearray(struct.pack(">8sIIQI4sI4sQQHBBII16sB", b"conectix", 2, 0x00010000, SECTOR, timestamp,
                              b"qem2", 0x00050003, b"Wi2k", size, size, cyls, heads, secs, 3, 0, disk_id, 0))
    f += bytes(SECTOR - len(f))
    struct.pack_into(">I", f, 64, _checksum(bytes(f)))
    return bytes(f)


def dynamic_header(entries: int) -> bytes:
    h = bytearray(struct.pack(">8sQQIII", b"cxsparse", 0xFFFFFFFFFFFFFFFF, 3 * SECTOR, 0x00010000, entries,
                              BLOCK))
    h += bytes(1024 - len(h))
    struct.pack_into(">I", h, 36, _checksum(bytes(h)))
    return bytes(h)


def write_vhd(stream: Stream, path: str, read_pieces: Callable, *, advance: Callable[[int], None] = lambda n: None,
              durable: bool = True) -> int:
    """Write `stream` as a new dynamic VHD at `path` (the caller renames it into place and fsyncs).
    `read_pieces(pieces)` yields ((offset, length), bytes) in order. The blocks follow each other
    in the file, so the writer (platform.writeback.OutputWriter) joins them into large direct writes
    (`durable` False: left in the page cache, `convert --no-sync`). Returns the data bytes written."""
    size = stream.size
    entries = -(-size // BLOCK)
    bat = [UNALLOCATED] * entries
    bat_bytes = -(-entries * 4 // SECTOR) * SECTOR
    first_block = 3 * SECTOR + bat_bytes
    blocks = sorted({b for run in stream.runs() if run.kind == DATA and run.length
                     for b in range(run.offset // BLOCK, -(-run.end // BLOCK))})
    pieces = [(b * BLOCK, min(BLOCK, size - b * BLOCK)) for b in blocks]
    written = 0
    bitmap = b"\xff" * BITMAP
    with OutputWriter(path, durable=durable) as out:
        out.preallocate(0, first_block + len(blocks) * (BITMAP + BLOCK) + SECTOR)  # at most; truncated below
        host = first_block
        for (offset, length), data in read_pieces(pieces):
            if len(data) != length:
                raise OSError(f"short read from the source at offset {offset}")
            advance(length)
            if data == _ZERO_BLOCK[:length]:
                continue
            bat[offset // BLOCK] = host // SECTOR
            out.write(host, bitmap)
            out.write(host + BITMAP, data)
            if length < BLOCK:  # the last, partial block: a block is always whole in the file
                out.write(host + BITMAP + length, bytes(BLOCK - length))
            host += BITMAP + BLOCK
            written += length
        disk_id = uuid.uuid4().bytes
        foot = footer(size, disk_id, max(0, int(time.time()) - VHD_EPOCH) & 0xFFFFFFFF)
        table = bytearray(b"\xff" * bat_bytes)
        struct.pack_into(f">{entries}I", table, 0, *bat)
        out.write(0, foot + dynamic_header(entries) + bytes(table))
        out.write(host, foot)
        out.truncate(host + SECTOR)
    return written
