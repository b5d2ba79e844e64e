"""The extent-map parser of the files view (imgkit/filesystems/ext_extents.py) and the reads made
through its maps (imgkit/views/guest_extents.py): real debugfs output of a test-made ext4 (the same
e2fsprogs 1.47 as the appliance's), then hostile text, which must send files back to the
appliance's pread, never to bytes outside the partition."""
from __future__ import annotations

import os
import subprocess

import pytest

from imgkit.filesystems.ext_extents import END_MARK, ExtFacts, eligibility, parse_maps
from imgkit.formats.sources import RawSource
from imgkit.views.caching_reader import CachingReader
from imgkit.views.guest_extents import GuestExtents
from imgkit.views.vfs import FilesUnavailable
from tests.conftest import needs_root
from tests.mount.disks import add_ext4_shapes, build_ext4

MiB = 1 << 20
FACTS = ExtFacts(block_size=4096, part_start=1 * MiB, part_size=64 * MiB)
HEADER = "Level Entries       Logical      Physical Length Flags"


def section(ino: int, *lines: str) -> str:
    return "\n".join([f"debugfs: ex -l <{ino}>", HEADER, *lines]) + "\n"


def leaf(l0, l1, p0, p1, n, flags="", level="0/ 0"):
    return f" {level}   1/  1 {l0:5d} - {l1:5d} {p0:5d} - {p1:5d} {n:6d} {flags}"


def out(*sections: str) -> str:
    return "debugfs 1.47.0 (5-Feb-2023)\n" + "".join(sections) + END_MARK


# -- parsing ---------------------------------------------------------------------------------
def test_good_output_holes_uninit_and_clipping():
    text = out(section(12, leaf(0, 1, 100, 101, 2), leaf(5, 5, 300, 300, 1, "Uninit"), leaf(7, 9, 400, 402, 3)))
    size = 8 * 4096 + 10  # 9 blocks: the last extent is clipped to block 8
    m = parse_maps(text, {12: size}, FACTS)[12]
    assert list(m.ext) == [0, 100, 2, 5, -1, 1, 7, 400, 2]
    assert m.pieces(0, size) == [(100 * 4096, 8192), (-1, 3 * 4096), (-1, 4096), (-1, 4096),
                                 (400 * 4096, 4096 + 10)]
    assert m.pieces(4090, 10) == [(100 * 4096 + 4090, 10)]  # one extent: one piece
    assert m.pieces(size, 5) == [] and m.pieces(size - 1, 100) == [(401 * 4096 + 9, 1)]
    packed = type(m).unpack(m.pack(), 4096)  # as the files view caches it
    assert (packed.size, list(packed.ext)) == (size, list(m.ext)) and packed.pieces(0, size) == m.pieces(0, size)
    assert len(parse_maps(out(section(13, leaf(0, 0, 100, 100, 1))), {13: 10}, FACTS)[13].pack()) == 32


def test_multi_level_leaves_and_several_inodes():
    text = out(section(20, leaf(0, 3, 50, 53, 4, level="1/ 1"), leaf(10, 10, 60, 60, 1, level="1/ 1")),
               section(21, leaf(0, 0, 70, 70, 1)), section(22))
    maps = parse_maps(text, {20: 11 * 4096, 21: 100, 22: 0, 23: 5}, FACTS)
    assert list(maps[20].ext) == [0, 50, 4, 10, 60, 1]
    assert list(maps[21].ext) == [0, 70, 1]
    assert list(maps[22].ext) == []  # an empty file: the header alone
    assert maps[23] is None  # never printed


