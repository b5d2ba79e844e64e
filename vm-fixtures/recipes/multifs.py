#!/usr/bin/env python3
"""multifs: a GPT disk with ext4, FAT32 and NTFS partitions holding known files, for the tests of
capture, mount, extract and convert. It does not boot. Next to the image, multifs.json lists every
partition and every file with its type, size, mode and sha256 (and symlink targets), so a test can
compare what it reads against the truth in one line.

ext4 gets the awkward cases: an executable, a 0600 file, a setuid file, a hard link, an empty
directory, relative/absolute/escaping/dangling symlinks. FAT32 gets a long file name and nested
directories. NTFS gets flat files (ntfscp cannot make directories)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MIB, FIXED_UUID, SOURCE_DATE_EPOCH, copy_into, make_sparse, mcopy_tree, mkfs_ext4, mkfs_fat,  # noqa: E402
                     need, run, sfdisk)

NAME = "multifs"
PARTS = [  # number, filesystem, start, size, GPT type, label
    (1, "ext4", 1 * MIB, 16 * MIB, "L", "IMGK_EXT4"),
    (2, "vfat", 17 * MIB, 40 * MIB, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "IMGK_FAT32"),
    (3, "ntfs", 57 * MIB, 16 * MIB, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "IMGK_NTFS"),
]
DISK_SIZE = 74 * MIB


def inputs() -> list[str]:
    return []


def common_files() -> dict[str, bytes]:
    rng = random.Random(7)
    return {
        "hello.txt": b"hello from the imgkit multifs fixture\n",
        "random.bin": rng.randbytes(256 * 1024),
        "text/lorem.txt": b"".join(b"line %05d lorem ipsum dolor sit amet\n" % i for i in range(4000)),
        "text/long name with spaces.txt": b"a long file name\n",
        "nested/a/b/c/deep.txt": b"deep\n",
    }


def write_tree(root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        full = os.path.join(root, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        os.chmod(full, 0o644)
        os.utime(full, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))


def describe_tree(root: str) -> list[dict]:
    """The manifest entries of a directory tree as the filesystem should hold it."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, root)
            st = os.lstat(full)
            entry = {"path": rel, "mode": f"{stat.S_IMODE(st.st_mode):04o}"}
            if stat.S_ISLNK(st.st_mode):
                entry.update(type="symlink", target=os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                entry.update(type="directory")
            else:
                with open(full, "rb") as f:
                    data = f.read()
                entry.update(type="file", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                             nlink=st.st_nlink)
            out.append(entry)
    return out


def build_ext4_tree(root: str) -> None:
    write_tree(root, common_files())
    os.makedirs(os.path.join(root, "bin"))
    with open(os.path.join(root, "bin", "run.sh"), "w") as f:
        f.write("#!/bin/sh\necho imgkit\n")
    os.chmod(os.path.join(root, "bin", "run.sh"), 0o755)
    with open(os.path.join(root, "private.key"), "w") as f:
        f.write("not really a key\n")
    os.chmod(os.path.join(root, "private.key"), 0o600)
    with open(os.path.join(root, "bin", "setuid-tool"), "w") as f:
        f.write("#!/bin/sh\n# setuid bit set on purpose: extractors must clear it\n")
    os.chmod(os.path.join(root, "bin", "setuid-tool"), 0o4755)
    os.link(os.path.join(root, "hello.txt"), os.path.join(root, "hello-hardlink.txt"))
    os.makedirs(os.path.join(root, "empty-dir"))
    links = {
        "link-to-hello": "hello.txt",            # relative, inside
        "text/link-up": "../hello.txt",           # relative, up but inside
        "link-absolute": "/etc/passwd",           # absolute: must not resolve on the host
        "link-escape": "../../../../etc/shadow",  # climbs out of the filesystem
        "link-dangling": "does-not-exist",
        "link-to-dir": "nested/a",
    }
    for name, target in links.items():
        os.symlink(target, os.path.join(root, name))


def build(out_dir: str) -> str:
    need("mkfs.ext4", "mkfs.fat", "mcopy", "mkntfs", "ntfscp", "sfdisk")
    path = os.path.join(out_dir, f"{NAME}.img")
    manifest = {"fixture": NAME, "disk_size": DISK_SIZE, "partition_table": "gpt", "partitions": []}
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        tmp = path + ".tmp"
        make_sparse(tmp, DISK_SIZE)
        script = "label: gpt\nlabel-id: 1B2C3D4E-0000-4000-8000-0000000000F0\n"
        for number, fs, start, size, ptype, label in PARTS:
            script += (f"start={start // 512}, size={size // 512}, type={ptype}, name={label}, "
                       f"uuid=1B2C3D4E-0000-4000-8000-0000000000F{number}\n")
        sfdisk(tmp, script)
        for number, fs, start, size, ptype, label in PARTS:
            tree = os.path.join(work, f"tree{number}")
            os.makedirs(tree)
            image = os.path.join(work, f"part{number}.{fs}")
            if fs == "ext4":
                build_ext4_tree(tree)
                mkfs_ext4(image, size, tree, label, FIXED_UUID.format(10 + number))
            elif fs == "vfat":
                write_tree(tree, common_files())
                make_sparse(image, size)
                run("mkfs.fat", "-F", "32", "-s", "1", "-n", label[:11], "-i", "1234FA32", image)
                mcopy_tree(image, tree)
            else:
                flat = {k.replace("/", "_"): v for k, v in common_files().items()}
                write_tree(tree, flat)
                make_sparse(image, size)
                run("mkntfs", "-F", "-q", "-Q", "-L", label, "-p", str(start // 512), "-H", "255",
                    "-S", "63", image)
                for name in sorted(flat):
                    run("ntfscp", "-f", "-q", image, os.path.join(tree, name), "/" + name)
            copy_into(image, tmp, start)
            files = describe_tree(tree)
            if fs != "ext4":  # FAT and NTFS keep no Unix modes or links: only names and bytes count
                for e in files:
                    e.pop("mode", None)
                    e.pop("nlink", None)
            manifest["partitions"].append({"number": number, "filesystem": fs, "label": label,
                                           "start": start, "size": size, "files": files})
        with open(os.path.join(out_dir, f"{NAME}.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "."))
