"""Builders of real test disks for the filesystem-aware tests: filesystems made by mkfs on files that
held random (stale) data first, filled through the filesystems' own user-space tools (mkfs.ext4 -d,
mtools, ntfscp, mkfs.btrfs --rootdir, mkfs.xfs -p), with part of the content deleted again, so free
space holds stale bytes as on a disk that has lived. Nothing is mounted."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess

MiB = 1 << 20
SEED = 3303


def run(*cmd, input=None, check=True, **kw):
    proc = subprocess.run([str(c) for c in cmd], input=input, capture_output=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: "
                             f"{proc.stderr[-2000:]!r} {proc.stdout[-2000:]!r}")
    return proc


def stale_file(path, size, seed):
    """A file of `size` bytes of random data: what a used disk's free space looks like."""
    rng = random.Random(seed)
    block = rng.randbytes(4 * MiB)
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            piece = (block[i % 13:] + block[:i % 13])[:left]  # shifted, so no two MiB are identical
            f.write(piece)
            left -= len(piece)
            i += 1


def make_content(root, files: int, seed: int, max_size: int = 2 * MiB) -> dict[str, str]:
    """Files of text and random bytes; returns name -> sha256."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for i in range(files):
        name = f"file{i:02d}.{'bin' if i % 3 == 0 else 'txt'}"
        n = rng.randrange(1000, max_size)
        data = rng.randbytes(n) if i % 3 == 0 else (f"line {i} of seed {seed} " * (n // 20 + 1)).encode()[:n]
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- one filesystem per builder: returns {path-in-fs: sha256} of what is left after deletions ---------

def build_ext4(path, size, work, seed=SEED, label="rootfs", with_boot=False):
    stale_file(path, size, seed)
    content = os.path.join(work, f"ext4-content-{seed}")
    files = make_content(content, 16, seed)
    if with_boot:
        os.makedirs(os.path.join(content, "boot", "grub"), exist_ok=True)
        with open(os.path.join(content, "boot", "vmlinuz-6.1.0-test"), "wb") as f:
            f.write(b"not really a kernel\n")
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-L", label, "-d", content, path)
    gone = sorted(files)[::4]  # delete every fourth file: its blocks become stale free space
    for name in gone:
        run("debugfs", "-w", "-R", f"rm /{name}", path)
        del files[name]
    return files


def build_fat(path, size, work, fat_bits, seed=SEED + 1, label="ESP"):
    stale_file(path, size, seed)
    run("mkfs.vfat", "-F", fat_bits, "-n", label, path)
    content = os.path.join(work, f"fat-content-{seed}")
    files = make_content(content, 10, seed, max_size=(size // 16))
    for name in sorted(files):
        run("mcopy", "-i", path, os.path.join(content, name), f"::/{name}")
    for name in sorted(files)[::3]:
        run("mdel", "-i", path, f"::/{name}")
        del files[name]
    return files


def build_ntfs(path, size, work, seed=SEED + 2):
    stale_file(path, size, seed)
    run("mkntfs", "-q", "-Q", "-F", "-L", "data", path)  # -Q: quick format, the stale bytes stay
    content = os.path.join(work, f"ntfs-content-{seed}")
    files = make_content(content, 8, seed, max_size=3 * MiB)
    for name in sorted(files):
        run("ntfscp", "-f", path, os.path.join(content, name), f"/{name}")
    return files


def read_ext4_file(fs_path, name) -> bytes:
    return run("debugfs", "-R", f"cat /{name}", fs_path).stdout


def read_fat_file(fs_path, name) -> bytes:
    return run("mcopy", "-n", "-i", fs_path, f"::/{name}", "-").stdout


def read_ntfs_file(fs_path, name) -> bytes:
    return run("ntfscat", "-f", fs_path, name).stdout


def extract(disk, start, size, out):
    with open(disk, "rb") as src, open(out, "wb") as dst:
        src.seek(start)
        left = size
        while left:
            chunk = src.read(min(left, 8 * MiB))
            if not chunk:
                break
            dst.write(chunk)
            left -= len(chunk)
    return out


def put(disk, start, part_file):
    with open(part_file, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(start)
        while True:
            chunk = src.read(8 * MiB)
            if not chunk:
                break
            dst.write(chunk)


# -- the whole GPT disk -------------------------------------------------------------------------------
# p1 BIOS boot (1 MiB, "GRUB core" bytes), p2 ESP FAT32 (40 MiB), p3 NTFS (40 MiB), p4 swap (8 MiB),
# p5 ext4 "root" (64 MiB, holds /boot) — the last partition, so --grow has something to grow.
LAYOUT = [  # number, start MiB, size MiB, sgdisk type, name
    (1, 1, 1, "ef02", "bios"),
    (2, 2, 40, "ef00", "EFI"),
    (3, 42, 40, "0700", "data"),
    (4, 82, 8, "8200", "swap"),
    (5, 90, 64, "8300", "root"),
]
DISK_MIB = 156


def build_gpt_disk(path, work) -> dict:
    stale_file(path, DISK_MIB * MiB, SEED + 10)
    args = []
    for n, start, size, t, name in LAYOUT:
        args += ["-n", f"{n}:{start * 2048}:{(start + size) * 2048 - 1}", "-t", f"{n}:{t}", "-c", f"{n}:{name}"]
    run("sgdisk", *args, path)
    rng = random.Random(SEED + 11)
    boot_code = rng.randbytes(440)
    gap = rng.randbytes(512 * 100)  # in the gap after the GPT arrays, where boot loaders embed code
    bios = rng.randbytes(MiB)
    with open(path, "r+b") as f:
        f.write(boot_code)
        f.seek(40 * 512)
        f.write(gap)
        f.seek(1 * MiB)
        f.write(bios)
    parts = {}
    esp = os.path.join(work, "p2.vfat")
    parts["esp"] = build_fat(esp, 40 * MiB, work, 32)
    put(path, 2 * MiB, esp)
    ntfs = os.path.join(work, "p3.ntfs")
    parts["ntfs"] = build_ntfs(ntfs, 40 * MiB, work)
    put(path, 42 * MiB, ntfs)
    swap = os.path.join(work, "p4.swap")
    stale_file(swap, 8 * MiB, SEED + 12)
    run("mkswap", "-q", swap)
    put(path, 82 * MiB, swap)
    root = os.path.join(work, "p5.ext4")
    parts["ext4"] = build_ext4(root, 64 * MiB, work, with_boot=True)
    put(path, 90 * MiB, root)
    for f in (esp, ntfs, swap, root):
        os.unlink(f)
    parts["boot_code"] = sha(boot_code)
    parts["gap"] = sha(gap)
    parts["bios"] = sha(bios)
    return parts
