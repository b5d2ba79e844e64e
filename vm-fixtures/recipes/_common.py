"""Helpers shared by the fixture recipes: running tools, partition tables, a cpio writer, and writing
filesystem images into a disk file. Nothing here mounts anything: every filesystem is populated by
its own userspace tool (mkfs.ext4 -d, mtools, ntfscp) and copied into place."""
from __future__ import annotations

import glob
import gzip
import io
import os
import re
import shutil
import stat
import struct
import subprocess

MIB = 1 << 20
SECTOR = 512
# Every Linux fixture prints this marker (and its own name) on ttyS0; the checker's default --expect
# matches it, so a fixture never needs a login prompt.
MARKER = "IMGKIT-BOOT-OK"

# Reproducible builds: fixed ids and timestamps wherever a tool accepts them.
SOURCE_DATE_EPOCH = 1700000000
FIXED_UUID = "1b2c3d4e-0000-4000-8000-000000000{:03d}"


def run(*cmd, cwd=None, env=None, input=None) -> str:
    full_env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH), LC_ALL="C")
    if env:
        full_env.update(env)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, input=input,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def need(*programs: str) -> None:
    missing = [p for p in programs if not shutil.which(p)]
    if missing:
        raise RuntimeError(f"missing programs for this fixture: {', '.join(missing)}")


def _version_key(path: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]


def debian_kernel() -> str:
    """The newest Debian kernel in /boot (IMGKIT_FIXTURE_KERNEL overrides)."""
    forced = os.environ.get("IMGKIT_FIXTURE_KERNEL")
    if forced:
        return forced
    kernels = sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key)
    if not kernels:
        raise RuntimeError("no kernel in /boot: install linux-image-amd64")
    return kernels[-1]


# -- initramfs ---------------------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/busybox sh
# imgkit fixture init: say which fixture booted, then power off (or panic when asked to).
/bin/busybox mkdir -p /proc /sys
/bin/busybox mount -t proc proc /proc
name=unknown
for w in $(/bin/busybox cat /proc/cmdline); do
  case "$w" in
    imgkit.fixture=*) name="${w#imgkit.fixture=}" ;;
    imgkit.panic) echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger ;;
  esac
done
echo "MARKER $name $(/bin/busybox uname -r)"
# A host that answers "imgkit-shell" within 2 s (imgkit run's tests, over the serial console) gets a
# shell with the disk drivers and ext4 loaded, to write files on the disk; otherwise it powers off as
# before, 2 s later (boot-check stops at the marker and does not wait for that).
if [ -f /lib/imgkit-modules/order ] && read -t 2 cmd && [ "$cmd" = "imgkit-shell" ]; then
  /bin/busybox --install -s /bin
  for m in $(cat /lib/imgkit-modules/order); do insmod "/lib/imgkit-modules/$m"; done
  mount -t devtmpfs dev /dev
  echo "IMGKIT-SHELL-READY"
  exec /bin/busybox sh
