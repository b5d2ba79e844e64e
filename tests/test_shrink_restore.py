"""restore --shrink: an image restored onto a disk half its size. The multifs fixture (ext4, FAT32,
NTFS) captured, restored onto half the size without the appliance (the tools confined on the host,
shrink_host.py; the FAT rebuilt by mcopy drive to drive): each filesystem
passes its own fsck, every file's sha256 matches the fixture's sidecar, `sgdisk -v` finds the GPT
valid, GUIDs and names are kept. Plans without the appliance: --dry-run, the refusal without
--shrink saying --shrink would fit, a target too small even for the data (both sizes named), an XFS
partition that would have to shrink refused before anything is written."""
import hashlib
import json
import os
import subprocess

import pytest

from conftest import assert_one_line_error, run_imgkit

from imgkit.testing.fixtures import build_fixture, fixture_sidecar

MIB = 1 << 20


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def multifs_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("shrink")
    img = d / "multifs.imgk"
    run_imgkit("capture", build_fixture("multifs"), img, "--progress", "none", check=True)
    return d, img


def gpt_partitions(path):
    return json.loads(sh("sfdisk", "-J", path, check=True).stdout)["partitiontable"]["partitions"]


def extract(disk, start, size, dest):
    with open(disk, "rb") as f, open(dest, "wb") as out:
        f.seek(start)
        left = size
        while left:
            block = f.read(min(left, 4 * MIB))
            out.write(block)
            left -= len(block)


