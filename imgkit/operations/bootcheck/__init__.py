"""Boot an image in QEMU and say whether it came up: `imgkit boot-check`.

The image is never written and never copied whole:
- raw, ISO, qcow2, VHD, VHDX and VMDK files are opened by qemu read-only, with the format imgkit read
  from the header itself (foreign ones inspected and refused first, `backing: null` where the format
  can have a backing file), under a throwaway qcow2 overlay in a private temp directory;
- imgk images (plain, encrypted, split) are served by imgkit's own reader over NBD on a unix socket
  (imgkit/views/nbd_export.py) and the same overlay sits on top, so blocks stream from the image on demand.
QEMU runs with -nodefaults, no network, no host shares, a seccomp sandbox when available, -no-reboot,
a wall-clock timeout and resource limits. COM1 is read from a pipe; SeaBIOS's own log (port 0x402)
from a file; QMP tells when the guest powered off and takes the screenshot.

The verdict: pass when the serial console (or, for a BIOS guest, the VGA text screen, read from
guest memory once a second) matches `expect` before the timeout; otherwise a reason, one of
REASONS, with the last console lines.

The modules, in the order a check uses them:
    options.py       what the user asked (expect, firmware, limits, outputs), checked once
    plan.py          CD-ROM or disk, BIOS or UEFI, and where OVMF is
    qemu_cmdline.py  QEMU's argv and the disk's block graph (every node via formats/qemu_image.py)
    runner.py        one QEMU run as an object: start, watch, screenshot, stop, finish
    judge.py         the verdict from what the guest shows (pure: no QEMU, no clock)
    console.py       console text kept and cleaned, failure messages, the VGA text screen (pure)
    result.py        BootResult and the reasons
    check.py         boot_check(): open the image, plan, build its block node, run
"""
from .check import boot_check
from .options import DEFAULT_EXPECT, DEFAULT_MEMORY, DEFAULT_TIMEOUT, MAX_MEMORY, MIN_MEMORY, BootOptions
from .plan import BootPlan, find_ovmf, plan_boot
from .result import (BOOTLOADER_FAILED, GUEST_STOPPED, KERNEL_PANIC, NO_BOOTABLE_DEVICE, PASS, QEMU_FAILED,
                     REASONS, TIMEOUT, BootResult)

__all__ = ["boot_check", "BootResult", "BootPlan", "BootOptions", "plan_boot", "find_ovmf", "REASONS", "PASS",
           "NO_BOOTABLE_DEVICE", "KERNEL_PANIC", "TIMEOUT", "BOOTLOADER_FAILED", "GUEST_STOPPED", "QEMU_FAILED",
           "DEFAULT_EXPECT", "DEFAULT_TIMEOUT", "DEFAULT_MEMORY", "MIN_MEMORY", "MAX_MEMORY"]
