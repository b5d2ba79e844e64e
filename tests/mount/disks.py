"""Builds the small GPT test disk of the mount tests (ext4 + FAT32 + NTFS, each holding known files,
and two more ext filesystems for the files view's fallback paths) with the real tools: mkfs.ext4 -d,
mcopy, ntfscp. Files of awkward shapes (holes, unwritten extents, many extents) are made in the
first ext4 through a loop mount of that test-made filesystem (fallocate has no offline tool)."""
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


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


def add_ext4_shapes(image: str, mountpoint: str) -> dict[str, bytes]:
    """Adds files of several shapes under shapes/ of an ext4 image (loop-mounted here: a test-made
    filesystem) and returns {path: content as the kernel reads it}:
    punched.bin (a hole every other 4 KiB: an extent tree of depth 1), prealloc.bin (fallocated:
    unwritten extents around written bytes), keep_size.bin (blocks allocated past its end),
    sparse.bin (mostly hole), a.bin/b.bin (written in turns with fsync: fragmented), small/*."""
    import random
    rng = random.Random(11)
    os.makedirs(mountpoint, exist_ok=True)
    _run("mount", "-o", "loop", image, mountpoint)
    try:
        d = os.path.join(mountpoint, "shapes")
        os.makedirs(os.path.join(d, "small"))
        with open(os.path.join(d, "punched.bin"), "wb") as f:
            f.write(rng.randbytes(MiB + 777))
            f.flush()
            for off in range(0, MiB, 8192):
                _fallocate(f.fileno(), 3, off, 4096)  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        with open(os.path.join(d, "prealloc.bin"), "wb") as f:
            _fallocate(f.fileno(), 0, 0, 2 * MiB)
            f.seek(500_000)
            f.write(rng.randbytes(10_000))
        with open(os.path.join(d, "keep_size.bin"), "wb") as f:
            f.write(rng.randbytes(5000))
            f.flush()
            _fallocate(f.fileno(), 1, 0, MiB)  # FALLOC_FL_KEEP_SIZE: blocks past the end
        with open(os.path.join(d, "sparse.bin"), "wb") as f:
            f.seek(3 * MiB)
            f.write(rng.randbytes(6000))
            f.seek(5 * MiB - 3)
            f.write(b"end")
        with open(os.path.join(d, "a.bin"), "wb") as fa, open(os.path.join(d, "b.bin"), "wb") as fb:
            for _ in range(32):
                for f in (fa, fb):
                    f.write(rng.randbytes(8192))
                    f.flush()
                    os.fsync(f.fileno())
        for i in range(40):
            with open(os.path.join(d, "small", f"{i:03d}.txt"), "wb") as f:
                f.write(rng.randbytes(rng.randrange(0, 9000)))
        os.sync()
        out = {}
        for dirpath, _, names in os.walk(d):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, mountpoint)] = f.read()
        return out
    finally:
        _run("umount", mountpoint)


def build_ext3(path: str, size: int, content_dir: str) -> None:
    """ext3: block-mapped files (no extents), read through the appliance."""
    with open(path, "wb") as f:
        f.truncate(size)
    _run("mkfs.ext3", "-q", "-F", "-L", "old", "-d", content_dir, "-E", "root_owner=0:0", path)


def build_ext4_needs_recovery(path: str, size: int, content_dir: str) -> None:
    """An ext4 whose superblock says its journal needs replaying (the flag set with debugfs over
    an empty journal): the disk's blocks are not to be trusted as the mount's, so its files are
    read through the appliance."""
    build_ext4(path, size, content_dir, label="dirty")
    _run("debugfs", "-w", "-R", "feature needs_recovery", path)


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


def _write_tree(root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)


def build_multifs_disk(workdir: str, files: dict[str, bytes] | None = None) -> dict:
    """A 92 MiB GPT disk: p1 ext4 'rootfs' (24 MiB; `files` and the shapes of add_ext4_shapes),
    p2 FAT32 'ESP', p3 NTFS, p4 ext3 'old', p5 ext4 'dirty' (needs_recovery): see layout. Returns
    {"disk": path, "files": files, "ext4_dir": dir, "ext4_shapes": {path: bytes}, "partitions":
    {n: (start, size)}}."""
    files = files or sample_files()
    ext_dir = os.path.join(workdir, "ext4-content")
    _write_tree(ext_dir, files)
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

    other_dir = os.path.join(workdir, "ext-other-content")
    _write_tree(other_dir, files)

    layout = {1: (1 * MiB, 24 * MiB), 2: (25 * MiB, 34 * MiB), 3: (59 * MiB, 16 * MiB),
              4: (75 * MiB, 8 * MiB), 5: (83 * MiB, 8 * MiB)}
    disk = os.path.join(workdir, "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(92 * MiB)
    spec = "label: gpt\n" + \
        f"start={layout[1][0] // 512}, size={layout[1][1] // 512}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n" + \
        f"start={layout[2][0] // 512}, size={layout[2][1] // 512}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=efi\n" + \
        f"start={layout[3][0] // 512}, size={layout[3][1] // 512}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=data\n" + \
        f"start={layout[4][0] // 512}, size={layout[4][1] // 512}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=old\n" + \
        f"start={layout[5][0] // 512}, size={layout[5][1] // 512}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=dirty\n"
    _run("sfdisk", "-q", disk, input=spec.encode())
    shapes: dict[str, bytes] = {}

    def ext4_with_shapes(p, s):
        build_ext4(p, s, ext_dir)
        shapes.update(add_ext4_shapes(p, os.path.join(workdir, "shapes-mnt")))

    builders = {1: ext4_with_shapes,
                2: lambda p, s: build_fat(p, s, files, workdir),
                3: lambda p, s: build_ntfs(p, s, files, workdir),
                4: lambda p, s: build_ext3(p, s, other_dir),
                5: lambda p, s: build_ext4_needs_recovery(p, s, other_dir)}
    for n, (start, size) in layout.items():
        part = os.path.join(workdir, f"p{n}.img")
        builders[n](part, size)
        _run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start // MiB}", "conv=notrunc,sparse",
             "status=none")
        os.unlink(part)
    return {"disk": disk, "files": files, "ext4_dir": ext_dir, "ext4_shapes": shapes, "partitions": layout}
