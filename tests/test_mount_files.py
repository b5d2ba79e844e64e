"""imgkit mount, the files view: files of the ext4, FAT and NTFS partitions read back identical,
with symlinks, modes, owners and times as in the image, through ONE libguestfs appliance shared by
the whole module (20-30 s to start under TCG). Files of the ext4 are read from the image through the
appliance's extent maps (holes, unwritten extents, fragmented files), those of an ext3 and of an
ext4 with a journal to replay through the appliance. Unmounting with the appliance running leaves
no mount and no appliance behind."""
from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.conftest import needs_root, run_imgkit
from tests.mount.helpers import built_disk, captured, mounted, mounted_here

pytestmark = [needs_root, pytest.mark.root, pytest.mark.fuse, pytest.mark.guestfs, pytest.mark.slow]


@pytest.fixture(scope="module")
def files_log(tmp_path_factory):
    return str(tmp_path_factory.mktemp("files-log") / "mount.log")


@pytest.fixture(scope="module")
def files_mount(tmp_path_factory, files_log):
    mp = str(tmp_path_factory.mktemp("files") / "m")
    with mounted(captured(), mp, "--log-file", files_log):
        yield os.path.join(mp, "files")
    assert not mounted_here(mp)
    # The daemon's summary at unmount: ext4 reads came from extent maps (the fast path was taken).
    summary = [line for line in _log(files_log) if "reads from extent maps" in line]
    assert summary and int(summary[-1].split("files view: ")[1].split()[0]) > 0, _log(files_log)
    # the appliance (a qemu started by the daemon's helper) is gone with the mount
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"{mp}/disk.raw" not in ps


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _log(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def test_lists_each_filesystem(files_mount):
    assert sorted(os.listdir(files_mount)) == ["p1", "p2", "p3", "p4", "p5"]


def test_ext4_shapes_read_from_extent_maps(files_mount, files_log):
    """Holes, unwritten extents, blocks past the end, a depth-1 extent tree, fragmented files and
    small ones: byte-for-byte what the kernel read when they were made, and read from the image
    (the daemon logs the filesystem as mapped and the debugfs runs that mapped these files)."""
    shapes = built_disk()["ext4_shapes"]
    root = os.path.join(files_mount, "p1")
    for rel, data in sorted(shapes.items()):
        assert os.path.getsize(os.path.join(root, rel)) == len(data), rel
        assert _read(os.path.join(root, rel)) == data, rel
    fd = os.open(os.path.join(root, "shapes/punched.bin"), os.O_RDONLY)
    try:  # reads that start and end inside holes and extents, past the end
        data = shapes["shapes/punched.bin"]
        for off, n in ((4095, 2), (4096 * 3 + 5, 9000), (len(data) - 10, 100), (len(data) + 1, 5)):
            assert os.pread(fd, n, off) == data[off:off + n]
    finally:
        os.close(fd)
    lines = _log(files_log)
    assert any("files/p1: files read from the image through extent maps (block size 1024" in x for x in lines), lines
    mapped = [x for x in lines if "files/p1: mapped" in x]
    assert mapped and sum(int(x.split("files/p1: mapped ")[1].split()[0]) for x in mapped) >= len(shapes), lines


def test_ext3_and_needs_recovery_read_through_the_appliance(files_mount, files_log):
    """ext3 files are block-mapped (no extents) and an ext4 with a journal to replay may differ on
    disk from what the appliance mounted: both stay on the appliance's pread, and read right."""
    files = built_disk()["files"]
    for part in ("p4", "p5"):
        for rel, data in files.items():
            assert _read(os.path.join(files_mount, part, rel)) == data, (part, rel)
    lines = _log(files_log)
    assert any("files/p4: files read through the appliance: no extents" in x for x in lines), lines
    assert any("files/p5: files read through the appliance: feature needs_recovery" in x for x in lines), lines
    assert not any("files/p4: mapped" in x or "files/p5: mapped" in x for x in lines)


def test_ext4_files_modes_owners_symlinks_times(files_mount):
    disk = built_disk()
    src_root, root = disk["ext4_dir"], os.path.join(files_mount, "p1")
    seen = set()
    for dirpath, dirnames, filenames in os.walk(src_root):
        rel_dir = os.path.relpath(dirpath, src_root)
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            src, got = os.path.join(src_root, rel), os.path.join(root, rel)
            s, g = os.lstat(src), os.lstat(got)
            assert stat.S_IFMT(s.st_mode) == stat.S_IFMT(g.st_mode), rel
            assert stat.S_IMODE(s.st_mode) == stat.S_IMODE(g.st_mode), rel
            assert (s.st_uid, s.st_gid) == (g.st_uid, g.st_gid), rel
            if stat.S_ISLNK(s.st_mode):
                assert os.readlink(got) == os.readlink(src), rel
            elif stat.S_ISREG(s.st_mode):
                assert g.st_size == s.st_size, rel
                assert _read(got) == _read(src), rel
                assert g.st_mtime_ns // 10**9 == s.st_mtime_ns // 10**9, rel
            seen.add(rel)
    assert {"hello.txt", "big.bin", "docs/deep/nested/data.bin", "link-to-hello", "exec/run.sh"} <= seen
    assert os.lstat(os.path.join(root, "hello.txt")).st_mtime == 1_600_000_000
    assert os.lstat(os.path.join(root, "docs/readme.md")).st_uid == 1234
    assert _read(os.path.join(root, "link-to-hello")) == disk["files"]["hello.txt"]  # followed by the host
    assert "lost+found" in os.listdir(root)


def test_fat_files(files_mount):
    root = os.path.join(files_mount, "p2")
    for rel, data in built_disk()["files"].items():
        assert _read(os.path.join(root, rel)) == data, rel


def test_ntfs_files(files_mount):
    from tests.mount.disks import ntfs_names
    root = os.path.join(files_mount, "p3")
    for name, data in ntfs_names(built_disk()["files"]).items():
        assert _read(os.path.join(root, name)) == data, name


def test_find_walks_everything_and_random_reads(files_mount):
    out = subprocess.run(["find", files_mount, "-type", "f"], capture_output=True, text=True, check=True).stdout
    found = {os.path.relpath(p, files_mount) for p in out.split()}
    assert "p1/docs/deep/nested/data.bin" in found and "p2/docs/deep/nested/data.bin" in found
    big = built_disk()["files"]["big.bin"]
    fd = os.open(os.path.join(files_mount, "p1", "big.bin"), os.O_RDONLY)
    try:
        for off, n in ((0, 10), (1 << 20, 4096), ((1 << 20) - 5, 10), (len(big) - 3, 100), (len(big), 10)):
            assert os.pread(fd, n, off) == big[off:off + n]
    finally:
        os.close(fd)


def test_no_writes_into_the_image(files_mount):
    with pytest.raises(OSError):
        open(os.path.join(files_mount, "p1", "hello.txt"), "ab")
    with pytest.raises(OSError):
        os.unlink(os.path.join(files_mount, "p1", "hello.txt"))
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(files_mount, "p1", "no-such-file"))
    with pytest.raises(NotADirectoryError):
        os.listdir(os.path.join(files_mount, "p1", "hello.txt"))


