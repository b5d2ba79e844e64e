"""Where the bytes of an ext2/3/4 file lie on its partition: the appliance's debugfs output, bounded.

The files view reads a regular file of an ext filesystem from the image itself (through the disk's
caching reader) instead of through the appliance when the appliance has told it where the file's
blocks are (docs/mount.md, "Files from extent maps"). The host still parses no filesystem: the
appliance's `tune2fs -l` and `debugfs ex -l <inode>` do, and this module only checks what they
printed. That text is derived from an untrusted image, so every number is bounded here, and
anything this module does not recognise sends the file (or the whole filesystem) back to the
appliance's pread. A hostile map can at worst point at other bytes of the same partition, which
partitions/p<N>.raw already shows.

Pure functions over text and dicts: no I/O, unit-tested with hostile input (tests/test_ext_extents.py).
"""
from __future__ import annotations

import re
from array import array
from bisect import bisect_right
from dataclasses import dataclass

MIN_BLOCK, MAX_BLOCK = 1 << 10, 1 << 16
MAX_EXTENTS = 1 << 16  # per file: a map past this (1.5 MiB of memory) is not worth keeping; pread serves it
# Features under which the disk's blocks are not what the appliance's mounted filesystem shows:
# a journal to replay (the appliance's kernel replays it into its overlay), orphans to clean up
# (the mount truncates them), encrypted or compressed data.
REFUSED_FEATURES = {"needs_recovery", "orphan_present", "encrypt", "compression", "journal_dev"}
SECTION = re.compile(r"debugfs: ex -l <(\d{1,10})>")
HEADER = re.compile(r"Level\s+Entries\s+Logical\s+Physical\s+Length\s+Flags\s*")
# One leaf: level/depth entry/entries lstart - lend pstart - pend length [Uninit]
LEAF = re.compile(r"\s*(\d{1,5})/\s*(\d{1,5})\s+(\d{1,6})/\s*(\d{1,6})\s+(\d{1,20})\s+-\s+(\d{1,20})"
                  r"\s+(\d{1,20})\s+-\s+(\d{1,20})\s+(\d{1,20})\s*(Uninit)?\s*")
END_MARK = "#end-of-maps"  # the appliance appends it: a section it does not close may be cut short


@dataclass(frozen=True)
class ExtFacts:
    """What the files view needs of one ext filesystem to read its files from the image."""
    block_size: int
    part_start: int  # bytes, on the disk
    part_size: int  # bytes


def eligibility(tune2fs: dict, part_start: int, part_size: int,
                seen_start: int | None, seen_size: int | None) -> tuple[ExtFacts | None, str]:
    """(facts, "") when files of this filesystem may be read from its extent maps, else (None, why).
    `tune2fs` is libguestfs' tune2fs_l() of the device, read before it was mounted; part_start/size
    come from imgkit's partition table, seen_start/size from the appliance's kernel: they must agree,
    or the maps would be read against the wrong bytes."""
    if not isinstance(tune2fs, dict):
        return None, "no superblock facts"
    if str(tune2fs.get("Filesystem magic number", "")).strip().lower() != "0xef53":
        return None, "not an ext2/3/4 superblock"
    features = set(str(tune2fs.get("Filesystem features", "")).split())
    if "extent" not in features:
        return None, "no extents (ext2/ext3 block maps)"
    refused = sorted(features & REFUSED_FEATURES)
    if refused:
        return None, f"feature {', '.join(refused)}: the disk differs from what the appliance mounted"
    if str(tune2fs.get("Filesystem state", "")).strip() != "clean":
        return None, f"filesystem state {str(tune2fs.get('Filesystem state', ''))[:40]!r}, not clean"
    if "First orphan inode" in tune2fs:
        return None, "orphan inodes to clean up"
    bs = uint_or_none(tune2fs.get("Block size"))
    if bs is None or not MIN_BLOCK <= bs <= MAX_BLOCK or bs & (bs - 1):
        return None, "block size out of range"
    blocks = uint_or_none(tune2fs.get("Block count"))
    if blocks is None or blocks * bs > part_size:
        return None, "the filesystem is larger than its partition"
    if part_start < 0 or part_size <= 0 or (seen_start, seen_size) != (part_start, part_size):
        return None, "the appliance sees the partition elsewhere than the partition table says"
    return ExtFacts(bs, part_start, part_size), ""


def uint_or_none(text) -> int | None:
    """A non-negative integer below 2**64 from untrusted text, else None."""
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if 0 <= value < 1 << 64 else None


