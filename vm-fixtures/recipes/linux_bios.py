#!/usr/bin/env python3
"""linux-bios: an MBR disk with one ext4 partition holding the Debian kernel and a busybox
initramfs, booted by GRUB i386-pc. GRUB is installed by hand, without grub-install or a mount:
boot.img's code goes into the MBR (keeping the partition table) and core.img into the gap before
the first partition. core.img's built-in blocklist already says "the rest of me starts at sector 2",
which is exactly where the gap puts it, so nothing needs patching."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MIB, FIXED_UUID, busybox_initramfs, copy_into, debian_kernel, kernel_cmdline,  # noqa: E402
                     make_sparse, mkfs_ext4, need, run, sfdisk, write_at)

NAME = "linux-bios"
DISK_SIZE = 48 * MIB
PART_START = 1 * MIB
GRUB_DIR = "/usr/lib/grub/i386-pc"
GRUB_MODULES = ["biosdisk", "part_msdos", "ext2", "linux", "boot", "serial", "terminal", "echo"]


def inputs() -> list[str]:
    return [debian_kernel(), "/bin/busybox", f"{GRUB_DIR}/boot.img", f"{GRUB_DIR}/kernel.img",
            f"{GRUB_DIR}/diskboot.img", f"{GRUB_DIR}/lzma_decompress.img"] + \
           [f"{GRUB_DIR}/{m}.mod" for m in GRUB_MODULES]


def grub_config(name: str, extra_cmdline: str = "") -> str:
    return (
        "serial --unit=0 --speed=115200\n"
        "terminal_output serial console\n"
        f"echo 'imgkit fixture {name}: GRUB loading the kernel'\n"
        f"linux (hd0,msdos1)/boot/vmlinuz {kernel_cmdline(name, extra_cmdline)}\n"
        "initrd (hd0,msdos1)/boot/initrd.gz\n"
        "boot\n"
    )


def build(out_dir: str, name: str = NAME, extra_cmdline: str = "") -> str:
    need("grub-mkimage", "mkfs.ext4", "sfdisk")
    path = os.path.join(out_dir, f"{name}.img")
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        root = os.path.join(work, "root")
        os.makedirs(os.path.join(root, "boot"))
        shutil.copyfile(debian_kernel(), os.path.join(root, "boot", "vmlinuz"))
        with open(os.path.join(root, "boot", "initrd.gz"), "wb") as f:
            f.write(busybox_initramfs())
        with open(os.path.join(root, "README"), "w") as f:
            f.write(f"imgkit boot fixture {name}\n")
        cfg = os.path.join(work, "embed.cfg")
        with open(cfg, "w") as f:
            f.write(grub_config(name, extra_cmdline))
        core = os.path.join(work, "core.img")
        run("grub-mkimage", "-O", "i386-pc", "-d", GRUB_DIR, "-o", core, "-c", cfg,
            "-p", "(hd0,msdos1)/boot/grub", *GRUB_MODULES)
        if os.path.getsize(core) > PART_START - 512:
            raise RuntimeError("GRUB core.img does not fit before the first partition")
        part = os.path.join(work, "root.ext4")
        mkfs_ext4(part, DISK_SIZE - PART_START, root, "IMGKROOT", FIXED_UUID.format(1))
        tmp = path + ".tmp"
        make_sparse(tmp, DISK_SIZE)
        sfdisk(tmp, f"label: dos\nlabel-id: 0x494d4701\nstart={PART_START // 512}, type=83, bootable\n")
        copy_into(part, tmp, PART_START)
        with open(f"{GRUB_DIR}/boot.img", "rb") as f:
            boot = f.read()
        write_at(tmp, 0, boot[:440])  # boot code only: disk id and partition table stay
        with open(core, "rb") as f:
            write_at(tmp, 512, f.read())
        os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "."))
