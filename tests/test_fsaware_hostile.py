"""Hostile or damaged filesystems: seeded byte flips in the metadata every parser reads. Each parser
either returns a map that lies inside the partition or refuses with NotUsable (the capture then keeps
the partition whole) — never another exception, never a huge allocation or a read past the end."""
import os
import random

import pytest

import fsaware_disks as D
from imgkit.filesystems import exfat, ext, fat, ntfs, swap
from imgkit.filesystems.usedmap import NotUsable
from imgkit.filesystems.fsaware import build_plan
from imgkit.stream import Stream

MiB = D.MiB


class BytesStream(Stream):
    """A filesystem image in memory that counts how far readers reach."""

    def __init__(self, data: bytes):
        self.data, self.size, self.max_end = data, len(data), 0

    def read(self, offset, length):
        assert offset >= 0 and length >= 0, (offset, length)
        self.max_end = max(self.max_end, offset + length)
        return bytes(self.data[offset:offset + length])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("hostile"))
    out = {}
    p = os.path.join(work, "ext4")
    D.build_ext4(p, 16 * MiB, work)
    out["ext4"] = (ext, open(p, "rb").read(), [(1024, 1024), (2048, 4096), (4096, 8192)])
    p = os.path.join(work, "fat16")
    D.build_fat(p, 16 * MiB, work, 16)
    out["fat16"] = (fat, open(p, "rb").read(), [(0, 512), (512, 64 * 1024)])
    p = os.path.join(work, "fat32")
    D.build_fat(p, 40 * MiB, work, 32)
    out["fat32"] = (fat, open(p, "rb").read(), [(0, 512), (512, 64 * 1024)])
    p = os.path.join(work, "ntfs")
    D.build_ntfs(p, 24 * MiB, work)
    data = open(p, "rb").read()
    mft = int.from_bytes(data[0x30:0x38], "little") * 4096
    out["ntfs"] = (ntfs, data, [(0, 512), (mft + 6 * 1024, 1024)])
    p = os.path.join(work, "exfat")
    D.stale_file(p, 16 * MiB, 5)
    D.run("mkfs.exfat", p)
    out["exfat"] = (exfat, open(p, "rb").read(), [(0, 512), (512 * 2048, 64 * 1024)])
    p = os.path.join(work, "swap")
    D.stale_file(p, 4 * MiB, 6)
    D.run("mkswap", p)
    out["swap"] = (swap, open(p, "rb").read(), [(0, 4096)])
    return out


@pytest.mark.parametrize("name", ["ext4", "fat16", "fat32", "ntfs", "exfat", "swap"])
def test_byte_flips_never_escape(images, name):
    module, data, areas = images[name]
    rng = random.Random(name)
    refused = accepted = 0
    buf = bytearray(data)  # flipped in place and restored after each trial (no 40 MiB copies)
    for trial in range(150):
        start, length = areas[trial % len(areas)]
        flips = []
        for _ in range(rng.randrange(1, 6)):
            pos = start + rng.randrange(min(length, len(buf) - start))
            flips.append((pos, buf[pos]))
            buf[pos] ^= 1 << rng.randrange(8) if trial % 2 else rng.randrange(1, 256)
        s = BytesStream(buf)
        try:
            u = module.used_blocks(s)
        except NotUsable:
            refused += 1
            continue
        finally:
            for pos, old in reversed(flips):
                buf[pos] = old
        accepted += 1
        assert 0 <= u.first_byte and u.end_byte <= s.size
        assert len(u.bitmap) == -(-u.block_count // 8)
        assert s.max_end <= s.size + 65536
    assert accepted + refused == 150


def test_all_0xff_and_all_zero_partitions(images):
    for module, data, _ in images.values():
        for fill in (b"\0", b"\xff"):
            s = BytesStream(fill * len(data))
            with pytest.raises(NotUsable):
                module.used_blocks(s)


def test_plan_survives_hostile_filesystem_headers(images):
    """A disk whose ext4 superblock claims a huge size: the plan keeps the partition whole."""
    _, data, _ = images["ext4"]
    buf = bytearray(data)
    buf[1024 + 4:1024 + 8] = (0xFFFFFFFF).to_bytes(4, "little")  # s_blocks_count
    plan = build_plan(BytesStream(bytes(buf)))
    assert not plan.plan.free_chunks and plan.plan.blank is None
    assert plan.plan.metadata["partition_table"]["capture_mode"].startswith("full: ext:")
