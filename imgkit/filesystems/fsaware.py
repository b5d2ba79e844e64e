"""Filesystem-aware capture: which bytes of a disk to store, from each partition's allocation map.

The result is a CapturePlan: chunks that hold only free blocks (or unselected partitions) become FREE
without being read, free blocks inside stored chunks are zeroed before compression, and each map is
stored as a USED_MAP section. Everything outside partitions (the MBR/GPT, the post-MBR gap where GRUB
embeds itself, the backup GPT, unpartitioned space) is always kept, as is a BIOS boot partition and
any partition whose map cannot be read or trusted (then with zero-skipping only, and a reason).
"""
from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

from ..operations.capture import CapturePlan
from .disk_info import describe_partitions
from ..errors import InputError
from .allocation import read_used_blocks
from .usedmap import NotUsable, UsedBlocks, bits
from ..formats import imgk_layout as L
from ..formats.imgk_settings import DEFAULT_CHUNK_SIZE
from ..formats.partitions import Partition
from ..stream import SliceStream, Stream


@dataclass
class Region:
    """Bytes [start, end) of the disk that are not simply kept: a partition's map, or all free."""
    start: int
    end: int
    used: UsedBlocks | None = None  # None: the whole region is free (an unselected partition)
    map_start: int = 0  # disk offset of the map's block 0


@dataclass
class FsAwarePlan:
    plan: CapturePlan
    warnings: list[str] = field(default_factory=list)
    selected: list[int] | None = None


def _parse_selection(spec: str, parts: list[Partition], described: dict) -> list[int]:
    labels = {e["number"]: e.get("label") for e in described["partitions"]}
    chosen: list[int] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        match = [p.number for p in parts if token.isdigit() and p.number == int(token)]
        if not match:
            match = [p.number for p in parts if token in (p.name, labels.get(p.number))]
        if not match:
            available = ", ".join(f"{p.number}" + (f" ({p.name or labels.get(p.number)})"
                                                   if (p.name or labels.get(p.number)) else "") for p in parts)
            raise InputError(f"--partitions: no partition {token!r} on this disk",
                             hint=f"partitions: {available or 'none'}")
        chosen += [n for n in match if n not in chosen]
    if not chosen:
        raise InputError("--partitions: no partition named")
    return chosen


def boot_warnings(parts: list[Partition], selected: list[int], boot_holders: set[int]) -> list[str]:
    """What the disk needs to boot that the selection leaves out."""
    out = []
    for p in parts:
        if p.number in selected:
            continue
        if p.is_esp:
            out.append(f"partition {p.number} (EFI System) is not selected: the restored disk will not boot by UEFI")
        elif p.is_bios_boot:
            out.append(f"partition {p.number} (BIOS boot) is not selected: kept anyway, GRUB's core lives there")
        elif p.bootable and p.type.startswith("0x"):
            out.append(f"partition {p.number} is the active (boot) MBR partition and is not selected: "
                       "the restored disk may not boot")
        elif p.number in boot_holders:
            out.append(f"partition {p.number} holds /boot (kernel or GRUB files) and is not selected: "
                       "the restored disk will not boot")
    return out


def mounted_rw(path: str | None) -> dict[int, str]:
    """Partition number (0: the device itself) -> mount point, for a block-device source whose
    partitions are mounted read-write: their allocation maps can change while they are read."""
    import os
    import stat
    from ..platform.blockdev import mounts, partitions
    if not path:
        return {}
    try:
        st = os.stat(path)
    except OSError:
        return {}
    if not stat.S_ISBLK(st.st_mode):
        return {}
    rw = mounts(rw_only=True)
    out = {number: rw[dev] for number, dev in partitions(st.st_rdev).items() if dev in rw}
    if st.st_rdev in rw:
        out[0] = rw[st.st_rdev]
    return out


