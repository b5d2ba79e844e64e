"""Partition restore (planned by the tool, to a file, a disk's matching partition, a loop partition
device), dry runs, refusals, and whole-disk restore to a larger disk with --grow, on real disks."""
import json
import os
import subprocess

import pytest

import fsaware_disks as D
from conftest import assert_one_line_error, loop_device, needs_root, run_imgkit

MiB = D.MiB


@pytest.fixture(scope="module")
def image(fsaware_gpt_disk, tmp_path_factory):
    """The shared GPT disk's filesystem-aware image (conftest.py); outputs go to this module's directory."""
    return {"work": str(tmp_path_factory.mktemp("fsaware-restore")), "disk": fsaware_gpt_disk["path"],
            "image": fsaware_gpt_disk["aware"], "facts": fsaware_gpt_disk["facts"]}


def check_root(path, facts):
    assert D.run("e2fsck", "-fn", path, check=False).returncode == 0
    for name, digest in facts["ext4"].items():
        assert D.sha(D.read_ext4_file(path, name)) == digest, name


def test_partition_to_new_file(image):
    out = os.path.join(image["work"], "root.ext4")
    proc = run_imgkit("restore", "--progress", "none", "--partition", "5", image["image"], out, check=True)
    assert "partition 5 of the image (ext4 'rootfs'" in proc.stderr and "new file" in proc.stderr
    assert os.path.getsize(out) == 64 * MiB
    check_root(out, image["facts"])
    os.unlink(out)


def test_dry_run_writes_nothing(image):
    target = os.path.join(image["work"], "dry-target.img")
    D.stale_file(target, D.DISK_MIB * MiB, 77)
    D.run("sgdisk", "-n", "1:2048:+20M", "-n", "5:0:+70M", target)
    before = D.sha(open(target, "rb").read())
    proc = run_imgkit("restore", "--partition", "5", "--dry-run", image["image"], target, check=True)
    assert "partition 5 of file" in proc.stdout and "plan:" in proc.stdout
    doc = json.loads(run_imgkit("restore", "--partition", "5", "--dry-run", "--json", image["image"], target,
                                check=True).stdout)
    assert doc["plan"]["to_partition"] == 5 and doc["plan"]["target_offset"] == 21 * MiB  # after 1 MiB + 20 MiB
    doc = json.loads(run_imgkit("restore", "--partition", "5", "--to-partition", "1", "--dry-run", "--json",
                                image["image"], target).stdout or "{}")
    assert doc == {}  # partition 1 (20 MiB) is too small: refused even in a dry run
    proc = run_imgkit("restore", "--dry-run", image["image"], target, check=True)
    assert "overwrite file" in proc.stdout and "keeps its size" in proc.stdout
    assert D.sha(open(target, "rb").read()) == before
    os.unlink(target)


def test_into_matching_partition_of_a_disk_file(image):
    target = os.path.join(image["work"], "other-disk.img")
    D.stale_file(target, 200 * MiB, 78)
    D.run("sgdisk", "-n", "1:2048:+20M", "-n", "5:0:+70M", target)
    p1_before = D.sha(open(D.extract(target, MiB, 20 * MiB, target + ".p1"), "rb").read())
    proc = run_imgkit("restore", "--yes", "--progress", "none", "--partition", "5", image["image"], target,
                      check=True)
    assert "partition 5" in proc.stdout
    start = 21 * MiB
    part = D.extract(target, start, 64 * MiB, target + ".p5")
    check_root(part, image["facts"])
    D.extract(target, MiB, 20 * MiB, target + ".p1")
    assert D.sha(open(target + ".p1", "rb").read()) == p1_before  # the neighbour is untouched
    for f in (target, target + ".p1", target + ".p5"):
        os.unlink(f)


def test_too_small_partition_refused_with_sizes(image):
    target = os.path.join(image["work"], "small-disk.img")
    D.stale_file(target, 64 * MiB, 79)
    D.run("sgdisk", "-n", "5:2048:+30M", target)
    before = D.sha(open(target, "rb").read())
    proc = run_imgkit("restore", "--yes", "--partition", "5", image["image"], target)
    assert_one_line_error(proc, 3, "30.0 MiB", "64.0 MiB", "31457280", "67108864")
    proc = run_imgkit("restore", "--yes", "--partition", "5", "--to-partition", "2", image["image"], target)
    assert_one_line_error(proc, 3, "no partition 2", "--to-partition")
    proc = run_imgkit("restore", "--yes", "--partition", "7", image["image"], target)
    assert_one_line_error(proc, 3, "no partition 7")
    assert D.sha(open(target, "rb").read()) == before
    os.unlink(target)


