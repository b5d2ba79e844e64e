"""Builds the small GPT test disk of the mount tests (ext4 + FAT32 + NTFS, each holding known files)
with the real tools, without mounting anything: mkfs.ext4 -d, mcopy, ntfscp. Also used by
bench/bench_mount.py."""
from __future__ import annotations

import os
import subprocess

MiB = 1 << 20

# (relative path, content) put into every filesystem; ext4 also gets modes and a symlink.
def sample_files(seed: int = 7) -> dict[str, bytes]:
    import random
    rng = random.Random(seed)
    return {
        "hello.txt": b"hello from imgkit\n",
        "docs/readme.md": b"# readme\n" + b"line of text\n" * 500,
        "docs/deep/nested/data.bin": rng.randbytes(300_000),
        "big.bin": rng.randbytes(3 * MiB + 12345),
        "empty.txt": b"",
    }


def _run(*cmd, **kw):
    subprocess.run(cmd, check=True, capture_output=True, **kw)


def build_ext4(path: str, size: int, content_dir: str, label: str = "rootfs") -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", "-L", label, "-d", content_dir, "-E", "root_owner=0:0", path)


def build_fat(path: str, size: int, files: dict[str, bytes], tmp: str, label: str = "ESP") -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    _run("mkfs.vfat", "-F", "32", "-n", label, path)
    made = set()
    for rel, data in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                _run("mmd", "-i", path, "::" + d)
                made.add(d)
        src = os.path.join(tmp, "fat-src")
        with open(src, "wb") as f:
            f.write(data)
        _run("mcopy", "-i", path, src, "::" + rel)


def build_ntfs(path: str, size: int, files: dict[str, bytes], tmp: str, label: str = "WINDATA") -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    _run("mkntfs", "-F", "-Q", "-q", "-L", label, path)
    # ntfscp copies files only; directories are made with ntfs-3g's ntfsmkdir where present,
    # else the files go to the root with the path flattened.
    for rel, data in files.items():
        src = os.path.join(tmp, "ntfs-src")
        with open(src, "wb") as f:
            f.write(data)
        _run("ntfscp", "-f", "-q", path, src, rel.replace("/", "_"))


def ntfs_names(files: dict[str, bytes]) -> dict[str, bytes]:
    return {rel.replace("/", "_"): data for rel, data in files.items()}


def build_multifs_disk(workdir: str, files: dict[str, bytes] | None = None) -> dict:
    """A 64 MiB GPT disk: p1 ext4 'rootfs' (24 MiB), p2 FAT32 'ESP' (34 MiB... see layout), p3 NTFS.
    Returns {"disk": path, "files": files, "ext4_dir": dir, "partitions": {n: (start, size)}}."""
    files = files or sample_files()
    ext_dir = os.path.join(workdir, "ext4-content")
    for rel, data in files.items():
        p = os.path.join(ext_dir, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.symlink("hello.txt", os.path.join(ext_dir, "link-to-hello"))
    os.symlink("/etc/does-not-exist", os.path.join(ext_dir, "dangling"))
    os.chmod(os.path.join(ext_dir, "hello.txt"), 0o640)
    os.chmod(os.path.join(ext_dir, "docs"), 0o750)
    os.makedirs(os.path.join(ext_dir, "exec"), exist_ok=True)
    script = os.path.join(ext_dir, "exec", "run.sh")
    with open(script, "wb") as f:
        f.write(b"#!/bin/sh\necho hi\n")
    os.chmod(script, 0o755)
    os.chown(os.path.join(ext_dir, "docs", "readme.md"), 1234, 5678)
    os.utime(os.path.join(ext_dir, "hello.txt"), (1_600_000_000, 1_600_000_000))

    layout = {1: (1 * MiB, 24 * MiB), 2: (25 * MiB, 34 * MiB), 3: (59 * MiB, 16 * MiB)}
    disk = os.path.join(workdir, "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(76 * MiB)
    spec = "label: gpt\n" + \
        f"start={layout[1][0] // 512}, size={layout[1][1] // 512}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n" + \
        f"start={layout[2][0] // 512}, size={layout[2][1] // 512}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=efi\n" + \
        f"start={layout[3][0] // 512}, size={layout[3][1] // 512}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=data\n"
    _run("sfdisk", "-q", disk, input=spec.encode())
    builders = {1: lambda p, s: build_ext4(p, s, ext_dir),
                2: lambda p, s: build_fat(p, s, files, workdir),
                3: lambda p, s: build_ntfs(p, s, files, workdir)}
    for n, (start, size) in layout.items():
        part = os.path.join(workdir, f"p{n}.img")
        builders[n](part, size)
        _run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start // MiB}", "conv=notrunc,sparse",
             "status=none")
        os.unlink(part)
    return {"disk": disk, "files": files, "ext4_dir": ext_dir, "partitions": layout}