@pytest.mark.parametrize("lines", [
    ["<12>: does not uses extent block maps"],  # ext3 block maps, inline data
    [HEADER, leaf(0, 1, 100, 101, 2), "ext2fs_extent_get: Corrupt extent header"],
    [HEADER, leaf(0, 1, 100, 101, 2, level="0/ 1")],  # an index node, not a leaf
    [HEADER, leaf(0, 1, 100, 102, 2)],  # lengths disagree
    [HEADER, leaf(0, 3, 100, 103, 4), leaf(2, 5, 200, 203, 4)],  # overlapping
    [HEADER, leaf(4, 5, 100, 101, 2), leaf(0, 1, 200, 201, 2)],  # unsorted
    [HEADER, leaf(0, 1, 16383, 16384, 2)],  # past the end of the 64 MiB partition
    [HEADER, leaf(0, 0, 0, 0, 1)],  # block 0 holds the superblock
    [HEADER, " 0/ 0   1/  1     0 - 99999999999999999999999 1 - 2 3"],  # garbage numbers
    [HEADER, leaf(0, 0, 100, 100, 1, "Weird")],
    [HEADER.replace("Flags", "Flagz"), leaf(0, 0, 100, 100, 1)],
    [],  # no header at all
])
def test_hostile_sections_fall_back(lines):
    text = out("\n".join(["debugfs: ex -l <12>", *lines]) + "\n")
    assert parse_maps(text, {12: 10 * 4096}, FACTS)[12] is None


def test_cut_repeated_and_huge_sections_fall_back():
    cut = "debugfs 1.47.0\n" + section(12, leaf(0, 0, 100, 100, 1)) + section(13, leaf(0, 0, 101, 101, 1))
    maps = parse_maps(cut.rstrip("\n"), {12: 10, 13: 10}, FACTS)  # no end mark: 13 may be cut short
    assert maps[12] is not None and maps[13] is None
    twice = out(section(12, leaf(0, 0, 100, 100, 1)), section(12, leaf(0, 0, 200, 200, 1)))
    assert parse_maps(twice, {12: 10}, FACTS)[12] is None
    many = out(section(12, *(leaf(i, i, 100 + 2 * i, 100 + 2 * i, 1) for i in range(50))))
    assert parse_maps(many, {12: 50 * 4096}, FACTS, max_extents=49)[12] is None
    assert len(parse_maps(many, {12: 50 * 4096}, FACTS, max_extents=50)[12].ext) == 150


TUNE = {"Filesystem magic number": "0xEF53", "Filesystem features": "has_journal ext_attr extent 64bit flex_bg",
        "Filesystem state": "clean", "Block size": "4096", "Block count": "16384"}


@pytest.mark.parametrize("change, why", [
    ({}, ""),
    ({"Filesystem features": "has_journal ext_attr"}, "no extents"),
    ({"Filesystem features": "has_journal extent needs_recovery"}, "needs_recovery"),
    ({"Filesystem features": "extent encrypt"}, "encrypt"),
    ({"Filesystem features": "extent orphan_file orphan_present"}, "orphan_present"),
    ({"First orphan inode": "77"}, "orphan"),
    ({"Filesystem state": "not clean"}, "not clean"),
    ({"Filesystem state": "clean with errors"}, "not clean"),
    ({"Block size": "3000"}, "block size"),
    ({"Block size": "131072"}, "block size"),
    ({"Block size": "x"}, "block size"),
    ({"Block count": "16385"}, "larger than its partition"),
    ({"Filesystem magic number": "0x4d44"}, "not an ext"),
])
def test_eligibility(change, why):
    facts, reason = eligibility({**TUNE, **change}, 1 * MiB, 64 * MiB, 1 * MiB, 64 * MiB)
    assert (facts is None) == bool(why) and why in reason
    if not why:
        assert facts == FACTS


def test_eligibility_needs_the_appliance_to_see_the_same_partition():
    assert eligibility(TUNE, 1 * MiB, 64 * MiB, 2 * MiB, 64 * MiB)[0] is None
    assert eligibility(TUNE, 1 * MiB, 64 * MiB, 1 * MiB, 63 * MiB)[0] is None
    assert eligibility("garbage", 1 * MiB, 64 * MiB, 1 * MiB, 64 * MiB)[0] is None


