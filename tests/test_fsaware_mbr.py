"""An MBR disk (active FAT16, an extended partition with a logical ext4, NTFS last): logical
partitions are mapped, the active partition is guarded by the selection warning, and --grow grows
NTFS (ntfsresize) and FAT (fatresize) as the last partition."""
import json
import os

import pytest

import fsaware_disks as D
from conftest import loop_device, needs_root, run_imgkit

MiB = D.MiB
# number, start MiB, size MiB
P1, P5, P3 = (1, 1, 16), (5, 18, 24), (3, 49, 30)


@pytest.fixture(scope="module")
def mbr(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("fsaware-mbr"))
    disk = os.path.join(work, "mbr.img")
    D.stale_file(disk, 80 * MiB, 21)
    D.run("sfdisk", "-q", disk, input=b"label: dos\n1MiB,16MiB,6,*\n17MiB,31MiB,5\n49MiB,30MiB,7\n18MiB,24MiB,83\n")
    facts = {"fat": D.build_fat(os.path.join(work, "p1"), 16 * MiB, work, 16),
             "ext4": D.build_ext4(os.path.join(work, "p5"), 24 * MiB, work),
             "ntfs": D.build_ntfs(os.path.join(work, "p3"), 30 * MiB, work)}
    for (n, start, _), name in ((P1, "p1"), (P5, "p5"), (P3, "p3")):
        D.put(disk, start * MiB, os.path.join(work, name))
        os.unlink(os.path.join(work, name))
    img = os.path.join(work, "mbr.imgk")
    run_imgkit("capture", "--progress", "none", disk, img, check=True)
    return {"work": work, "disk": disk, "image": img, "facts": facts}


def test_logical_partition_mapped_and_restored(mbr):
    info = json.loads(run_imgkit("info", "--json", mbr["image"], check=True).stdout)
    parts = {p["number"]: p for p in info["partition_table"]["partitions"]}
    assert parts[5]["logical"] and parts[5]["capture_mode"] == "used-blocks (ext4)"
    assert parts[1]["capture_mode"] == "used-blocks (vfat)" and parts[3]["capture_mode"] == "used-blocks (ntfs)"
    assert os.path.getsize(mbr["image"]) < 20 * MiB
    out = os.path.join(mbr["work"], "restored.img")
    run_imgkit("restore", "--yes", "--progress", "none", mbr["image"], out, check=True)
    with open(out, "rb") as r, open(mbr["disk"], "rb") as s:
        assert r.read(MiB) == s.read(MiB)
        r.seek(17 * MiB), s.seek(17 * MiB)
        assert r.read(MiB) == s.read(MiB)  # the EBR and the gap before the logical partition
    p5 = D.extract(out, P5[1] * MiB, P5[2] * MiB, out + ".p5")
    assert D.run("e2fsck", "-fn", p5, check=False).returncode == 0
    for name, digest in mbr["facts"]["ext4"].items():
        assert D.sha(D.read_ext4_file(p5, name)) == digest
    p1 = D.extract(out, P1[1] * MiB, P1[2] * MiB, out + ".p1")
    assert D.run("fsck.fat", "-n", p1, check=False).returncode == 0
    for name, digest in mbr["facts"]["fat"].items():
        assert D.sha(D.read_fat_file(p1, name)) == digest
    for f in (out, p5, p1):
        os.unlink(f)


def test_selection_without_active_partition_warns(mbr):
    out = os.path.join(mbr["work"], "sel.imgk")
    proc = run_imgkit("capture", "--progress", "none", "--json", "--partitions", "5", mbr["disk"], out, check=True)
    warnings = json.loads(proc.stdout)["warnings"]
    assert len(warnings) == 1 and "partition 1 is the active (boot) MBR partition" in warnings[0]
    assert "active (boot) MBR partition" in proc.stderr
    proc = run_imgkit("restore", "--partition", "1", "--dry-run", out, os.path.join(mbr["work"], "x"))
    assert proc.returncode == 3 and "not captured" in proc.stderr
    os.unlink(out)


@needs_root
@pytest.mark.root
def test_grow_ntfs_last_partition(mbr):
    backing = os.path.join(mbr["work"], "bigger.img")
    with open(backing, "wb") as f:
        f.truncate(140 * MiB)
    with loop_device(backing) as dev:
        doc = json.loads(run_imgkit("restore", "--yes", "--json", "--progress", "none", "--grow", mbr["image"], dev,
                                    check=True).stdout)
    g = doc["grow"]
    assert not g["moved_gpt"] and g["grown_partition"] == 3 and g["filesystem"] == "ntfs" and g["filesystem_grown"]
    assert g["new_size"] == (140 - 49) * MiB
    part = D.extract(backing, 49 * MiB, g["new_size"], backing + ".p3")
    assert D.run("ntfsfix", "-n", part, check=False).returncode == 0
    vol = D.run("ntfsinfo", "-m", "-f", part).stdout.decode()
    size_line = next(line for line in vol.splitlines() if "Volume Size in Clusters" in line)
    assert int(size_line.split(":")[1]) * 4096 > 80 * MiB  # the filesystem fills the grown partition
    for name, digest in mbr["facts"]["ntfs"].items():
        assert D.sha(D.read_ntfs_file(part, name)) == digest
    os.unlink(backing), os.unlink(part)


@needs_root
@pytest.mark.root
def test_grow_fat32_last_partition(tmp_path):
    disk = str(tmp_path / "fat.img")
    with open(disk, "wb") as f:
        f.truncate(302 * MiB)
    D.run("sfdisk", "-q", disk, input=b"label: dos\n1MiB,300MiB,c\n")
    part = str(tmp_path / "p1")
    with open(part, "wb") as f:
        f.truncate(300 * MiB)
    D.run("mkfs.vfat", "-F", "32", "-n", "BIG", part)
    D.run("mcopy", "-i", part, "/etc/hostname", "::/hostname")
    D.put(disk, MiB, part)
    img = str(tmp_path / "fat.imgk")
    run_imgkit("capture", "--progress", "none", disk, img, check=True)
    backing = str(tmp_path / "bigger.img")
    with open(backing, "wb") as f:
        f.truncate(500 * MiB)
    with loop_device(backing) as dev:
        doc = json.loads(run_imgkit("restore", "--yes", "--json", "--progress", "none", "--grow", img, dev,
                                    check=True).stdout)
    assert doc["grow"]["filesystem"] == "vfat" and doc["grow"]["filesystem_grown"], doc["grow"]
    grown = D.extract(backing, MiB, doc["grow"]["new_size"], str(tmp_path / "grown"))
    assert D.run("fsck.fat", "-n", grown, check=False).returncode == 0
    total = D.run("fsck.fat", "-n", "-v", grown).stdout.decode()
    with open(grown, "rb") as f:
        boot = f.read(512)
    assert int.from_bytes(boot[32:36], "little") * 512 > 450 * MiB, total  # BPB total sectors
    assert D.read_fat_file(grown, "hostname") == open("/etc/hostname", "rb").read()
