"""MBR (with extended/logical partitions) and GPT (CRCs checked) parsing, bounded against hostile input.

Follows the UEFI 2.10 spec, section 5 (GPT) and the classic IBM PC MBR layout.
"""
from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import asdict, dataclass, field

from ..stream import Stream

MAX_LOGICAL = 128  # a longer EBR chain is treated as hostile/looping
MAX_GPT_ENTRIES = 1024
MAX_GPT_ENTRY_SIZE = 4096

MBR_TYPES = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "NTFS/exFAT/HPFS",
    0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Extended (LBA)",
    0x11: "Hidden FAT12", 0x27: "Windows recovery", 0x82: "Linux swap", 0x83: "Linux", 0x85: "Linux extended",
    0x8E: "Linux LVM", 0xA5: "FreeBSD", 0xEE: "GPT protective", 0xEF: "EFI System", 0xFD: "Linux RAID",
}
GPT_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
}
GPT_ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
GPT_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"


MBR_EXTENDED = (0x05, 0x0F, 0x85)  # containers of logical partitions (an EBR chain), not filesystems
_MBR_EXTENDED_NAMES = frozenset(f"0x{t:02x}" for t in MBR_EXTENDED)


def is_extended_type(ptype: str) -> bool:
    """Whether a partition type, as Partition.type and image metadata spell it ("0x0f"), is an
    MBR extended partition."""
    return ptype.lower() in _MBR_EXTENDED_NAMES


@dataclass
class Partition:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str  # MBR: "0x83"; GPT: type GUID
    type_name: str
    uuid: str | None = None
    name: str | None = None
    bootable: bool = False
    logical: bool = False
    attributes: int = 0
    ebr_offset: int | None = None  # a logical partition: the byte offset of its EBR

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def is_esp(self) -> bool:
        return self.type in (GPT_ESP, "0xef")

    @property
    def is_bios_boot(self) -> bool:
        return self.type == GPT_BIOS_BOOT

    @property
    def is_extended(self) -> bool:
        return is_extended_type(self.type)


@dataclass
class PartitionTable:
    type: str  # "mbr", "gpt" or "none"
    sector_size: int = 512
    disk_id: str | None = None
    partitions: list[Partition] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # e.g. "backup GPT header missing"
    first_usable: int | None = None  # GPT: bytes
    last_usable: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    def get(self, number: int) -> Partition | None:
        return next((p for p in self.partitions if p.number == number), None)


def _mbr_entries(sector: bytes):
    for i in range(4):
        e = sector[446 + 16 * i:462 + 16 * i]
        status, ptype = e[0], e[4]
        lba, count = struct.unpack_from("<II", e, 8)
        yield i, status, ptype, lba, count


def _parse_mbr(disk: Stream, sector: bytes, ss: int) -> PartitionTable:
    disk_id = f"0x{struct.unpack_from('<I', sector, 440)[0]:08x}"
    if any(status not in (0, 0x80) for _, status, _, _, _ in _mbr_entries(sector)):
        return PartitionTable("none")  # a filesystem boot sector (superfloppy), not an MBR: as blkid does
    table = PartitionTable("mbr", ss, disk_id)
    size = disk.size
    extended_start = None
    for i, status, ptype, lba, count in _mbr_entries(sector):
        if ptype == 0 or count == 0:
            continue
        start, length = lba * ss, count * ss
        if start + length > size:
            table.problems.append(f"partition {i + 1} extends past the end of the disk")
        if ptype in MBR_EXTENDED:
            extended_start = lba
        table.partitions.append(Partition(i + 1, start, length, f"0x{ptype:02x}",
                                          MBR_TYPES.get(ptype, "unknown"), bootable=status == 0x80))
    if extended_start is not None:
        ebr_lba, number, seen = extended_start, 5, set()
        while ebr_lba and number < 5 + MAX_LOGICAL:
            if ebr_lba in seen or ebr_lba * ss + 512 > size:
                table.problems.append(f"extended partition chain broken at LBA {ebr_lba}")
                break
            seen.add(ebr_lba)
            ebr = disk.read(ebr_lba * ss, 512)
            if len(ebr) < 512 or ebr[510:512] != b"\x55\xaa":
                table.problems.append(f"no EBR signature at LBA {ebr_lba}")
                break
            entries = list(_mbr_entries(ebr))
            _, status, ptype, lba, count = entries[0]
            if ptype and count:
                table.partitions.append(Partition(number, (ebr_lba + lba) * ss, count * ss, f"0x{ptype:02x}",
                                                  MBR_TYPES.get(ptype, "unknown"), bootable=status == 0x80,
                                                  logical=True, ebr_offset=ebr_lba * ss))
                number += 1
            _, _, nptype, nlba, _ = entries[1]
            ebr_lba = extended_start + nlba if nptype and nlba else 0
    return table


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=bytes(raw)))  # bytes(): a Stream may hand out a bytearray (libnbd)