# -- reads through real maps ----------------------------------------------------------------
class HostDebugfs:
    """Stands in for the appliance (which is tested through the real mount in test_mount_files.py):
    the same debugfs and find commands, run here on a filesystem this test made itself."""

    def __init__(self, image: str, start: int, size: int, inodes: dict[int, int], tune: dict):
        self.image, self.start, self.size, self.inodes, self.tune = image, start, size, inodes, tune
        self.runs = []

    def ext_facts(self, fs):
        return {"tune2fs": self.tune, "start": self.start, "size": self.size}

    def ext_regular_files(self, fs):
        return ("".join(f"{i} {s}\n" for i, s in self.inodes.items()) + END_MARK).encode()

    def ext_extent_maps(self, fs, inodes):
        self.runs.append(list(inodes))
        cmds = "".join(f"ex -l <{i}>\n" for i in inodes)
        text = subprocess.run(["debugfs", "-c", "-f", "-", self.image], input=cmds, capture_output=True,
                              text=True).stdout
        return (text + END_MARK).encode()


@pytest.fixture(scope="module")
def made_ext4(tmp_path_factory):
    """A test-made ext4 with holes, unwritten extents, an extent tree and fragmented files, placed
    at 1 MiB of a disk file: (disk, partition image, {inode: (path, content as the kernel read it)}, tune2fs)."""
    tmp_path = tmp_path_factory.mktemp("ext4")
    part = str(tmp_path / "p.img")
    content = tmp_path / "c"
    content.mkdir()
    (content / "plain.txt").write_bytes(b"plain\n" * 1000)
    build_ext4(part, 24 * MiB, str(content))
    shapes = add_ext4_shapes(part, str(tmp_path / "mnt"))
    shapes["plain.txt"] = b"plain\n" * 1000
    inodes = {}
    for rel in shapes:
        stat = subprocess.run(["debugfs", "-c", "-R", f"stat /{rel}", part], capture_output=True, text=True).stdout
        inodes[int(stat.split("Inode: ")[1].split()[0])] = (rel, shapes[rel])
    disk = str(tmp_path / "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(26 * MiB)
        with open(part, "rb") as src:
            f.seek(MiB)
            f.write(src.read())
    lines = subprocess.run(["tune2fs", "-l", part], capture_output=True, text=True).stdout.splitlines()
    tune = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    return disk, part, inodes, tune


def _extents(made, **kw):
    disk, part, inodes, tune = made
    backend = HostDebugfs(part, MiB, 24 * MiB, {i: len(d) for i, (_, d) in inodes.items()}, tune)
    source = RawSource(disk)
    reader = CachingReader(source, 4 * MiB)
    return backend, source, reader, GuestExtents(reader, lambda: backend, {"p1": (MiB, 24 * MiB)}, **kw)


@needs_root
@pytest.mark.parametrize("max_map_bytes", [16 << 20, 6000])
def test_reads_through_real_debugfs_maps_match_the_kernel(made_ext4, max_map_bytes):
    """Every file read through its map equals what the kernel read, whole and in pieces that start
    and end inside holes and extents; with a map cache too small for two maps, files are mapped
    again as needed and the bound holds."""
    backend, source, reader, ext = _extents(made_ext4, max_map_bytes=max_map_bytes)
    try:
        for ino, (rel, data) in made_ext4[2].items():
            assert ext.read("p1", ino, len(data), 0, len(data) + 10) == data, rel
            for off in (1, 4095, 4097, len(data) // 2):
                assert ext.read("p1", ino, len(data), off, 70_000) == data[off:off + 70_000], (rel, off)
        assert ext.stats["fallback_reads"] == 0 and ext.stats["refused"] == 0
        if max_map_bytes > 1 << 20:
            assert len(backend.runs) == 1  # every file of the window in one debugfs run
        else:
            assert len(backend.runs) > 1 and ext._map_bytes <= max_map_bytes
        assert ext.read("p1", ino, len(data) + 1, 0, 10) is None  # a size the map was not made for
        assert ext.read("p2", ino, len(data), 0, 10) is None  # a filesystem it knows nothing of
    finally:
        ext.close()
        reader.close()
        source.close()


@needs_root
def test_concurrent_readers_share_one_debugfs_run(made_ext4):
    import concurrent.futures
    backend, source, reader, ext = _extents(made_ext4)
    files = list(made_ext4[2].items()) * 4
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda f: ext.read("p1", f[0], len(f[1][1]), 0, len(f[1][1])), files))
        assert got == [d for _, (_, d) in files]
        assert len(backend.runs) == 1
    finally:
        ext.close()
        reader.close()
        source.close()


