"""A small GPT disk with one ext4 partition that tests change through a loop mount (a filesystem the
test made itself), and what each state holds: the disk file and every file's sha256."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess

MiB = 1 << 20
DISK_SIZE = 40 * MiB
PART_START = 1 * MiB
PART_SIZE = 38 * MiB


def run(*cmd, **kw):
    return subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True, **kw)


def build_disk(path: str, size: int = DISK_SIZE) -> None:
    """GPT with one Linux partition at 1 MiB holding ext4 (4 KiB blocks, label 'inc')."""
    with open(path, "wb") as f:
        f.truncate(size)
    run("sgdisk", "-n", f"1:{PART_START // 512}:+{PART_SIZE // 1024}K", "-t", "1:8300", "-c", "1:root", path)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "inc", "-E", f"offset={PART_START}", path,
        f"{PART_SIZE // 1024}k")


class Mounted:
    """The disk's ext4, loop-mounted read-write at `where` (the test's own filesystem)."""

    def __init__(self, disk: str, where: str):
        self.disk, self.where = disk, where

    def __enter__(self) -> str:
        os.makedirs(self.where, exist_ok=True)
        run("mount", "-t", "ext4", "-o", f"loop,offset={PART_START},sizelimit={PART_SIZE}", self.disk, self.where)
        return self.where

    def __exit__(self, *exc):
        subprocess.run(["sync"], check=False)
        run("umount", self.where)


def write_file(root: str, name: str, size: int, seed: int, compressible: bool = False) -> None:
    rng = random.Random(seed)
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if compressible:
        line = f"line of file {name} seed {seed}\n".encode()
        data = (line * (size // len(line) + 1))[:size]
    else:
        data = rng.randbytes(size)
    with open(path, "wb") as f:
        f.write(data)


def file_hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "lost+found"]
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def snapshot(disk: str, dest: str) -> str:
    shutil.copyfile(disk, dest)
    return dest


def ext4_files(fs_file: str, work: str) -> dict[str, str]:
    """Every file's sha256 of an ext4 in a file, read with debugfs (never mounted: it was restored
    from an image)."""
    out_dir = os.path.join(work, "rdump-" + os.path.basename(fs_file))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    run("debugfs", "-R", f"rdump / {out_dir}", fs_file)
    return file_hashes(out_dir)


def fsck_clean(fs_file: str) -> subprocess.CompletedProcess:
    return subprocess.run(["e2fsck", "-fn", fs_file], capture_output=True, text=True)
