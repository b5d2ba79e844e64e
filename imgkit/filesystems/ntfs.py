"""Used clusters of NTFS from $Bitmap (MFT record 6), following its $DATA runlist (the layout as
documented by the Linux-NTFS project, "NTFS Documentation": boot sector, FILE records with update
sequence fixups, attribute headers, runlists). The backup boot sector in the partition's last sector
lies outside the cluster map and is always kept."""
from __future__ import annotations

import struct

from ..stream import Stream
from .usedmap import NotUsable, UsedBlocks

MAX_RUNS = 1 << 16


def _cluster_size(bs: bytes) -> tuple[int, int]:
    bps = struct.unpack_from("<H", bs, 0x0B)[0]
    spc = bs[0x0D]
    if spc > 0x80:
        spc = 1 << (256 - spc) if 256 - spc <= 12 else 0
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1):
        raise NotUsable(f"ntfs: {bps} bytes per sector / {spc} sectors per cluster are invalid")
    return bps, bps * spc


def _apply_fixups(rec: bytearray, bps: int) -> None:
    usa_off, usa_count = struct.unpack_from("<HH", rec, 4)
    if usa_count == 0 or usa_off + 2 * usa_count > len(rec) or (usa_count - 1) * 512 > len(rec):
        raise NotUsable("ntfs: MFT record update sequence is invalid")
    usn = rec[usa_off:usa_off + 2]
    for i in range(1, usa_count):
        end = i * 512
        if rec[end - 2:end] != usn:
            raise NotUsable("ntfs: MFT record 6 fails its update sequence check (torn write)")
        rec[end - 2:end] = rec[usa_off + 2 * i:usa_off + 2 * i + 2]


def _runlist(raw: bytes, pos: int) -> list[tuple[int | None, int]]:
    """[(lcn or None for sparse, length in clusters)]"""
    runs, lcn = [], 0
    while pos < len(raw) and raw[pos] != 0:
        head = raw[pos]
        nlen, noff = head & 0xF, head >> 4
        if nlen == 0 or nlen > 8 or noff > 8 or pos + 1 + nlen + noff > len(raw) or len(runs) >= MAX_RUNS:
            raise NotUsable("ntfs: $Bitmap runlist is invalid")
        length = int.from_bytes(raw[pos + 1:pos + 1 + nlen], "little")
        if noff:
            lcn += int.from_bytes(raw[pos + 1 + nlen:pos + 1 + nlen + noff], "little", signed=True)
            runs.append((lcn, length))
        else:
            runs.append((None, length))
        pos += 1 + nlen + noff
    return runs


def _mft_record(part: Stream, number: int) -> tuple[bytearray, int, int, int]:
    """MFT record `number` (fixups applied) of the volume, with bytes per sector, cluster size and
    cluster count, every field checked against the partition."""
    bs = part.read(0, 512)
    if len(bs) < 512 or bs[3:11] != b"NTFS    ":
        raise NotUsable("ntfs: no NTFS boot sector")
    bps, cs = _cluster_size(bs)
    total_sectors, mft_lcn = struct.unpack_from("<QQ", bs, 0x28)
    cpr = struct.unpack_from("<b", bs, 0x40)[0]
    rec_size = cs * cpr if cpr > 0 else 1 << -cpr
    if not 256 <= rec_size <= 65536 or total_sectors * bps > part.size:
        raise NotUsable("ntfs: MFT record size or volume size is invalid")
    clusters = total_sectors * bps // cs
    if mft_lcn >= clusters:
        raise NotUsable("ntfs: the MFT lies past the end of the volume")
    rec = bytearray(part.read(mft_lcn * cs + number * rec_size, rec_size))
    if len(rec) != rec_size or rec[:4] != b"FILE":
        raise NotUsable(f"ntfs: MFT record {number} is not a FILE record")
    _apply_fixups(rec, bps)
    return rec, bps, cs, clusters


def volume_label(part: Stream) -> str | None:
    """The volume label: the resident $VOLUME_NAME attribute (0x60, UTF-16LE) of MFT record 3
    ($Volume). None when there is none or the volume cannot be read."""
    try:
        rec, _, _, _ = _mft_record(part, 3)
    except NotUsable:
        return None
    pos = struct.unpack_from("<H", rec, 0x14)[0]
    while pos + 24 <= len(rec):
        atype, alen = struct.unpack_from("<II", rec, pos)
        if atype == 0xFFFFFFFF or alen < 16 or pos + alen > len(rec):
            return None
        if atype == 0x60 and rec[pos + 8] == 0:  # resident, as $VOLUME_NAME always is
            vlen, voff = struct.unpack_from("<IH", rec, pos + 0x10)
            if vlen > 256 or voff + vlen > alen:  # a label has at most 128 UTF-16 units
                return None
            text = bytes(rec[pos + voff:pos + voff + vlen]).decode("utf-16-le", "replace").strip("\0").strip()
            return text or None
        pos += alen
    return None


def used_blocks(part: Stream) -> UsedBlocks:
    rec, bps, cs, clusters = _mft_record(part, 6)  # $Bitmap
    rec_size = len(rec)
    pos = struct.unpack_from("<H", rec, 0x14)[0]
    runs = None
    while pos + 16 <= rec_size:
        atype, alen = struct.unpack_from("<II", rec, pos)
        if atype == 0xFFFFFFFF:
            break
        if alen < 16 or pos + alen > rec_size:
            raise NotUsable("ntfs: MFT record 6 has a bad attribute length")
        if atype == 0x80 and rec[pos + 9] == 0:  # the unnamed $DATA attribute
            if rec[pos + 8] != 1:
                raise NotUsable("ntfs: $Bitmap data is resident (unexpected)")
            run_off = struct.unpack_from("<H", rec, pos + 0x20)[0]
            runs = _runlist(bytes(rec[pos:pos + alen]), run_off)
            break
        pos += alen
    if runs is None:
        raise NotUsable("ntfs: $Bitmap has no $DATA attribute in its base record")
    need = -(-clusters // 8)
    bitmap = bytearray()
    for lcn, length in runs:
        take = min(length * cs, need - len(bitmap))
        if take <= 0:
            break
        if lcn is None:
            bitmap += bytes(take)
            continue
        if lcn + length > clusters:
            raise NotUsable("ntfs: a $Bitmap run lies past the end of the volume")
        data = part.read(lcn * cs, take)
        if len(data) != take:
            raise NotUsable("ntfs: $Bitmap is truncated")
        bitmap += data
    if len(bitmap) < need:
        raise NotUsable(f"ntfs: $Bitmap holds {len(bitmap) * 8} bits for {clusters} clusters")
    return UsedBlocks("ntfs", cs, 0, clusters, bitmap)