class BrokenAppliance(HostDebugfs):
    """An appliance whose libguestfs has no working `debug` (other builds than Debian's)."""

    def __init__(self, *a, fail: str):
        super().__init__(*a)
        self.fail = fail

    def ext_facts(self, fs):
        if self.fail == "facts":
            return {"error": "no superblock facts from the appliance (debug: unknown command)"}
        return super().ext_facts(fs)

    def ext_regular_files(self, fs):
        if self.fail == "list":
            raise FilesUnavailable("files/p1: appliance shell: debug: unknown command")
        return super().ext_regular_files(fs)

    def ext_extent_maps(self, fs, inodes):
        self.runs.append(list(inodes))
        raise FilesUnavailable("files/p1: appliance shell: debug: unknown command")


@needs_root
@pytest.mark.parametrize("fail", ["facts", "list", "maps"])
def test_no_debug_in_the_appliance_means_pread(made_ext4, fail, caplog):
    """Without `debug` (or with it failing), every file is read through the appliance: read()
    answers None, the reason is logged once per filesystem, and nothing raises."""
    disk, part, inodes, tune = made_ext4
    backend = BrokenAppliance(part, MiB, 24 * MiB, {i: len(d) for i, (_, d) in inodes.items()}, tune, fail=fail)
    source = RawSource(disk)
    reader = CachingReader(source, 4 * MiB)
    ext = GuestExtents(reader, lambda: backend, {"p1": (MiB, 24 * MiB)})
    try:
        with caplog.at_level("INFO", logger="imgkit.files.extents"):
            for ino, (_, data) in list(inodes.items()) * 2:
                assert ext.read("p1", ino, len(data), 0, len(data)) is None
        assert "debug: unknown command" in caplog.text
        assert len(backend.runs) <= 1  # a failed run marks its files: never retried per read
    finally:
        ext.close()
        reader.close()
        source.close()


class CuttingAppliance(HostDebugfs):
    """An appliance whose output for more than one inode is cut at its message limit: no end mark,
    and no error (what `head -c` in the appliance does)."""

    def ext_extent_maps(self, fs, inodes):
        text = super().ext_extent_maps(fs, inodes)
        return text[:len(text) // 2] if len(inodes) > 1 else text


@needs_root
def test_a_cut_output_is_split_until_every_file_is_mapped(made_ext4, monkeypatch):
    import imgkit.views.guest_extents as guest_extents
    monkeypatch.setattr(guest_extents, "MIN_BATCH", 1)
    disk, part, inodes, tune = made_ext4
    backend = CuttingAppliance(part, MiB, 24 * MiB, {i: len(d) for i, (_, d) in inodes.items()}, tune)
    source = RawSource(disk)
    reader = CachingReader(source, 4 * MiB)
    ext = GuestExtents(reader, lambda: backend, {"p1": (MiB, 24 * MiB)})
    try:
        for ino, (rel, data) in inodes.items():
            assert ext.read("p1", ino, len(data), 0, len(data)) == data, rel
        assert ext.stats["refused"] == 0 and ext.stats["fallback_reads"] == 0
        assert len(backend.runs) > 1 and min(len(r) for r in backend.runs) == 1  # split down to single inodes
    finally:
        ext.close()
        reader.close()
        source.close()