def build_plan(source: Stream, *, partitions: str | None = None, path: str | None = None,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> FsAwarePlan:
    """The plan of a filesystem-aware capture of `source` (`path`: its file or device, for partclone)."""
    table, described = describe_partitions(source)
    entries = {e["number"]: e for e in described["partitions"]}
    parts = [p for p in table.partitions if not p.is_extended]
    if not parts:  # no partitions: a superfloppy (a FAT boot sector can pass for an empty MBR)
        from .probe import probe
        whole = probe(source)
        if whole.type:
            described.update(filesystem=whole.type, label=whole.label)
            parts = [Partition(0, 0, source.size, "none", "whole disk")]
            entries = {0: described}
    selected = _parse_selection(partitions, parts, described) if partitions else None
    result = FsAwarePlan(CapturePlan(), selected=selected)
    from .boot_files import holds_boot_files
    boot_holders = {p.number for p in parts if holds_boot_files(entries[p.number].get("filesystem"),
                                                                   SliceStream(source, p.start, p.size))} \
        if selected else set()
    if selected is not None:
        result.warnings = boot_warnings(parts, selected, boot_holders)

    live = mounted_rw(path)
    regions: list[Region] = []
    ordered = sorted(parts, key=lambda p: p.start)
    overlapping = {b.number for a, b in zip(ordered, ordered[1:]) if b.start < a.end}
    overlapping |= {a.number for a, b in zip(ordered, ordered[1:]) if b.start < a.end}
    for p in ordered:
        entry = entries[p.number]
        fs = entry.get("filesystem")
        if p.end > source.size or p.number in overlapping:
            why = "extends past the end of the disk" if p.end > source.size else "overlaps another partition"
            entry.update(used_bytes=min(p.size, max(0, source.size - p.start)), capture_mode=f"full: {why}")
            continue
        if p.is_bios_boot:
            entry.update(used_bytes=p.size, capture_mode="full: BIOS boot partition (boot code)")
            continue
        if selected is not None and p.number not in selected:
            entry.update(used_bytes=0, capture_mode="not selected")
            regions.append(Region(p.start, p.end))
            continue
        where = live.get(p.number) or live.get(0)
        if where:
            entry.update(used_bytes=p.size, capture_mode=f"full: mounted read-write on {where}, its allocation "
                                                        "map may change while it is read")
            continue
        try:
            used = read_used_blocks(fs, SliceStream(source, p.start, p.size), path, p.start)
        except NotUsable as e:
            entry.update(used_bytes=p.size, capture_mode=f"full: {e}")
            continue
        except (struct.error, ValueError, IndexError, OverflowError) as e:  # a parser bug: be safe, keep all
            entry.update(used_bytes=p.size, capture_mode=f"full: {fs}: could not parse the allocation map ({e})")
            continue
        if used.end_byte > p.size:
            # A filesystem larger than its partition is damaged; its map would also describe bytes
            # beyond the partition (beyond the disk: a reader refuses such a map). Keep it whole.
            entry.update(used_bytes=p.size, capture_mode=f"full: {used.fs}: the filesystem claims "
                                                         f"{used.end_byte} bytes, its partition holds {p.size}")
            continue
        entry.update(used_bytes=used.used_bytes(p.size), capture_mode=f"used-blocks ({used.fs})")
        regions.append(Region(p.start, p.end, used, p.start + used.first_byte))
        result.plan.used_maps.append(L.UsedMap(p.number, used.block_size, p.start + used.first_byte,
                                               used.block_count, bytes(used.bitmap)))

    finder = FreeFinder(regions)
    count = -(-source.size // chunk_size)
    for i in range(count):
        c0 = i * chunk_size
        c1 = min(source.size, c0 + chunk_size)
        if finder.free_bytes(c0, c1) == c1 - c0:
            result.plan.free_chunks.add(i)
    if regions:
        result.plan.blank = finder.blank
    mode = "partitions" if selected is not None else "used"
    capture = {"mode": mode, "partitions": selected if selected is not None else [p.number for p in parts]}
    if result.warnings:
        capture["warnings"] = result.warnings
    result.plan.metadata = {"partition_table": described, "capture": capture}
    return result


class FreeFinder:
    """Free byte ranges of the disk, by chunk: from the regions' maps (clean, sorted, not overlapping)."""

    def __init__(self, regions: list[Region]):
        self.regions = sorted(regions, key=lambda r: r.start)
        self.starts = [r.start for r in self.regions]

    def ranges(self, c0: int, c1: int):
        """Free (start, end) disk ranges inside [c0, c1), in order."""
        k = max(0, bisect.bisect_right(self.starts, c0) - 1)
        while k < len(self.regions) and self.regions[k].start < c1:
            r = self.regions[k]
            k += 1
            lo, hi = max(c0, r.start), min(c1, r.end)
            if lo >= hi:
                continue
            if r.used is None:
                yield lo, hi
                continue
            u = r.used
            m0, m1 = max(lo, r.map_start), min(hi, r.map_start + u.block_count * u.block_size)
            if m0 >= m1:
                continue
            bs = u.block_size
            b0, b1 = (m0 - r.map_start) // bs, -(-(m1 - r.map_start) // bs)
            n = b1 - b0
            v = bits(u.bitmap, b0, n)
            if v == (1 << n) - 1:
                continue
            pos = 0
            while pos < n:
                rest = v >> pos
                if rest:
                    inv = ~rest
                    pos += (inv & -inv).bit_length() - 1  # skip used blocks
                    rest = v >> pos
                zeros = n - pos if rest == 0 else (rest & -rest).bit_length() - 1
                if zeros <= 0:
                    break
                s = max(m0, r.map_start + (b0 + pos) * bs)
                e = min(m1, r.map_start + (b0 + pos + zeros) * bs)
                if s < e:
                    yield s, e
                pos += zeros

    def free_bytes(self, c0: int, c1: int) -> int:
        return sum(e - s for s, e in self.ranges(c0, c1))

    def blank(self, offset: int, data: bytes) -> bytes:
        """The chunk's bytes with every free block zeroed (so stale data costs nothing)."""
        out = None
        for s, e in self.ranges(offset, offset + len(data)):
            if out is None:
                out = bytearray(data)
            out[s - offset:e - offset] = bytes(e - s)
        return data if out is None else bytes(out)
