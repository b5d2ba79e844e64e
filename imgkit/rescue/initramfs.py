"""The rescue ISO's initramfs: static busybox, the few kernel modules that reach the boot medium, and
an /init that finds the ISO, stacks its two squashfs layers under a tmpfs overlay and switches root.

Why our own instead of live-boot + initramfs-tools: live-boot's initramfs is generated inside the
chroot by mkinitramfs (tens of seconds, udev, ~30 MB, timestamps to tame), and it carries features
we don't use (persistence, netboot, fromiso). Ours is ~2-4 MB, written here byte for byte (a newc
cpio with fixed owners and mtimes, so it is reproducible), and its whole logic is one short script
(files/init) that can be read in a minute. The medium is recognised by a build id, so a second
imgkit stick or an older ISO in the machine is never taken for this one."""
from __future__ import annotations

import gzip
import io
import os
import stat

# Modules loaded before looking for the medium: CD-ROM and disk paths of real machines and VMs
# (SATA/IDE, NVMe, USB sticks, SD cards, virtio), then the filesystems of the ISO. Everything else
# (network, HID, graphics) is loaded later by the rescue system's own coldplug, from the squashfs.
BOOT_MODULES = [
    "ata_piix", "ahci", "ata_generic", "pata_acpi", "sr_mod", "sd_mod", "cdrom",
    "nvme", "virtio_pci", "virtio_blk", "virtio_scsi",
    "xhci_pci", "xhci_plat_hcd", "ehci_pci", "ohci_pci", "uhci_hcd", "usb_storage", "uas",
    "sdhci_pci", "sdhci_acpi", "mmc_block", "vmw_pvscsi", "hv_storvsc",
    "loop", "isofs", "squashfs", "overlay",
]


class Cpio:
    """A newc archive with uid/gid 0 and one fixed mtime: the same inputs give the same bytes."""

    def __init__(self, mtime: int):
        self.buf, self.ino, self.mtime, self.seen = io.BytesIO(), 1, mtime, set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, 1, self.mtime, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.ino += 1
        out = hdr.encode() + name_b
        out += b"\0" * (-len(out) % 4)
        self.buf.write(out + data + b"\0" * (-len(data) % 4))

    def dirs(self, path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.seen:
                self.seen.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dirs(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dirs(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.dirs(os.path.dirname(name))
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def _parse_modules_dep(moddir: str) -> dict[str, list[str]]:
    """modules.dep as {relative path: [dependency paths]} (modules.dep is written by depmod)."""
    deps = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            mod, _, rest = line.partition(":")
            deps[mod.strip()] = rest.split()
    return deps


def module_closure(moddir: str, names: list[str]) -> list[str]:
    """The relative paths of `names` (the ones this kernel has as modules; built-ins are skipped)
    and of everything they depend on, sorted."""
    deps = _parse_modules_dep(moddir)
    by_name = {os.path.basename(p).split(".ko")[0].replace("-", "_"): p for p in deps}
    todo = [by_name[n] for n in names if n in by_name]
    seen: set[str] = set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(deps.get(p, []))
    return sorted(seen)


def build_initramfs(root: str, build_id: str, init_script: str, mtime: int) -> bytes:
    """The gzip'd initramfs for the kernel installed in the rootfs tree `root`."""
    kernels = sorted(os.listdir(os.path.join(root, "lib", "modules")))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in the rootfs, found {kernels}")
    release = kernels[0]
    moddir = os.path.join(root, "lib", "modules", release)
    c = Cpio(mtime)
    for d in ("dev", "proc", "sys", "run", "cdrom", "layers/system", "layers/imgkit", "overlay", "newroot"):
        c.dirs(d)
    with open(os.path.join(root, "bin", "busybox"), "rb") as f:
        busybox = f.read()
    c.file("bin/busybox", busybox, 0o755)
    c.symlink("bin/sh", "busybox")
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("init", init_script.encode(), 0o755)
    c.file("etc/imgkit-build-id", (build_id + "\n").encode())
    mods = module_closure(moddir, BOOT_MODULES)
    for rel in mods:
        with open(os.path.join(moddir, rel), "rb") as f:
            c.file(f"lib/modules/{release}/{rel}", f.read())
    # A modules.dep of just what is here: busybox modprobe loads dependencies from it.
    deps = _parse_modules_dep(moddir)
    dep_text = "".join(f"{m}: {' '.join(deps[m])}\n" for m in mods)
    c.file(f"lib/modules/{release}/modules.dep", dep_text.encode())
    c.file("etc/boot-modules", ("\n".join(BOOT_MODULES) + "\n").encode())
    return gzip.compress(c.finish(), compresslevel=9, mtime=mtime)
