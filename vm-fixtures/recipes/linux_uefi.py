#!/usr/bin/env python3
"""linux-uefi: a GPT disk whose EFI system partition (FAT16, built with mtools) holds a standalone
GRUB EFI binary at the removable-media path \\EFI\\BOOT\\BOOTX64.EFI, the Debian kernel and the busybox
initramfs; a second partition holds an ext4 root. OVMF boots it with no NVRAM boot entries. The MBR
is only the protective one (no boot code), so `--firmware auto` must pick UEFI."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MIB, FIXED_UUID, busybox_initramfs, copy_into, debian_kernel, kernel_cmdline,  # noqa: E402
                     make_sparse, mcopy_tree, mkfs_ext4, mkfs_fat, need, run, sfdisk)

NAME = "linux-uefi"
ESP_START, ESP_SIZE = 1 * MIB, 32 * MIB
ROOT_START, ROOT_SIZE = ESP_START + ESP_SIZE, 8 * MIB
DISK_SIZE = ROOT_START + ROOT_SIZE + 1 * MIB  # room for the backup GPT
GRUB_DIR = "/usr/lib/grub/x86_64-efi"
GRUB_MODULES = ["part_gpt", "fat", "linux", "boot", "echo"]


def inputs() -> list[str]:
    return [debian_kernel(), "/bin/busybox", f"{GRUB_DIR}/kernel.img"] + \
           [f"{GRUB_DIR}/{m}.mod" for m in GRUB_MODULES]


def build(out_dir: str) -> str:
    need("grub-mkimage", "mkfs.fat", "mcopy", "mkfs.ext4", "sfdisk")
    path = os.path.join(out_dir, f"{NAME}.img")
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        esp_dir = os.path.join(work, "esp")
        os.makedirs(os.path.join(esp_dir, "EFI", "BOOT"))
        shutil.copyfile(debian_kernel(), os.path.join(esp_dir, "vmlinuz"))
        with open(os.path.join(esp_dir, "initrd.gz"), "wb") as f:
            f.write(busybox_initramfs())
        cfg = os.path.join(work, "embed.cfg")
        with open(cfg, "w") as f:
            # $root is the partition GRUB was loaded from (the ESP), so paths need no device. No
            # serial terminal here: OVMF already mirrors the EFI console to COM1.
            f.write(f"echo 'imgkit fixture {NAME}: GRUB loading the kernel'\n"
                    f"linux /vmlinuz {kernel_cmdline(NAME)}\n"
                    "initrd /initrd.gz\n"
                    "boot\n")
        run("grub-mkimage", "-O", "x86_64-efi", "-d", GRUB_DIR, "-c", cfg, "-p", "/EFI/BOOT",
            "-o", os.path.join(esp_dir, "EFI", "BOOT", "BOOTX64.EFI"), *GRUB_MODULES)
        esp = os.path.join(work, "esp.fat")
        mkfs_fat(esp, ESP_SIZE, "IMGKESP", 16, "1234E5F1")
        mcopy_tree(esp, esp_dir)
        root_dir = os.path.join(work, "root")
        os.makedirs(os.path.join(root_dir, "etc"))
        with open(os.path.join(root_dir, "etc", "hostname"), "w") as f:
            f.write("imgkit-uefi\n")
        root = os.path.join(work, "root.ext4")
        mkfs_ext4(root, ROOT_SIZE, root_dir, "IMGKROOT", FIXED_UUID.format(2))
        tmp = path + ".tmp"
        make_sparse(tmp, DISK_SIZE)
        sfdisk(tmp, "label: gpt\nlabel-id: 1B2C3D4E-0000-4000-8000-0000000000E0\n"
                    f"start={ESP_START // 512}, size={ESP_SIZE // 512}, type=U, name=\"EFI system\", "
                    "uuid=1B2C3D4E-0000-4000-8000-0000000000E1\n"
                    f"start={ROOT_START // 512}, size={ROOT_SIZE // 512}, type=L, name=root, "
                    "uuid=1B2C3D4E-0000-4000-8000-0000000000E2\n")
        copy_into(esp, tmp, ESP_START)
        copy_into(root, tmp, ROOT_START)
        os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "."))