class ExtentMap:
    """A file's data blocks, compactly: flat triples (logical block, physical block or -1 for
    zeros (an unwritten extent), count), sorted and non-overlapping; what no extent covers is a hole."""
    __slots__ = ("size", "block_size", "ext")

    def __init__(self, size: int, block_size: int, ext: array):
        self.size, self.block_size, self.ext = size, block_size, ext

    def pack(self) -> bytes:
        """The map as one bytes object (size, then the triples), as a cache keeps it: ~65 bytes for a
        file of one extent, against ~190 for the object, its array and its size."""
        return array("q", (self.size,)).tobytes() + self.ext.tobytes()

    @classmethod
    def unpack(cls, blob: bytes, block_size: int) -> "ExtentMap":
        words = array("q")
        words.frombytes(blob)
        return cls(words[0], block_size, words[1:])

    def pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[(byte offset in the partition, or -1 for zeros, byte count)] covering [offset,
        offset+length) of the file, clipped to its size."""
        end = min(offset + length, self.size)
        out: list[tuple[int, int]] = []
        if offset >= end:
            return out
        bs, ext = self.block_size, self.ext
        n = len(ext) // 3
        k = max(0, bisect_right(range(n), offset // bs, key=lambda j: ext[3 * j]) - 1)
        pos = offset
        while pos < end:
            blk = pos // bs
            while k < n and ext[3 * k] + ext[3 * k + 2] <= blk:
                k += 1
            if k < n and ext[3 * k] <= blk:
                lstart, pstart, count = ext[3 * k], ext[3 * k + 1], ext[3 * k + 2]
                stop = min(end, (lstart + count) * bs)
                out.append((-1 if pstart < 0 else pstart * bs + (pos - lstart * bs), stop - pos))
            else:  # a hole, up to the next extent
                stop = min(end, ext[3 * k] * bs) if k < n else end
                out.append((-1, stop - pos))
            pos = stop
        return out


def debugfs_sections(text: str) -> tuple[dict[int, list[str]], set[int]]:
    """({inode: the lines of its section}, inodes seen more than once). A section runs from its
    `debugfs: ex -l <N>` line to the next such line or the end mark; one that runs to the end of the
    text (the output was cut) is left out."""
    sections: dict[int, list[str]] = {}
    twice: set[int] = set()
    current: list[str] | None = None
    ino = -1
    for line in text.split("\n"):
        m = SECTION.fullmatch(line)
        if m or line == END_MARK:
            if current is not None:
                if ino in sections:
                    twice.add(ino)
                sections[ino] = current
            current = None
            if not m:
                break
            ino, current = int(m.group(1)), []
        elif current is not None:
            current.append(line)
    return sections, twice


def parse_maps(text: str, wanted: dict[int, int], facts: ExtFacts,
               max_extents: int = MAX_EXTENTS) -> dict[int, ExtentMap | None]:
    """The map of each inode in `wanted` ({inode: file size}) from debugfs' output; None for an
    inode whose section is missing, cut short, repeated, or holds anything but the header and
    well-formed leaves inside the partition (that file is read through the appliance)."""
    sections, twice = debugfs_sections(text)
    out: dict[int, ExtentMap | None] = {}
    for ino, size in wanted.items():
        lines = sections.get(ino)
        out[ino] = None if lines is None or ino in twice else _parse_section(lines, size, facts, max_extents)
    return out


def _parse_section(lines: list[str], size: int, facts: ExtFacts, max_extents: int) -> ExtentMap | None:
    bs = facts.block_size
    part_blocks = facts.part_size // bs
    file_blocks = -(-size // bs)
    ext = array("q")
    header = False
    next_free = 0  # the first logical block after the previous extent
    leaves = 0
    for line in lines:
        if not line.strip():
            continue
        if not header:
            if not HEADER.fullmatch(line):
                return None  # an error line ("does not use extent block maps", ...)
            header = True
            continue
        m = LEAF.fullmatch(line)
        if m is None:
            return None
        level, depth = int(m.group(1)), int(m.group(2))
        lstart, lend, pstart, pend, count = (int(m.group(i)) for i in range(5, 10))
        if level != depth or count <= 0 or lend - lstart + 1 != count or pend - pstart + 1 != count:
            return None  # not a leaf, or a line whose numbers disagree
        if lstart < next_free or lend >= 1 << 32 or pstart < 1 or pend >= part_blocks:
            return None  # unsorted, overlapping, or outside the partition
        leaves += 1
        if leaves > max_extents:
            return None
        next_free = lend + 1
        if lstart >= file_blocks:
            continue  # past the end of the file (blocks allocated beyond EOF)
        count = min(count, file_blocks - lstart)
        ext.extend((lstart, -1 if m.group(10) else pstart, count))
    if not header:
        return None
    return ExtentMap(size, bs, ext)


def regular_files(text: bytes) -> list[tuple[int, int]]:
    """(inode, size) from the appliance's `find -printf '%i %s\\n'` output closed by END_MARK; a line
    that is not two bounded numbers is skipped, and so is the last line when the output was cut (no
    END_MARK)."""
    lines = text.split(b"\n")
    if END_MARK.encode() in lines:
        lines = lines[:lines.index(END_MARK.encode())]
    else:
        lines = lines[:-1]
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and len(fields[0]) <= 10 \
                and len(fields[1]) <= 20:
            out.append((int(fields[0]), int(fields[1])))
    return out
