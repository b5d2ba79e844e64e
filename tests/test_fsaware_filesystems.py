"""Each filesystem's used-block map on real filesystems made over stale data: ext2/3/4 variants
(1 KiB blocks, no flex_bg, meta_bg, uninit_bg, sparse_super2, bigalloc), FAT12/16, exFAT, XFS, btrfs;
round trips through the CLI with the filesystem checkers; fallbacks to a full capture, with reasons."""
import json
import os

import pytest

import fsaware_disks as D
from conftest import needs_root, run_imgkit
from imgkit.filesystems import exfat, ext, fat
from imgkit.filesystems.usedmap import NotUsable
from imgkit.formats.sources import RawSource

MiB = D.MiB


def domain_used(tool, path, block_size, first_byte, count, work):
    dom = os.path.join(work, "domain")
    if os.path.exists(dom):
        os.unlink(dom)
    D.run(tool, "-D", "-q", "-s", path, "-o", dom, "-L", dom + ".log")
    used = set()
    for line in open(dom):
        f = line.split()
        if not line.startswith("#") and len(f) == 3 and f[2] == "+":
            pos, size = int(f[0], 16), int(f[1], 16)
            used.update(range(max(0, (pos - first_byte) // block_size),
                              min(count, -(-(pos + size - first_byte) // block_size))))
    return used


def ours(u):
    return {i for i in range(u.block_count) if u.bitmap[i // 8] >> (i % 8) & 1}


def roundtrip(path, work, name):
    """capture (fs-aware) -> info -> restore; returns (restored path, info, image size)."""
    img = os.path.join(work, f"{name}.imgk")
    out = os.path.join(work, f"{name}.restored")
    run_imgkit("capture", "--progress", "none", "--force", path, img, check=True)
    info = json.loads(run_imgkit("info", "--json", img, check=True).stdout)
    run_imgkit("restore", "--yes", "--progress", "none", img, out, check=True)
    return out, info["partition_table"], os.path.getsize(img)


@pytest.mark.parametrize("opts", [["-t", "ext2", "-b", "1024"], ["-t", "ext3"], ["-t", "ext4", "-O", "^flex_bg"],
                                  ["-t", "ext4", "-O", "meta_bg,^resize_inode"],
                                  ["-t", "ext4", "-O", "^metadata_csum,uninit_bg"],
                                  ["-t", "ext4", "-O", "sparse_super2"], ["-t", "ext4", "-b", "4096", "-O", "^64bit"]],
                         ids=lambda o: " ".join(o))
def test_ext_variants_match_partclone(tmp_path, opts):
    path = str(tmp_path / "e.img")
    D.stale_file(path, 48 * MiB, 11)
    content = D.make_content(str(tmp_path / "c"), 6, 11, max_size=MiB)
    D.run("mke2fs", "-q", "-F", "-E", "nodiscard", *opts, "-d", tmp_path / "c", path)
    with RawSource(path) as src:
        u = ext.used_blocks(src)
    theirs = domain_used("partclone.ext4", path, u.block_size, u.first_byte, u.block_count, str(tmp_path))
    assert ours(u) == theirs
    assert content


def test_ext4_bigalloc_roundtrip(tmp_path):
    """partclone cannot map bigalloc ("bitmap error"); our map counts what e2fsck counts."""
    path = str(tmp_path / "big.img")
    D.stale_file(path, 64 * MiB, 12)
    files = D.make_content(str(tmp_path / "c"), 6, 12, max_size=2 * MiB)
    D.run("mke2fs", "-q", "-F", "-E", "nodiscard", "-t", "ext4", "-O", "bigalloc", "-C", "16384",
          "-d", tmp_path / "c", path)
    D.run("debugfs", "-w", "-R", "rm /file01.txt", path)
    del files["file01.txt"]
    with RawSource(path) as src:
        u = ext.used_blocks(src)
    summary = D.run("e2fsck", "-fn", path).stdout.decode()
    used_blocks = int(summary.strip().splitlines()[-1].split(",")[-1].split("/")[0])
    assert u.used_count() * (u.block_size // 1024) == used_blocks
    out, table, size = roundtrip(path, str(tmp_path), "big")
    assert table["capture_mode"] == "used-blocks (ext4)"
    assert D.run("e2fsck", "-fn", out, check=False).returncode == 0
    for name, digest in files.items():
        assert D.sha(D.read_ext4_file(out, name)) == digest
    assert size < 16 * MiB


@pytest.mark.parametrize("bits,size_mib", [(12, 4), (16, 32)])
def test_fat12_fat16_superfloppy_roundtrip(tmp_path, bits, size_mib):
    path = str(tmp_path / f"fat{bits}.img")
    files = D.build_fat(path, size_mib * MiB, str(tmp_path), bits)
    with RawSource(path) as src:
        u = fat.used_blocks(src)
    checked = D.run("fsck.fat", "-n", path).stdout.decode()  # "..., 252/2036 clusters"
    assert u.used_count() == int(checked.strip().split()[-2].split("/")[0])
    if bits == 16:  # partclone's FAT12 map is wrong (it marks clusters fsck.fat calls free)
        assert ours(u) == domain_used("partclone.fat", path, u.block_size, u.first_byte, u.block_count,
                                      str(tmp_path))
    out, table, size = roundtrip(path, str(tmp_path), f"fat{bits}")
    assert table["capture_mode"] == "used-blocks (vfat)"
    assert D.run("fsck.fat", "-n", out, check=False).returncode == 0
    for name, digest in files.items():
        assert D.sha(D.read_fat_file(out, name)) == digest
    full = os.path.getsize(path)
    assert size < full / 2


def test_exfat_map_and_roundtrip(tmp_path):
    path = str(tmp_path / "exfat.img")
    D.stale_file(path, 64 * MiB, 13)
    D.run("mkfs.exfat", "-L", "EX", path)
    with RawSource(path) as src:
        u = exfat.used_blocks(src)
    theirs = domain_used("partclone.exfat", path, u.block_size, u.first_byte, u.block_count, str(tmp_path))
    assert theirs <= ours(u) and len(ours(u)) < u.block_count // 4
    out, table, size = roundtrip(path, str(tmp_path), "exfat")
    assert table["capture_mode"] == "used-blocks (exfat)"
    assert D.run("fsck.exfat", "-n", out, check=False).returncode == 0
    assert size < 2 * MiB


def used_blocks_identical(a, b, used):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for blk in sorted(used):
            fa.seek(blk * 4096), fb.seek(blk * 4096)
            assert fa.read(4096) == fb.read(4096), f"used block {blk} differs"


@needs_root
@pytest.mark.root
def test_xfs_roundtrip_via_partclone(tmp_path):
    path = str(tmp_path / "xfs.img")
    D.stale_file(path, 320 * MiB, 14)  # mkfs.xfs needs 300 MiB
    files = D.make_content(str(tmp_path / "c"), 6, 14)
    proto = tmp_path / "proto"
    proto.write_text("/dev/null\n0 0\nd--755 0 0\n" + "".join(
        f"{n} ---644 0 0 {tmp_path / 'c' / n}\n" for n in files) + "$\n$\n")
    D.run("mkfs.xfs", "-q", "-f", "-K", "-p", proto, path)
    out, table, size = roundtrip(path, str(tmp_path), "xfs")
    assert table["capture_mode"] == "used-blocks (xfs)"
    assert D.run("xfs_repair", "-n", "-f", out, check=False).returncode == 0
    used = domain_used("partclone.xfs", path, 4096, 0, (320 * MiB) // 4096, str(tmp_path))
    used_blocks_identical(path, out, used)  # so every file's bytes are identical too
    assert size < 16 * MiB


@needs_root
@pytest.mark.root
def test_btrfs_roundtrip_via_partclone(tmp_path):
    path = str(tmp_path / "btrfs.img")
    D.stale_file(path, 160 * MiB, 15)
    files = D.make_content(str(tmp_path / "c"), 6, 15)
    D.run("mkfs.btrfs", "-q", "-f", "-K", "--rootdir", tmp_path / "c", path)
    out, table, size = roundtrip(path, str(tmp_path), "btrfs")
    assert table["capture_mode"] == "used-blocks (btrfs)"
    assert D.run("btrfs", "check", "--readonly", out, check=False).returncode == 0
    dest = tmp_path / "files"
    dest.mkdir()
    D.run("btrfs", "restore", out, dest)  # reads files without mounting
    for name, digest in files.items():
        assert D.sha((dest / name).read_bytes()) == digest, name
    assert size < 24 * MiB


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage,reason", [
    ((1024 + 0x20, (7).to_bytes(4, "little")), "blocks per group"),  # s_blocks_per_group
    ((1024 + 0x60, None), "journal needs recovery"),  # INCOMPAT_RECOVER set
    ((1024 + 0x18, (9).to_bytes(4, "little")), "block size"),
])
def test_untrustworthy_ext_falls_back_to_full(tmp_path, damage, reason):
    path = str(tmp_path / "bad.img")
    D.build_ext4(path, 32 * MiB, str(tmp_path))
    offset, data = damage
    if data is None:
        with open(path, "rb") as f:
            f.seek(offset)
            data = (int.from_bytes(f.read(4), "little") | 0x4).to_bytes(4, "little")
    poke(path, offset, data)
    with RawSource(path) as src:
        with pytest.raises(NotUsable, match=reason):
            ext.used_blocks(src)
    out, table, size = roundtrip(path, str(tmp_path), "bad")
    assert table["capture_mode"].startswith("full: ext:") and reason in table["capture_mode"]
    assert table["used_bytes"] == 32 * MiB
    assert D.run("cmp", path, out, check=False).returncode == 0  # nothing skipped
    text = run_imgkit("info", str(tmp_path / "bad.imgk"), check=True).stdout
    assert reason in text


def test_unknown_partition_kept_whole(tmp_path):
    path = str(tmp_path / "disk.img")
    D.stale_file(path, 16 * MiB, 16)
    D.run("sgdisk", "-n", "1:2048:+8M", path)
    out, table, _ = roundtrip(path, str(tmp_path), "unknown")
    assert table["partitions"][0]["capture_mode"] == "full: no allocation map for an unknown filesystem"
    assert D.run("cmp", path, out, check=False).returncode == 0


def test_hostile_ntfs_bitmap_refused(tmp_path):
    path = str(tmp_path / "n.img")
    D.build_ntfs(path, 16 * MiB, str(tmp_path))
    from imgkit.filesystems import ntfs
    with RawSource(path) as src:
        good = ntfs.used_blocks(src)
        boot = src.read(0, 512)
    mft = int.from_bytes(boot[0x30:0x38], "little") * good.block_size
    poke(path, mft + 6 * 1024 + 510, b"\xAA\xBB")  # breaks the record's update-sequence check
    with RawSource(path) as src, pytest.raises(NotUsable, match="update sequence"):
        ntfs.used_blocks(src)
