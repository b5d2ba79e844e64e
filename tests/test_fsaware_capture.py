"""Filesystem-aware capture of a real GPT disk (BIOS boot, ESP FAT32, NTFS, swap, ext4) whose free
space holds stale data: only used blocks are stored, the maps agree with partclone's, and after
capture -> restore every filesystem checks clean and every file's sha256 matches."""
import json
import os

import pytest

import fsaware_disks as D
from conftest import assert_one_line_error, run_imgkit
from imgkit.filesystems import ext, fat, ntfs
from imgkit.formats.sources import RawSource
from imgkit.stream import SliceStream

MiB = D.MiB


@pytest.fixture(scope="session")
def disk(fsaware_gpt_disk, tmp_path_factory):
    """The shared GPT disk and its two images (conftest.py), with a directory for this module's outputs."""
    return {**fsaware_gpt_disk, "work": str(tmp_path_factory.mktemp("fsaware-capture"))}


def part_range(n):
    _, start, size, _, _ = D.LAYOUT[n - 1]
    return start * MiB, size * MiB


def partclone_used(tool, part_file, block_size, first_byte, count):
    """The set of map blocks partclone's domain map calls used."""
    dom = part_file + ".domain"
    D.run(tool, "-D", "-q", "-s", part_file, "-o", dom, "-L", dom + ".log")
    used = set()
    for line in open(dom):
        f = line.split()
        if line.startswith("#") or len(f) != 3 or f[2] != "+":
            continue
        pos, size = int(f[0], 16), int(f[1], 16)
        lo = max(0, (pos - first_byte) // block_size)
        hi = min(count, -(-(pos + size - first_byte) // block_size))
        used.update(range(lo, hi))
    return used


@pytest.mark.parametrize("number,module,tool", [(5, ext, "partclone.ext4"), (2, fat, "partclone.fat"),
                                                (3, ntfs, "partclone.ntfs")])
def test_maps_agree_with_partclone(disk, number, module, tool):
    start, size = part_range(number)
    part_file = D.extract(disk["path"], start, size, os.path.join(disk["work"], f"map-p{number}.raw"))
    with RawSource(part_file) as src:
        u = module.used_blocks(src)
    ours = {i for i in range(u.block_count) if u.bitmap[i // 8] >> (i % 8) & 1}
    theirs = partclone_used(tool, part_file, u.block_size, u.first_byte, u.block_count)
    os.unlink(part_file)
    assert theirs, "partclone found nothing used"
    assert theirs <= ours, f"blocks partclone says are used but we call free: {sorted(theirs - ours)[:10]}"
    assert len(ours - theirs) <= max(2, len(theirs) // 100), sorted(ours - theirs)[:20]
    assert 0 < len(ours) < u.block_count // 2  # the disk has stale free space to skip


def test_info_shows_used_per_partition(disk):
    info = json.loads(run_imgkit("info", "--json", disk["aware"], check=True).stdout)
    parts = {p["number"]: p for p in info["partition_table"]["partitions"]}
    assert parts[5]["capture_mode"] == "used-blocks (ext4)"
    assert parts[2]["capture_mode"] == "used-blocks (vfat)"
    assert parts[3]["capture_mode"] == "used-blocks (ntfs)"
    assert parts[4]["capture_mode"] == "used-blocks (swap)" and parts[4]["used_bytes"] == 4096
    assert parts[1]["capture_mode"].startswith("full: BIOS boot")
    for n in (2, 3, 5):
        assert 0 < parts[n]["used_bytes"] < parts[n]["size"] / 2
    assert info["capture"]["mode"] == "used"
    assert info["chunks"]["free"] > 0
    text = run_imgkit("info", disk["aware"], check=True).stdout
    assert "used-blocks (ext4)" in text and "of 64.0 MiB" in text


def test_much_smaller_than_sector_by_sector(disk):
    aware, full = os.path.getsize(disk["aware"]), os.path.getsize(disk["full"])
    assert aware * 4 < full, (aware, full)


@pytest.fixture(scope="session")
def restored(disk):
    out = os.path.join(disk["work"], "restored.img")
    run_imgkit("restore", "--yes", "--progress", "none", disk["aware"], out, check=True)
    return out


def test_restored_filesystems_check_clean_and_files_match(disk, restored):
    work = disk["work"]
    facts = disk["facts"]
    root = D.extract(restored, *part_range(5), os.path.join(work, "r5.ext4"))
    assert D.run("e2fsck", "-fn", root, check=False).returncode == 0
    for name, digest in facts["ext4"].items():
        assert D.sha(D.read_ext4_file(root, name)) == digest, name
    esp = D.extract(restored, *part_range(2), os.path.join(work, "r2.vfat"))
    assert D.run("fsck.fat", "-n", esp, check=False).returncode == 0
    for name, digest in facts["esp"].items():
        assert D.sha(D.read_fat_file(esp, name)) == digest, name
    nt = D.extract(restored, *part_range(3), os.path.join(work, "r3.ntfs"))
    assert D.run("ntfsfix", "-n", nt, check=False).returncode == 0
    for name, digest in facts["ntfs"].items():
        assert D.sha(D.read_ntfs_file(nt, name)) == digest, name
    swap = D.extract(restored, *part_range(4), os.path.join(work, "r4.swap"))
    assert D.run("swaplabel", swap, check=False).returncode == 0  # the swap header is intact
    for f in (root, esp, nt, swap):
        os.unlink(f)


def test_boot_code_and_tables_kept(disk, restored):
    with open(restored, "rb") as r, open(disk["path"], "rb") as s:
        assert D.sha(r.read(440)) == disk["facts"]["boot_code"]
        r.seek(0), s.seek(0)
        assert r.read(MiB) == s.read(MiB)  # MBR, GPT header + array, the post-GPT gap
        r.seek(MiB)
        assert D.sha(r.read(MiB)) == disk["facts"]["bios"]  # the BIOS boot partition, whole
        r.seek(-34 * 512, 2), s.seek(-34 * 512, 2)
        assert r.read() == s.read()  # the backup GPT
    assert D.run("sgdisk", "-v", restored).stdout.count(b"No problems found") == 1


def test_free_space_reads_as_zeros(disk, restored):
    """Free blocks of the ext4 partition come back as zeros, not stale data."""
    start, size = part_range(5)
    with RawSource(restored) as src:
        u = ext.used_blocks(SliceStream(src, start, size))
        free = [i for i in range(u.block_count) if not u.bitmap[i // 8] >> (i % 8) & 1]
        assert len(free) > 1000
        for i in free[::97]:
            assert src.read(start + u.first_byte + i * u.block_size, u.block_size).count(0) == u.block_size


def test_sector_by_sector_restores_byte_identical(disk):
    out = os.path.join(disk["work"], "restored-full.img")
    run_imgkit("restore", "--yes", "--progress", "none", disk["full"], out, check=True)
    assert D.run("cmp", out, disk["path"], check=False).returncode == 0
    os.unlink(out)


def test_partition_selection_by_name_warns_about_boot(disk):
    out = os.path.join(disk["work"], "sel.imgk")
    proc = run_imgkit("capture", "--progress", "none", "--json", "--partitions", "data", disk["path"], out,
                      check=True)
    doc = json.loads(proc.stdout)
    warnings = " ".join(doc["warnings"])
    assert "EFI System" in warnings and "partition 5 holds /boot" in warnings and "BIOS boot" in warnings
    assert "imgkit: warning:" in proc.stderr and "UEFI" in proc.stderr
    info = json.loads(run_imgkit("info", "--json", out, check=True).stdout)
    parts = {p["number"]: p for p in info["partition_table"]["partitions"]}
    assert info["capture"] == {"mode": "partitions", "partitions": [3], "warnings": doc["warnings"]}
    assert parts[5]["capture_mode"] == "not selected" and parts[2]["capture_mode"] == "not selected"
    assert parts[3]["capture_mode"] == "used-blocks (ntfs)"
    assert os.path.getsize(out) < os.path.getsize(disk["aware"])
    os.unlink(out)


def test_partition_selection_by_number_and_label(disk):
    out = os.path.join(disk["work"], "sel2.imgk")
    proc = run_imgkit("capture", "--progress", "none", "--json", "--partitions", "ESP,rootfs,1", disk["path"],
                      out, check=True)
    assert json.loads(proc.stdout)["warnings"] == []  # ESP, /boot and BIOS boot are all selected
    info = json.loads(run_imgkit("info", "--json", out, check=True).stdout)
    assert info["capture"]["partitions"] == [2, 5, 1]
    os.unlink(out)


def test_partition_selection_errors(disk, tmp_path):
    proc = run_imgkit("capture", "--partitions", "9", disk["path"], tmp_path / "x.imgk")
    assert_one_line_error(proc, 3, "no partition '9'", "hint:")
    proc = run_imgkit("capture", "--partitions", "1", "--sector-by-sector", disk["path"], tmp_path / "x.imgk")
    assert_one_line_error(proc, 3, "exclude each other")
    assert not os.path.exists(tmp_path / "x.imgk")