@needs_root
@pytest.mark.root
def test_to_loop_partition_device(image):
    backing = os.path.join(image["work"], "loop-backing.img")
    D.stale_file(backing, 100 * MiB, 80)
    with loop_device(backing, "-o", str(8 * MiB), "--sizelimit", str(70 * MiB)) as dev:
        proc = run_imgkit("restore", "--yes", "--progress", "none", "--partition", "5", image["image"], dev,
                          check=True)
        assert "partition 5" in proc.stdout
    part = D.extract(backing, 8 * MiB, 64 * MiB, backing + ".p")
    check_root(part, image["facts"])
    with loop_device(backing, "-o", str(8 * MiB), "--sizelimit", str(40 * MiB)) as dev:
        proc = run_imgkit("restore", "--yes", "--partition", "5", image["image"], dev)
        assert_one_line_error(proc, 3, "smaller than partition 5", "40.0 MiB")
    os.unlink(backing), os.unlink(backing + ".p")


@needs_root
@pytest.mark.root
def test_whole_disk_to_larger_disk_with_grow(image):
    backing = os.path.join(image["work"], "bigger.img")
    D.stale_file(backing, 256 * MiB, 81)
    with loop_device(backing) as dev:
        doc = json.loads(run_imgkit("restore", "--yes", "--json", "--progress", "none", "--grow", image["image"],
                                    dev, check=True).stdout)
        assert doc["grow"]["moved_gpt"] and doc["grow"]["grown_partition"] == 5
        assert doc["grow"]["filesystem"] == "ext4" and doc["grow"]["filesystem_grown"]
        verify = D.run("sgdisk", "-v", dev).stdout.decode()
        assert "No problems found" in verify, verify
    listing = D.run("sfdisk", "-J", backing).stdout
    parts = {p["node"][-1]: p for p in json.loads(listing)["partitiontable"]["partitions"]}
    assert parts["5"]["start"] == 90 * 2048 and parts["5"]["size"] > 160 * 2048
    assert parts["5"]["name"] == "root"
    part = D.extract(backing, 90 * MiB, parts["5"]["size"] * 512, backing + ".p5")
    check_root(part, image["facts"])
    blocks = D.run("dumpe2fs", "-h", part).stdout.decode()
    count = int(next(l for l in blocks.splitlines() if l.startswith("Block count:")).split()[-1])
    assert count * 4096 > 160 * MiB  # the filesystem fills the grown partition
    os.unlink(backing), os.unlink(part)


@needs_root
@pytest.mark.root
def test_whole_disk_to_larger_disk_without_grow_keeps_gpt_valid(image):
    backing = os.path.join(image["work"], "bigger2.img")
    with open(backing, "wb") as f:
        f.truncate(200 * MiB)
    with loop_device(backing) as dev:
        proc = run_imgkit("restore", "--yes", "--progress", "none", image["image"], dev, check=True)
        assert "backup GPT moved" in proc.stdout
        assert "No problems found" in D.run("sgdisk", "-v", dev).stdout.decode()
    parts = json.loads(D.run("sfdisk", "-J", backing).stdout)["partitiontable"]["partitions"]
    assert parts[-1]["size"] == 64 * 2048  # not grown
    os.unlink(backing)


def test_encrypted_fs_aware_capture_and_partition_restore(image):
    """Filesystem awareness and encryption together: blanked chunks are sealed like any other."""
    img = os.path.join(image["work"], "enc.imgk")
    env = {"IMGKIT_PASSWORD": "correct horse"}
    run_imgkit("capture", "--progress", "none", "--encrypt", "--partitions", "rootfs", image["disk"], img,
               env=env, check=True)
    out = os.path.join(image["work"], "enc-root.ext4")
    run_imgkit("restore", "--progress", "none", "--partition", "5", img, out, env=env, check=True)
    check_root(out, image["facts"])
    proc = run_imgkit("restore", "--partition", "5", img, out + "2", env={"IMGKIT_PASSWORD": "wrong"})
    assert proc.returncode == 3 and not os.path.exists(out + "2")
    os.unlink(out), os.unlink(img)