def test_iso_without_partition_table_is_files_disk(tmp_path):
    """A bare filesystem (here an ISO 9660 image) has no partitions: its files are under files/disk."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_bytes(b"iso hello\n")
    (src / "r.bin").write_bytes(os.urandom(200_000))
    iso = str(tmp_path / "t.iso")
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-R", "-V", "MYISO", "-o", iso, str(src)],
                   check=True, capture_output=True)
    mp = str(tmp_path / "m")
    with mounted(iso, mp):
        assert os.listdir(os.path.join(mp, "files")) == ["disk"]
        assert os.listdir(os.path.join(mp, "partitions")) == []
        assert _read(os.path.join(mp, "files", "disk", "sub", "a.txt")) == b"iso hello\n"
        assert _read(os.path.join(mp, "files", "disk", "r.bin")) == (src / "r.bin").read_bytes()


def test_xfs_and_btrfs_files(tmp_path):
    """XFS (Debian ships its libguestfs support apart: libguestfs-xfs) and btrfs partitions in the
    files view: every file reads back identical. One appliance for both."""
    import fsaware_disks as D
    MiB = 1 << 20
    files = D.make_content(str(tmp_path / "c"), 5, 21)
    xfs, btrfs = str(tmp_path / "p1.xfs"), str(tmp_path / "p2.btrfs")
    for path, size in ((xfs, 320 * MiB), (btrfs, 160 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    proto = tmp_path / "proto"
    proto.write_text("/dev/null\n0 0\nd--755 0 0\n" + "".join(
        f"{n} ---644 0 0 {tmp_path / 'c' / n}\n" for n in files) + "$\n$\n")
    D.run("mkfs.xfs", "-q", "-f", "-p", proto, xfs)
    D.run("mkfs.btrfs", "-q", "-f", "--rootdir", tmp_path / "c", btrfs)
    disk = str(tmp_path / "disk.img")
    with open(disk, "wb") as f:
        f.truncate(484 * MiB)
    D.run("sgdisk", "-n", "1:2048:+320M", "-t", "1:8300", "-n", "2:0:+160M", "-t", "2:8300", disk)
    D.put(disk, MiB, xfs)
    D.put(disk, 321 * MiB, btrfs)
    img = str(tmp_path / "disk.imgk")
    run_imgkit("capture", "--progress", "none", disk, img, check=True)
    mp = str(tmp_path / "m")
    with mounted(img, mp):
        for part in ("p1", "p2"):
            for name, digest in files.items():
                assert D.sha(_read(os.path.join(mp, "files", part, name))) == digest, (part, name)
