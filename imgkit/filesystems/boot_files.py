"""Does a partition hold /boot? (kernel images or GRUB files at its root or in its /boot directory).

Used to warn when a partition selection leaves out what the disk needs to boot. Implemented for
ext2/3/4 by reading the root directory (and /boot) straight from the disk, bounded; for FAT the ESP
check covers it; other filesystems answer False (not detected, documented in docs/capture.md).
"""
from __future__ import annotations

import struct

from ..stream import Stream

MAX_DIR_BLOCKS = 64
BOOT_NAMES = (b"vmlinuz", b"grub", b"grub2", b"initrd.img")


def holds_boot_files(fs: str | None, part: Stream) -> bool:
    if fs not in ("ext2", "ext3", "ext4"):
        return False
    try:
        reader = _Ext(part)
        root = reader.list_dir(2)
        if _looks_like_boot(root):
            return True
        return "boot" in root and _looks_like_boot(reader.list_dir(root["boot"]))
    except (ValueError, struct.error, IndexError):
        return False  # a damaged filesystem is simply "not known to hold /boot"


def _looks_like_boot(names: dict) -> bool:
    return any(n.encode().startswith(b) for n in names for b in BOOT_NAMES)


class _Ext:
    def __init__(self, part: Stream):
        self.part = part
        sb = part.read(1024, 1024)
        if sb[0x38:0x3A] != b"\x53\xef":
            raise ValueError("no ext superblock")
        self.bs = 1024 << struct.unpack_from("<I", sb, 0x18)[0]
        self.ipg = struct.unpack_from("<I", sb, 0x28)[0]
        self.first = struct.unpack_from("<I", sb, 0x14)[0]
        self.inode_size = struct.unpack_from("<H", sb, 0x58)[0] or 128
        incompat = struct.unpack_from("<I", sb, 0x60)[0]
        self.desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if incompat & 0x80 else 32
        if self.bs > 65536 or not self.ipg or self.desc_size < 32:
            raise ValueError("bad ext superblock")

    def _block(self, n: int) -> bytes:
        if n * self.bs >= self.part.size:
            raise ValueError("block past the end")
        return self.part.read(n * self.bs, self.bs)

    def _inode(self, n: int) -> bytes:
        group, index = (n - 1) // self.ipg, (n - 1) % self.ipg
        gd_off = (self.first + 1) * self.bs + group * self.desc_size
        d = self.part.read(gd_off, self.desc_size)
        table = struct.unpack_from("<I", d, 8)[0] | (struct.unpack_from("<I", d, 0x28)[0] << 32
                                                     if self.desc_size >= 64 else 0)
        return self.part.read(table * self.bs + index * self.inode_size, 256)

    def _data_blocks(self, inode: bytes) -> list[int]:
        flags = struct.unpack_from("<I", inode, 0x20)[0]
        iblock = inode[0x28:0x28 + 60]
        if not flags & 0x80000:  # ext2/3 block map: the 12 direct blocks are enough for a root dir
            return [b for b in struct.unpack_from("<12I", iblock) if b]
        out: list[int] = []
        self._extents(iblock, out, 0)
        return out[:MAX_DIR_BLOCKS]

    def _extents(self, node: bytes, out: list[int], depth: int) -> None:
        magic, entries, _max, level = struct.unpack_from("<HHHH", node, 0)
        if magic != 0xF30A or depth > 5 or entries > 340:
            raise ValueError("bad extent header")
        for i in range(entries):
            e = node[12 + 12 * i:24 + 12 * i]
            if level == 0:
                _lblk, length, hi, lo = struct.unpack("<IHHI", e)
                out.extend(range((hi << 32) | lo, ((hi << 32) | lo) + min(length & 0x7FFF, MAX_DIR_BLOCKS)))
            else:
                _lblk, lo, hi = struct.unpack_from("<IIH", e)
                self._extents(self._block((hi << 32) | lo), out, depth + 1)
            if len(out) >= MAX_DIR_BLOCKS:
                return

    MAX_FILE = 64 << 10
    MAX_SYMLINKS = 8

    def read_file(self, path: str) -> bytes | None:
        """The first 64 KiB of a small regular file, following symlinks (bounded); None if absent."""
        ino = self._resolve(path, 0)
        if ino is None:
            return None
        inode = self._inode(ino)
        if struct.unpack_from("<H", inode, 0)[0] & 0xF000 != 0x8000:
            return None
        size = min(self._size(inode), self.MAX_FILE)
        data = b"".join(self._block(b) for b in self._data_blocks(inode)[:-(-size // self.bs)])
        return data[:size]

    @staticmethod
    def _size(inode: bytes) -> int:
        return struct.unpack_from("<I", inode, 0x4)[0] | (struct.unpack_from("<I", inode, 0x6C)[0] << 32)

    def _resolve(self, path: str, depth: int, base: list[str] | None = None) -> int | None:
        if depth > self.MAX_SYMLINKS:
            return None
        parts = (base or []) + [p for p in path.split("/") if p and p != "."] if not path.startswith("/") \
            else [p for p in path.split("/") if p and p != "."]
        ino, walked = 2, []
        for i, name in enumerate(parts):
            if name == "..":
                return self._resolve("/" + "/".join(walked[:-1] + parts[i + 1:]), depth + 1)
            child = self.list_dir(ino).get(name)
            if child is None:
                return None
            inode = self._inode(child)
            if struct.unpack_from("<H", inode, 0)[0] & 0xF000 == 0xA000:  # a symlink
                size = self._size(inode)
                flags = struct.unpack_from("<I", inode, 0x20)[0]
                if size >= 60 or flags & 0x80000:
                    return None  # slow symlinks are not followed (os-release links are short)
                target = inode[0x28:0x28 + size].decode("utf-8", "replace")
                rest = "/".join(parts[i + 1:])
                joined = target + ("/" + rest if rest else "")
                return self._resolve(joined, depth + 1, None if target.startswith("/") else walked)
            walked.append(name)
            ino = child
        return ino

    def list_dir(self, ino: int) -> dict[str, int]:
        inode = self._inode(ino)
        if struct.unpack_from("<H", inode, 0)[0] & 0xF000 != 0x4000:
            return {}
        names: dict[str, int] = {}
        for b in self._data_blocks(inode):
            block = self._block(b)
            pos = 0
            while pos + 8 <= len(block):
                child, rec_len, name_len = struct.unpack_from("<IHB", block, pos)
                if rec_len < 8 or pos + rec_len > len(block):
                    break
                if child and name_len:
                    names[block[pos + 8:pos + 8 + name_len].decode("utf-8", "replace")] = child
                pos += rec_len
        return names