def files_of(fs, part_file, workdir, wanted):
    """sha256 of each wanted file, read by the filesystem's own userspace tools (no host mount)."""
    out = {}
    if fs == "ext4":
        dump = workdir / "ext4-tree"
        dump.mkdir()
        sh("debugfs", "-R", f"rdump / {dump}", part_file, check=True)
        root = dump
    elif fs == "vfat":
        root = workdir / "fat-tree"
        root.mkdir()
        sh("mcopy", "-s", "-n", "-i", part_file, "::/", root, check=True,
           env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    for path in wanted:
        if fs == "ntfs":
            data = subprocess.run(["ntfscat", "-f", str(part_file), path], capture_output=True, check=True).stdout
        else:
            with open(str(root) + path, "rb") as f:
                data = f.read()
        out[path] = hashlib.sha256(data).hexdigest()
    return out


def fsck(fs, part_file):
    if fs == "ext4":
        proc = sh("e2fsck", "-fn", part_file)
    elif fs == "vfat":
        proc = sh("fsck.fat", "-n", part_file)
    else:
        proc = sh("ntfsfix", "-n", part_file)
    assert proc.returncode == 0, (fs, proc.stdout, proc.stderr)


def test_shrink_multifs_to_half(multifs_image, tmp_path):
    d, img = multifs_image
    truth = fixture_sidecar("multifs")
    half = truth["disk_size"] // 2
    target = tmp_path / "half.raw"
    with open(target, "wb") as f:
        f.truncate(half)
    proc = run_imgkit("restore", img, target, "--yes", "--shrink", "--progress", "none", "--json", check=True)
    doc = json.loads(proc.stdout)
    assert os.path.getsize(target) == half
    assert all(p["shrinks"] for p in doc["shrink"]["plan"]["partitions"])
    assert doc["shrink"]["engine"] == "host"
    # peak extra disk: the overlay and the rebuilt FAT hold far less than the disk
    assert doc["shrink"]["overlay_bytes"] < truth["disk_size"] // 2
    verify = sh("sgdisk", "-v", target)
    assert "No problems found" in verify.stdout, verify.stdout
    parts = {int(p["node"][-1]): p for p in gpt_partitions(target)}
    for entry in truth["partitions"]:
        n, fs = entry["number"], entry["filesystem"]
        p = parts[n]
        assert p["uuid"].lower() == f"1b2c3d4e-0000-4000-8000-0000000000f{n}"
        assert p["name"] == entry["label"]
        assert p["size"] * 512 < entry["size"] and p["start"] % 2048 == 0
        part_file = tmp_path / f"p{n}.raw"
        extract(target, p["start"] * 512, p["size"] * 512, part_file)
        fsck(fs, part_file)
        wanted = {f["path"]: f["sha256"] for f in entry["files"] if f["type"] == "file"}
        assert wanted
        got = files_of(fs, part_file, tmp_path, wanted)
        assert got == wanted, fs


def test_dry_run_and_refusals_without_appliance(multifs_image, tmp_path):
    d, img = multifs_image
    target = tmp_path / "t.raw"
    with open(target, "wb") as f:
        f.truncate(40 * MIB)
    dry = run_imgkit("restore", img, target, "--dry-run", "--shrink", "--json", check=True)
    plan = json.loads(dry.stdout)["plan"]
    assert plan["fits"] and plan["shrink_plan"]["fits"]
    for p in plan["shrink_plan"]["partitions"]:
        assert p["new_start"] % MIB == 0 and p["new_size"] % MIB == 0 and p["minimum"] <= p["new_size"]
        assert p["new_start"] + p["new_size"] <= 40 * MIB - 33 * 512
    text = run_imgkit("restore", img, target, "--dry-run", "--shrink", check=True).stdout
    assert "partition 1 (ext4 'IMGK_EXT4'): 16.0 MiB at 1 MiB ->" in text and "minimum" in text
    before = target.read_bytes()
    # Without --shrink: refused as before, and the message says --shrink would fit.
    proc = run_imgkit("restore", img, target, "--yes", "--target-size", "40M")
    assert proc.returncode == 2  # --target-size needs --shrink
    small_dev_like = tmp_path / "small.raw"
    # a too-small target (even for the data): refused with both sizes, nothing written
    tiny = tmp_path / "tiny.raw"
    with open(tiny, "wb") as f:
        f.truncate(8 * MIB)
    proc = run_imgkit("restore", img, tiny, "--yes", "--shrink")
    assert_one_line_error(proc, proc.returncode, "8.0 MiB", "74.0 MiB", "--shrink would not fit")
    assert proc.returncode != 0 and tiny.read_bytes() == bytes(8 * MIB)
    assert target.read_bytes() == before
    assert not small_dev_like.exists()


def test_too_small_device_says_shrink_would_fit(multifs_image, tmp_path):
    from conftest import loop_device
    d, img = multifs_image
    backing = tmp_path / "dev.raw"
    with open(backing, "wb") as f:
        f.truncate(40 * MIB)
    with loop_device(backing) as dev:
        proc = run_imgkit("restore", img, dev, "--yes")
        assert_one_line_error(proc, proc.returncode, "smaller than the image", "--shrink would fit")
        dry = run_imgkit("restore", img, dev, "--dry-run")  # the real run's refusal and exit code (#12)
        assert dry.returncode == proc.returncode and "--shrink would fit" in dry.stdout


def test_xfs_that_must_shrink_is_refused_before_writing(tmp_path):
    disk = tmp_path / "xfs.raw"
    with open(disk, "wb") as f:
        f.truncate(400 * MIB)
    sh("sfdisk", disk, input="label: gpt\nstart=2048, size=65536, type=L\nstart=67584, size=655360, type=L\n",
       check=True)
    part = tmp_path / "p2.raw"
    with open(part, "wb") as f:
        f.truncate(320 * MIB)
    sh("mkfs.xfs", "-q", part, check=True)
    p1 = tmp_path / "p1.raw"
    with open(p1, "wb") as f:
        f.truncate(32 * MIB)
    sh("mkfs.ext4", "-q", p1, check=True)
    with open(disk, "r+b") as f:
        f.seek(1 * MIB)
        f.write(p1.read_bytes())
        f.seek(33 * MIB)
        f.write(part.read_bytes())
    img = tmp_path / "x.imgk"
    run_imgkit("capture", disk, img, "--progress", "none", check=True)
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(200 * MIB)
    proc = run_imgkit("restore", img, target, "--yes", "--shrink")
    assert_one_line_error(proc, proc.returncode, "partition 2 (xfs", "XFS cannot shrink", "320.0 MiB")
    assert target.read_bytes()[:1 * MIB] == bytes(MIB)
    dry = run_imgkit("restore", img, target, "--dry-run", "--shrink")  # the real run's exit code (#12)
    assert dry.returncode == proc.returncode and "keeps its size: XFS cannot shrink" in dry.stdout


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["linux-bios", "linux-uefi"])
def test_linux_fixture_grown_then_shrunk_to_half_boots(name, tmp_path):
    """The fixture restored onto twice its size with --grow (the root filesystem grows), captured,
    then restored onto a disk half that size with --shrink: it boots, GPT/MBR valid, root fsck clean."""
    from tests.bootcheck_helpers import boot_check_json
    src = build_fixture(name)
    size = os.path.getsize(src)
    grown = tmp_path / "grown.raw"
    sh("cp", "--sparse=always", src, grown, check=True)
    with open(grown, "r+b") as f:
        f.truncate(2 * size)
    from imgkit.operations.grow import fit_to_disk
    assert fit_to_disk(str(grown), size, grow=True).filesystem_grown
    img = tmp_path / "grown.imgk"
    run_imgkit("capture", grown, img, "--progress", "none", check=True)
    half = tmp_path / "half.raw"
    with open(half, "wb") as f:
        f.truncate(size)
    proc = run_imgkit("restore", img, half, "--yes", "--shrink", "--json", "--progress", "none", check=True)
    plan = json.loads(proc.stdout)["shrink"]["plan"]
    root = [p for p in plan["partitions"] if p["filesystem"] == "ext4"][0]
    assert root["shrinks"] and root["new_size"] < root["old_size"]
    if name == "linux-uefi":
        assert "No problems found" in sh("sgdisk", "-v", half).stdout
        esp = [p for p in plan["partitions"] if p["filesystem"] == "vfat"][0]
        assert not esp["shrinks"]  # the ESP keeps its size
    with open(src, "rb") as a, open(half, "rb") as b:
        assert a.read(440) == b.read(440)  # the MBR boot code is the fixture's
    part = tmp_path / "root.raw"
    extract(half, root["new_start"], root["new_size"], part)
    fsck("ext4", part)
    code, doc, err = boot_check_json(half, "--timeout", "240")
    assert code == 0, (doc, err)
    assert doc["matched"].startswith(f"IMGKIT-BOOT-OK {name} ")