@needs_root
@pytest.mark.root
def test_mounted_read_write_source_kept_whole(tmp_path):
    """A test-made ext4 (never an image's filesystem) is mounted read-write to play a live disk: its
    bitmaps may change while read, so it is captured whole; mounted read-only, the map is used."""
    fs = str(tmp_path / "live.raw")
    D.build_ext4(fs, 24 * MiB, str(tmp_path))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    img = str(tmp_path / "live.imgk")
    with loop_device(fs) as dev:
        for opts, expect in (("rw", "full: mounted read-write on"), ("ro", "used-blocks (ext4)")):
            subprocess.run(["mount", "-o", opts, dev, str(mnt)], check=True)
            try:
                run_imgkit("capture", "--progress", "none", "--force", dev, img, check=True)
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
            table = json.loads(run_imgkit("info", "--json", img, check=True).stdout)["partition_table"]
            assert table["capture_mode"].startswith(expect), table["capture_mode"]


def _one_partition_disk(tmp_path, name: str, part_mib: int, mkfs: list[str]) -> str:
    """A GPT disk of one partition (1 MiB in, `part_mib` long) holding a fresh filesystem, captured."""
    disk = str(tmp_path / f"{name}-disk.img")
    with open(disk, "wb") as f:
        f.truncate((part_mib + 2) * MiB)
    D.run("sgdisk", "-n", f"1:2048:+{part_mib}M", "-t", "1:8300", disk)
    part = str(tmp_path / f"p1.{name}")
    with open(part, "wb") as f:
        f.truncate(part_mib * MiB)
    D.run(*mkfs, part)
    D.put(disk, MiB, part)
    img = str(tmp_path / f"{name}.imgk")
    run_imgkit("capture", "--progress", "none", disk, img, check=True)
    return img


def _restore_grown(tmp_path, img: str, disk_mib: int) -> tuple[dict, str]:
    backing = str(tmp_path / "bigger.img")
    with open(backing, "wb") as f:
        f.truncate(disk_mib * MiB)
    with loop_device(backing) as dev:
        doc = json.loads(run_imgkit("restore", "--yes", "--json", "--progress", "none", "--grow", img, dev,
                                    check=True).stdout)
    return doc["grow"], backing


@needs_root
@pytest.mark.root
@pytest.mark.guestfs
def test_grow_xfs_last_partition_inside_the_appliance(tmp_path):
    """XFS grows only while mounted: it is mounted and grown inside the libguestfs appliance (never by
    the host kernel); xfs_repair is clean and the filesystem fills the grown partition."""
    img = _one_partition_disk(tmp_path, "xfs", 320, ["mkfs.xfs", "-q", "-f"])
    grow, backing = _restore_grown(tmp_path, img, 480)
    assert grow["grown_partition"] == 1 and grow["filesystem"] == "xfs" and grow["filesystem_grown"], grow
    grown = D.extract(backing, MiB, grow["new_size"], str(tmp_path / "g.xfs"))
    assert D.run("xfs_repair", "-n", "-f", grown, check=False).returncode == 0
    dblocks = D.run("xfs_db", "-r", "-c", "sb 0", "-c", "p dblocks", "-c", "p blocksize", grown).stdout.decode().split()
    assert int(dblocks[2]) * int(dblocks[5]) > 440 * MiB  # was 320 MiB


@needs_root
@pytest.mark.root
@pytest.mark.guestfs
def test_grow_btrfs_last_partition_inside_the_appliance(tmp_path):
    img = _one_partition_disk(tmp_path, "btrfs", 200, ["mkfs.btrfs", "-q", "-f"])
    grow, backing = _restore_grown(tmp_path, img, 330)
    assert grow["filesystem"] == "btrfs" and grow["filesystem_grown"], grow
    grown = D.extract(backing, MiB, grow["new_size"], str(tmp_path / "g.btrfs"))
    assert D.run("btrfs", "check", "--readonly", grown, check=False).returncode == 0
    sb = D.run("btrfs", "inspect-internal", "dump-super", grown).stdout.decode()
    total = int(next(line.split()[1] for line in sb.splitlines() if line.startswith("total_bytes")))
    assert total > 300 * MiB  # was 200 MiB
