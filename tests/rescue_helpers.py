"""Helpers of the rescue ISO tests and bench: the ISO from the cache, and IMGKIT job disks made with
mkfs.ext4 -d / mkfs.fat + mtools (no mount), read back with debugfs / mtools."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

MIB = 1 << 20


def rescue_iso() -> str:
    from imgkit.rescue.build import cached_rescue_iso
    return cached_rescue_iso(emit=lambda line: print(line, file=sys.stderr, flush=True))


def run(*cmd, **kw) -> str:
    kw.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, text=True, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stdout}{proc.stderr or ''}")
    return proc.stdout


def job_text(**keys) -> str:
    return "# written by the imgkit tests\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


def ext4_job_disk(path, files: dict[str, bytes], size: int = 256 * MIB) -> str:
    """A bare ext4 filesystem labelled IMGKIT (no partition table) holding `files`."""
    src = f"{path}.d"
    os.makedirs(src, exist_ok=True)
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(src, name)), exist_ok=True)
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-L", "IMGKIT", "-d", src, path)
    return str(path)


def ext4_read(disk, name: str, dest) -> str:
    run("debugfs", "-R", f"dump /{name} {dest}", disk)
    if not os.path.isfile(dest) or (os.path.getsize(dest) == 0 and name.endswith(".imgk")):
        raise AssertionError(f"{name} not on the IMGKIT ext4")
    return str(dest)


FAT_OFFSET = MIB


def fat_job_disk(path, files: dict[str, str], size: int = 256 * MIB) -> str:
    """An MBR disk (like a USB stick) whose first partition is FAT32 labelled IMGKIT, holding the
    files {name on the disk: host path}."""
    part = f"{path}.fat"
    with open(part, "wb") as f:
        f.truncate(size - FAT_OFFSET)
    run("mkfs.fat", "-F", "32", "-n", "IMGKIT", "-i", "1234ABCD", part)
    for name, host in files.items():
        run("mcopy", "-i", part, host, f"::/{name}")
    with open(path, "wb") as f:
        f.truncate(size)
    run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", path,
        input=f"label: dos\nstart={FAT_OFFSET // 512}, type=c\n")
    with open(part, "rb") as fi, open(path, "r+b") as fo:
        fo.seek(FAT_OFFSET)
        for block in iter(lambda: fi.read(4 * MIB), b""):
            if block.count(0) != len(block):
                fo.write(block)
            else:
                fo.seek(len(block), 1)
    os.unlink(part)
    return str(path)


def fat_read_text(disk, name: str) -> str:
    return run("mtype", "-i", f"{disk}@@{FAT_OFFSET}", f"::/{name}")


def fat_list(disk) -> str:
    return run("mdir", "-b", "-i", f"{disk}@@{FAT_OFFSET}", "::/")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def blank_disk(path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)