def _parse_gpt_at(disk: Stream, ss: int, lba: int) -> tuple[dict, list[Partition]] | str:
    hdr = disk.read(lba * ss, ss)
    if len(hdr) < 92 or hdr[:8] != b"EFI PART":
        return "no GPT header"
    (rev, hsize, hcrc, _r, my_lba, alt_lba, first, last, disk_guid, entries_lba, n_entries, entry_size,
     entries_crc) = struct.unpack_from("<IIIIQQQQ16sQIII", hdr, 8)
    if not 92 <= hsize <= ss:
        return f"GPT header size {hsize} is invalid"
    check = bytearray(hdr[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc:
        return "GPT header CRC mismatch"
    if n_entries > MAX_GPT_ENTRIES or entry_size < 128 or entry_size > MAX_GPT_ENTRY_SIZE or entry_size % 8:
        return f"GPT declares {n_entries} entries of {entry_size} bytes (refused)"
    array_bytes = n_entries * entry_size
    if entries_lba * ss + array_bytes > disk.size:
        return "GPT partition array lies past the end of the disk"
    array = disk.read(entries_lba * ss, array_bytes)
    if zlib.crc32(array) != entries_crc:
        return "GPT partition array CRC mismatch"
    parts = []
    for i in range(n_entries):
        e = array[i * entry_size:(i + 1) * entry_size]
        type_guid = e[:16]
        if type_guid == bytes(16):
            continue
        first_lba, last_lba, attrs = struct.unpack_from("<QQQ", e, 32)
        if last_lba < first_lba:
            continue
        name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        t = _guid(type_guid)
        parts.append(Partition(i + 1, first_lba * ss, (last_lba - first_lba + 1) * ss, t,
                               GPT_TYPES.get(t, "unknown"), uuid=_guid(e[16:32]), name=name or None,
                               attributes=attrs, bootable=bool(attrs & 4)))
    info = {"disk_guid": _guid(disk_guid), "first": first * ss, "last": (last + 1) * ss - 1,
            "alt_lba": alt_lba, "my_lba": my_lba}
    return info, parts


def read_partition_table(disk: Stream) -> PartitionTable:
    """Parse the disk's partition table; never raises on bad content (problems are listed instead)."""
    if disk.size < 512:
        return PartitionTable("none")
    mbr = disk.read(0, 512)
    if mbr[510:512] != b"\x55\xaa":
        return PartitionTable("none")
    protective = any(ptype == 0xEE for _, _, ptype, _, _ in _mbr_entries(mbr))
    if protective:
        for ss in (512, 4096):
            if disk.size < 2 * ss:
                continue
            result = _parse_gpt_at(disk, ss, 1)
            problems = []
            if isinstance(result, str):
                # The primary is damaged: try the backup at the last LBA, as gdisk does.
                last = disk.size // ss - 1
                backup = _parse_gpt_at(disk, ss, last)
                if isinstance(backup, str):
                    if ss == 4096:
                        return PartitionTable("gpt", 512, problems=[f"primary: {result}; backup: {backup}"])
                    continue
                problems.append(f"primary GPT header unusable ({result}); the backup was used")
                result = backup
            info, parts = result
            if info["alt_lba"] * ss + ss > disk.size and info["my_lba"] == 1:
                problems.append("the backup GPT header lies past the end of the disk")
            elif info["my_lba"] == 1 and isinstance(_parse_gpt_at(disk, ss, info["alt_lba"]), str):
                problems.append("the backup GPT header is missing or damaged")
            for p in parts:
                if p.end > disk.size:
                    problems.append(f"partition {p.number} extends past the end of the disk")
            return PartitionTable("gpt", ss, info["disk_guid"], parts, problems, info["first"], info["last"])
    return _parse_mbr(disk, mbr, 512)
