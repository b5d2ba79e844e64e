"""MBR and GPT tables made by the real tools (sfdisk, sgdisk) are parsed correctly; damaged and
hostile tables never crash the parser."""
import struct
import subprocess
import zlib

import pytest

from imgkit.formats.partitions import read_partition_table
from imgkit.formats.sources import RawSource


def make_disk(path, size_mib=64):
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)


def test_mbr_with_extended_and_logical(tmp_path):
    disk = tmp_path / "mbr.raw"
    make_disk(disk)
    subprocess.run(["sfdisk", "-q", str(disk)], check=True, text=True, input=(
        "label: dos\nlabel-id: 0x12345678\n"
        "start=2048, size=20480, type=83, bootable\n"
        "start=22528, size=10240, type=c\n"
        "start=32768, size=90112, type=5\n"
        "start=34816, size=20480, type=82\n"
        "start=57344, size=20480, type=83\n"
        "start=79872, size=20480, type=7\n"))
    with RawSource(str(disk)) as src:
        t = read_partition_table(src)
    assert t.type == "mbr" and t.disk_id == "0x12345678" and not t.problems
    got = [(p.number, p.start // 512, p.size // 512, p.type, p.bootable, p.logical) for p in t.partitions]
    assert got == [
        (1, 2048, 20480, "0x83", True, False),
        (2, 22528, 10240, "0x0c", False, False),
        (3, 32768, 90112, "0x05", False, False),
        (5, 34816, 20480, "0x82", False, True),
        (6, 57344, 20480, "0x83", False, True),
        (7, 79872, 20480, "0x07", False, True),
    ]


def test_gpt_by_sgdisk(tmp_path):
    disk = tmp_path / "gpt.raw"
    make_disk(disk)
    subprocess.run(["sgdisk", "-n", "1:2048:+8M", "-t", "1:ef00", "-c", "1:EFI system",
                    "-n", "2:0:+30M", "-t", "2:8300", "-c", "2:root", "-u", "2:0FC63DAF-0000-4772-8E79-3D69D8477DE4",
                    "-n", "3:0:0", "-t", "3:8200", "-c", "3:swap", str(disk)], check=True, capture_output=True)
    with RawSource(str(disk)) as src:
        t = read_partition_table(src)
    assert t.type == "gpt" and not t.problems, t.problems
    assert [p.number for p in t.partitions] == [1, 2, 3]
    esp, root, swap = t.partitions
    assert esp.is_esp and esp.name == "EFI system" and esp.start == 2048 * 512 and esp.size == 8 << 20
    assert root.type_name == "Linux filesystem" and root.name == "root"
    assert root.uuid == "0fc63daf-0000-4772-8e79-3d69d8477de4"
    assert swap.type_name == "Linux swap" and swap.end <= (64 << 20) - 33 * 512
    # Compare with sgdisk's own view of the start sectors.
    out = subprocess.run(["sgdisk", "-p", str(disk)], capture_output=True, text=True, check=True).stdout
    starts = [int(line.split()[1]) for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert starts == [p.start // 512 for p in t.partitions]


def test_gpt_crc_checked_and_backup_used(tmp_path):
    disk = tmp_path / "gpt.raw"
    make_disk(disk)
    subprocess.run(["sgdisk", "-n", "1:2048:+8M", "-c", "1:data", str(disk)], check=True, capture_output=True)
    raw = bytearray(disk.read_bytes())
    raw[1024 + 56] ^= 0xFF  # a byte of the first entry in the primary array: its CRC no longer matches
    disk.write_bytes(raw)
    with RawSource(str(disk)) as src:
        t = read_partition_table(src)
    assert t.type == "gpt" and t.partitions[0].name == "data"
    assert any("backup" in p for p in t.problems)


@pytest.mark.parametrize("damage", ["entries", "loop"])
def test_hostile_tables_bounded(tmp_path, damage):
    disk = tmp_path / "h.raw"
    make_disk(disk, 4)
    raw = bytearray(disk.read_bytes())
    if damage == "entries":
        # A protective MBR and a GPT header whose CRC is right but which claims 2^32-1 entries.
        raw[446 + 4] = 0xEE
        struct.pack_into("<II", raw, 446 + 8, 1, 8191)
        raw[510:512] = b"\x55\xaa"
        hdr = bytearray(92)
        struct.pack_into("<8sIIIIQQQQ16sQIII", hdr, 0, b"EFI PART", 0x10000, 92, 0, 0, 1, 8191, 34, 8158,
                         bytes(16), 2, 0xFFFFFFFF, 128, 0)
        struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
        raw[512:604] = hdr
    else:
        # An extended partition whose EBR points back at itself.
        raw[446:462] = bytes([0, 0, 0, 0, 0x05, 0, 0, 0]) + struct.pack("<II", 100, 4000)
        raw[510:512] = b"\x55\xaa"
        ebr = 100 * 512
        raw[ebr + 446:ebr + 462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 1, 10)
        raw[ebr + 462:ebr + 478] = bytes([0, 0, 0, 0, 0x05, 0, 0, 0]) + struct.pack("<II", 200, 400)
        raw[ebr + 510:ebr + 512] = b"\x55\xaa"
        ebr2 = 300 * 512  # links back to itself (relative 200 from the extended start)
        raw[ebr2 + 446:ebr2 + 462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 1, 10)
        raw[ebr2 + 462:ebr2 + 478] = bytes([0, 0, 0, 0, 0x05, 0, 0, 0]) + struct.pack("<II", 200, 400)
        raw[ebr2 + 510:ebr2 + 512] = b"\x55\xaa"
    disk.write_bytes(raw)
    with RawSource(str(disk)) as src:
        t = read_partition_table(src)
    assert t.problems
    assert len(t.partitions) <= 130