fi
/bin/busybox poweroff -f
""".replace("MARKER", MARKER)

# Modules for the disk (PIIX IDE -> sd) and ext4, in load order (Debian builds them as modules),
# put into the initramfs for the shell above. Soft dependencies (the crypto "generic" drivers that
# crc64-rocksoft, crc-t10dif and ext4's crc32c look up at load/mount time) are listed by hand.
SHELL_MODULES = [
    "drivers/scsi/scsi_common.ko", "drivers/scsi/scsi_mod.ko", "drivers/ata/libata.ko", "drivers/ata/ata_piix.ko",
    "lib/crc64.ko", "crypto/crc64_rocksoft_generic.ko", "lib/crc64-rocksoft.ko", "crypto/crct10dif_common.ko",
    "crypto/crct10dif_generic.ko", "lib/crc-t10dif.ko", "block/t10-pi.ko", "drivers/scsi/sd_mod.ko",
    "lib/crc16.ko", "fs/mbcache.ko", "fs/jbd2/jbd2.ko", "crypto/crc32c_generic.ko", "fs/ext4/ext4.ko",
]


def shell_modules_dir() -> str | None:
    """/lib/modules/RELEASE/kernel of the fixture kernel, if its modules are installed."""
    release = os.path.basename(debian_kernel()).removeprefix("vmlinuz-")
    d = os.path.join("/lib/modules", release, "kernel")
    return d if all(os.path.isfile(os.path.join(d, m)) for m in SHELL_MODULES) else None


class Cpio:
    """A newc cpio archive written in Python, so device nodes need no root and the bytes are
    reproducible (uid 0, fixed mtime)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, 1, SOURCE_DATE_EPOCH, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.ino += 1
        out = hdr.encode() + name_b
        out += b"\0" * (-len(out) % 4)
        out += data + b"\0" * (-len(data) % 4)
        self.buf.write(out)

    def dir(self, name):
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name, data: bytes, mode=0o644):
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target: str):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor, mode=0o600):
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def busybox_initramfs() -> bytes:
    """A gzip'd initramfs: static busybox and an /init that prints the marker and powers off."""
    busybox = "/bin/busybox"
    with open(busybox, "rb") as f:
        bb = f.read()
    if b"GLIBC_" in bb[:4096] or not bb.startswith(b"\x7fELF"):
        raise RuntimeError("/bin/busybox is not busybox-static")
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys"):
        c.dir(d)
    c.file("bin/busybox", bb, 0o755)
    c.symlink("bin/sh", "busybox")
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/ttyS0", 4, 64)
    c.file("init", INIT_SCRIPT.encode(), 0o755)
    mods = shell_modules_dir()
    if mods:
        for d in ("lib", "lib/imgkit-modules"):
            c.dir(d)
        for m in SHELL_MODULES:
            with open(os.path.join(mods, m), "rb") as f:
                c.file(f"lib/imgkit-modules/{os.path.basename(m)}", f.read())
        c.file("lib/imgkit-modules/order", ("\n".join(os.path.basename(m) for m in SHELL_MODULES) + "\n").encode())
    return gzip.compress(c.finish(), compresslevel=9, mtime=SOURCE_DATE_EPOCH)


def kernel_cmdline(fixture: str, extra: str = "") -> str:
    # panic=-1: a panic reboots at once, and the checker's -no-reboot turns that into an exit.
    return f"console=ttyS0,115200 panic=-1 imgkit.fixture={fixture} {extra}".strip()


# -- disks --------------------------------------------------------------------------------------------

def make_sparse(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def sfdisk(path: str, script: str) -> None:
    run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", path, input=script)


def copy_into(src: str, disk: str, offset: int) -> None:
    """Copy a filesystem image into the disk at `offset`, keeping holes (all-zero blocks skipped)."""
    block = MIB
    with open(src, "rb") as fi, open(disk, "r+b") as fo:
        pos = 0
        while True:
            data = fi.read(block)
            if not data:
                break
            if data.count(0) != len(data):
                fo.seek(offset + pos)
                fo.write(data)
            pos += len(data)


def write_at(disk: str, offset: int, data: bytes) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(data)


def mkfs_ext4(path: str, size: int, root_dir: str, label: str, uuid: str) -> None:
    make_sparse(path, size)
    # GRUB 2.06 reads ext4 but not every newer feature: keep to the ones it knows.
    run("mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid, "-E", f"hash_seed={uuid},root_owner=0:0",
        "-O", "^metadata_csum_seed,^orphan_file", "-d", root_dir, path,
        env={"E2FSPROGS_FAKE_TIME": str(SOURCE_DATE_EPOCH)})


def mkfs_fat(path: str, size: int, label: str, fat_bits: int = 16, volume_id: str = "1234ABCD") -> None:
    make_sparse(path, size)
    run("mkfs.fat", "-F", str(fat_bits), "-n", label, "-i", volume_id, path)


def mcopy_tree(image: str, src_dir: str) -> None:
    """Copy a directory tree into the root of a FAT image with mtools (no mount)."""
    for root, dirs, files in os.walk(src_dir):
        rel = os.path.relpath(root, src_dir)
        for d in sorted(dirs):
            target = "::/" + (d if rel == "." else f"{rel}/{d}")
            run("mmd", "-i", image, target)
        for name in sorted(files):
            target = "::/" + (name if rel == "." else f"{rel}/{name}")
            run("mcopy", "-i", image, "-m", os.path.join(root, name), target)
