#!/usr/bin/env python3
"""iso: a hybrid El Torito ISO (ISOLINUX, no-emulation boot) with the Debian kernel and the busybox
initramfs, made by xorriso. The isohybrid MBR also makes it bootable as a disk, but the fixture's
manifest says it boots as a CD-ROM, which is what the checker does with an ISO."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import busybox_initramfs, debian_kernel, kernel_cmdline, need, run  # noqa: E402

NAME = "iso"
ISOLINUX = "/usr/lib/ISOLINUX/isolinux.bin"
HYBRID_MBR = "/usr/lib/ISOLINUX/isohdpfx.bin"
LDLINUX = "/usr/lib/syslinux/modules/bios/ldlinux.c32"


def inputs() -> list[str]:
    return [debian_kernel(), "/bin/busybox", ISOLINUX, HYBRID_MBR, LDLINUX]


def build(out_dir: str) -> str:
    need("xorriso")
    path = os.path.join(out_dir, f"{NAME}.iso")
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        root = os.path.join(work, "root")
        os.makedirs(os.path.join(root, "isolinux"))
        os.makedirs(os.path.join(root, "boot"))
        shutil.copyfile(ISOLINUX, os.path.join(root, "isolinux", "isolinux.bin"))
        shutil.copyfile(LDLINUX, os.path.join(root, "isolinux", "ldlinux.c32"))
        shutil.copyfile(debian_kernel(), os.path.join(root, "boot", "vmlinuz"))
        with open(os.path.join(root, "boot", "initrd.gz"), "wb") as f:
            f.write(busybox_initramfs())
        with open(os.path.join(root, "isolinux", "isolinux.cfg"), "w") as f:
            f.write("SERIAL 0 115200\nSAY imgkit fixture iso: ISOLINUX loading the kernel\n"
                    "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /boot/vmlinuz\n"
                    f"  APPEND initrd=/boot/initrd.gz {kernel_cmdline(NAME)}\n")
        tmp = path + ".tmp"
        run("xorriso", "-as", "mkisofs", "-quiet", "-o", tmp, "-V", "IMGKIT_FIXTURE", "-J", "-R",
            "-isohybrid-mbr", HYBRID_MBR, "-c", "isolinux/boot.cat", "-b", "isolinux/isolinux.bin",
            "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", root)
        os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "."))