def _tree(root, seed):
    import random
    rng = random.Random(seed)
    files = {"hello.txt": b"hello shrink\n", "data/random.bin": rng.randbytes(3 * MIB),
             "data/deep/er/small.txt": b"x" * 1000, "empty.txt": b""}
    for rel, data in files.items():
        full = root / rel
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_bytes(data)
    return {"/" + rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def test_mbr_logical_btrfs_fat_shrunk_to_half(tmp_path):
    """An MBR disk: ext4 primary, an extended partition holding a btrfs and a FAT16 logical. Shrunk
    onto half (btrfs stays >= 256 MiB, Linux's floor): the EBR chain is rewritten (sfdisk reads it back), the boot code and disk id kept,
    btrfs resized while mounted in the appliance, FAT rebuilt; fsck clean, every file's sha256."""
    disk = tmp_path / "mbr.raw"
    with open(disk, "wb") as f:
        f.truncate(800 * MIB)
    sh("sfdisk", "-q", disk, input="label: dos\nlabel-id: 0x12345678\nstart=2048, size=131072, type=83\n"
       "start=133120, type=5\nstart=135168, size=1048576, type=83\nstart=1185792, size=131072, type=e\n",
       check=True)
    with open(disk, "r+b") as f:  # recognisable boot code
        f.write(b"\xeb\x63IMGKIT-BOOTCODE" + bytes(440 - 17))
    layout = {1: ("ext4", 2048, 131072), 5: ("btrfs", 135168, 1048576), 6: ("vfat", 1185792, 131072)}
    truth = {}
    for n, (fs, start, count) in layout.items():
        root = tmp_path / f"tree{n}"
        root.mkdir()
        truth[n] = _tree(root, n)
        part = tmp_path / f"src{n}.raw"
        with open(part, "wb") as f:
            f.truncate(count * 512)
        if fs == "ext4":
            sh("mkfs.ext4", "-q", "-d", root, part, check=True)
        elif fs == "btrfs":
            sh("mkfs.btrfs", "-q", "-r", root, part, check=True)
        else:
            sh("mkfs.fat", "-F", "16", "-n", "IMGKFAT", part, check=True)
            sh("mcopy", "-s", "-i", part, *sorted(root.iterdir()), "::/", check=True,
               env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        with open(disk, "r+b") as f:
            f.seek(start * 512)
            f.write(part.read_bytes())
        part.unlink()
    img = tmp_path / "mbr.imgk"
    run_imgkit("capture", disk, img, "--progress", "none", check=True)
    half = tmp_path / "half.raw"
    with open(half, "wb") as f:
        f.truncate(400 * MIB)
    proc = run_imgkit("restore", img, half, "--yes", "--shrink", "--json", "--progress", "none", check=True)
    plan = {p["number"]: p for p in json.loads(proc.stdout)["shrink"]["plan"]["partitions"]}
    assert plan[5]["shrinks"] and plan[5]["minimum_exact"]
    assert json.loads(proc.stdout)["shrink"]["engine"] == "appliance"  # btrfs resizes only mounted
    dump = json.loads(sh("sfdisk", "-J", half, check=True).stdout)["partitiontable"]
    assert dump["id"] == "0x12345678"
    got = {int(p["node"][len(str(half)):]): p for p in dump["partitions"]}
    assert sorted(got) == [1, 2, 5, 6]
    with open(half, "rb") as f:
        assert f.read(17) == b"\xeb\x63IMGKIT-BOOTCODE"
    for n, (fs, _, _) in layout.items():
        p = got[n]
        assert p["start"] * 512 == plan[n]["new_start"] and p["size"] * 512 == plan[n]["new_size"]
        part = tmp_path / f"p{n}.raw"
        extract(half, p["start"] * 512, p["size"] * 512, part)
        if fs == "btrfs":
            check = sh("btrfs", "check", "--readonly", part)
            assert check.returncode == 0, check.stderr
            out = tmp_path / "btrfs-out"
            out.mkdir()
            sh("btrfs", "restore", part, out, check=True)
            hashes = {}
            for rel in truth[n]:
                with open(str(out) + rel, "rb") as f:
                    hashes[rel] = hashlib.sha256(f.read()).hexdigest()
        else:
            fsck(fs, part)
            hashes = files_of(fs, part, tmp_path / f"w{n}" if (tmp_path / f"w{n}").mkdir() is None else None,
                              truth[n])
        assert hashes == truth[n], fs
