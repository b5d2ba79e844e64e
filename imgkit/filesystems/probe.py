"""Which filesystem a partition holds, and its label, from superblock magics (as blkid does).

Fixed offsets inside the first 72 KiB are read, every field bounds-checked by slicing; NTFS and
exFAT keep their labels in metadata files (ntfs.py, exfat.py read them, bounded the same way).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..stream import Stream


@dataclass
class Probe:
    type: str | None  # "ext4", "vfat", "ntfs", "exfat", "xfs", "btrfs", "swap", "iso9660" or None
    label: str | None = None
    uuid: str | None = None


def _clean(raw: bytes) -> str | None:
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return text or None


def probe(part: Stream) -> Probe:
    head = part.read(0, 72 * 1024)
    if len(head) < 512:
        return Probe(None)
    if len(head) >= 1080 + 2 and head[1080:1082] == b"\x53\xef":
        sb = head[1024:2048]
        compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
        kind = "ext4" if incompat & 0x2C0 or ro_compat & 0x78 else ("ext3" if compat & 0x4 else "ext2")
        u = sb[0x68:0x78].hex()
        return Probe(kind, _clean(sb[0x78:0x88]), f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}")
    if head[3:11] == b"NTFS    ":  # the label lives in MFT record 3 ($Volume), not the boot sector
        from .ntfs import volume_label
        return Probe("ntfs", volume_label(part), head[0x48:0x50][::-1].hex().upper())
    if head[3:11] == b"EXFAT   ":  # the label is an entry of the root directory
        from .exfat import volume_label as exfat_label
        return Probe("exfat", exfat_label(part), head[0x64:0x68][::-1].hex().upper())
    if head[510:512] == b"\x55\xaa":
        if head[0x52:0x5A] == b"FAT32   ":
            return Probe("vfat", _clean(head[0x47:0x52]), head[0x43:0x47][::-1].hex().upper())
        if head[0x36:0x3E] in (b"FAT12   ", b"FAT16   ", b"FAT     "):
            return Probe("vfat", _clean(head[0x2B:0x36]), head[0x27:0x2B][::-1].hex().upper())
    if head[:4] == b"XFSB":
        return Probe("xfs", _clean(head[0x6C:0x78]))
    if len(head) >= 0x10048 and head[0x10040:0x10048] == b"_BHRfS_M":
        return Probe("btrfs", _clean(head[0x1012B:0x1022B]))
    for page in (4096, 8192, 16384, 65536):
        if len(head) >= page and head[page - 10:page] in (b"SWAPSPACE2", b"SWAP-SPACE"):
            return Probe("swap", _clean(head[1024 + 28:1024 + 44]))
    if len(head) >= 0x8006 and head[0x8001:0x8006] == b"CD001":
        return Probe("iso9660", _clean(head[0x8028:0x8048]))
    return Probe(None)
