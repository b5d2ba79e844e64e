"""Builders for the convert tests: a small GPT disk with real filesystems, a sparse disk over 4 GiB,
a bootable hybrid ISO, and hashing/qemu-img helpers. Real tools only (sgdisk, mkfs.ext4 -d,
mkfs.vfat + mcopy, xorriso, qemu-img)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

from tests.conftest import pattern_bytes

MiB = 1 << 20


def sh(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, timeout=300, **kw)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(4 * MiB)
            if not block:
                return h.hexdigest()
            h.update(block)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def build_gpt_disk(workdir, name="gpt.raw") -> str:
    """64 MiB GPT disk: a 20 MiB FAT ESP at 1 MiB and a 40 MiB ext4 at 21 MiB, both with files."""
    disk = os.path.join(workdir, name)
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    sh("sgdisk", "-n1:2048:+20M", "-t1:ef00", "-c1:ESP", "-n2:43008:+40M", "-t2:8300", "-c2:root", disk)
    tree = os.path.join(workdir, "tree")
    os.makedirs(os.path.join(tree, "etc"), exist_ok=True)
    with open(os.path.join(tree, "etc", "hostname"), "w") as f:
        f.write("convert-test\n")
    with open(os.path.join(tree, "blob.bin"), "wb") as f:
        f.write(pattern_bytes(6 * MiB, seed=5))
    root = os.path.join(workdir, "root.ext4")
    sh("mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", tree, root, "40M")
    esp = os.path.join(workdir, "esp.vfat")
    sh("mkfs.vfat", "-n", "ESP", "-C", esp, str(20 * 1024))
    payload = os.path.join(workdir, "boot.bin")
    with open(payload, "wb") as f:
        f.write(pattern_bytes(3 * MiB, seed=6))
    sh("mcopy", "-i", esp, payload, "::/BOOT.BIN")
    for img, offset in ((esp, 2048 * 512), (root, 43008 * 512)):
        sh("dd", f"if={img}", f"of={disk}", "bs=1M", f"seek={offset}", "oflag=seek_bytes", "conv=notrunc,sparse")
        os.unlink(img)
    return disk


def build_sparse_disk(path, size=5 << 30) -> str:
    """A disk over 4 GiB holding a few MiB of data, some of it beyond 4 GiB (holes elsewhere)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, offset in enumerate((0, 1 << 30, (4 << 30) + 3 * MiB, size - 2 * MiB)):
            f.seek(offset)
            f.write(pattern_bytes(2 * MiB, seed=10 + i))
    return path


def build_iso(workdir, name="hybrid.iso") -> str:
    """A small bootable (El Torito, isolinux) hybrid ISO made by xorriso."""
    tree = os.path.join(workdir, "isotree")
    os.makedirs(os.path.join(tree, "isolinux"), exist_ok=True)
    for f in ("isolinux.bin", "ldlinux.c32"):
        src = "/usr/lib/ISOLINUX/isolinux.bin" if f == "isolinux.bin" else "/usr/lib/syslinux/modules/bios/ldlinux.c32"
        with open(src, "rb") as s, open(os.path.join(tree, "isolinux", f), "wb") as d:
            d.write(s.read())
    with open(os.path.join(tree, "data.bin"), "wb") as f:
        f.write(pattern_bytes(2 * MiB, seed=7))
    iso = os.path.join(workdir, name)
    sh("xorriso", "-as", "mkisofs", "-quiet", "-V", "IMGKIT_TEST", "-o", iso,
       "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4",
       "-boot-info-table", "-isohybrid-mbr", "/usr/lib/ISOLINUX/isohdpfx.bin", tree)
    return iso


def qemu_compare(a, fmt_a, b, fmt_b, strict=False) -> None:
    """qemu-img compare, explicit formats. Strict (-s) also fails on any difference in allocation,
    so it only makes sense between two images of the same format (a raw file is 'allocated'
    everywhere at the format level): we use it against qemu-img's own conversion of the same disk."""
    sh("qemu-img", "compare", *(["-s"] if strict else []), "-f", fmt_a, "-F", fmt_b, a, b)


def qemu_check(path, fmt) -> dict:
    out = subprocess.run(["qemu-img", "check", "--output=json", "-f", fmt, path], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, (path, out.stdout, out.stderr)
    return json.loads(out.stdout)


def _data_ranges(fd: int, size: int):
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        pos = end


def sparse_files_equal(a, b) -> bool:
    """Byte-for-byte equality of two sparse files without reading their holes: every data range of
    either file is compared with the same range of the other; outside them both read as zeros."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    size = os.path.getsize(a)
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        ranges = sorted(list(_data_ranges(fa, size)) + list(_data_ranges(fb, size)))
        for start, end in ranges:
            for off in range(start, end, 4 * MiB):
                n = min(4 * MiB, end - off)
                if os.pread(fa, n, off) != os.pread(fb, n, off):
                    return False
        return True
    finally:
        os.close(fa)
        os.close(fb)
