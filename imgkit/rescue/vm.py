"""Boot the rescue ISO in QEMU with extra disks and wait until it powers off: the tests' and the
benchmark's way to run a job in the real ISO (boot-check covers booting to the banner)."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

from ..platform.accel import choose_accel, kvm_failure
from ..operations.bootcheck.qemu_cmdline import blockdev, firmware_args
from ..errors import EnvironmentProblem
from ..platform.qemu_tools import Limits, find_program, kill_group, last_line, popen
from ..formats.qemu_image import file_protocol, format_node


@dataclass
class VmRun:
    powered_off: bool      # QEMU exited by itself (the guest powered off)
    seconds: float
    console: str           # everything the serial console printed
    accel: str


def vm_argv(qemu: str, iso: str, disks: list[str], work: str, log: str, *, firmware: str = "bios",
            memory_mib: int = 1024, cpus: int = 2, accel: str = "tcg", iso_media: str = "cdrom") -> list[str]:
    """QEMU's command line for run_iso. Every block node comes from formats/qemu_image.format_node
    (explicit drivers, nothing probed): the ISO read-only, the disks imgkit's tests made writable
    with flushes ignored (they are scratch files), UEFI's flash as boot-check sets it up."""
    argv = [qemu, "-nodefaults", "-no-user-config", "-accel", accel, "-m", f"{memory_mib}M",
            "-smp", str(cpus), "-display", "none", "-vga", "std", "-nic", "none", "-no-reboot",
            "-serial", f"file:{log}", "-monitor", "none"]
    if iso_media == "usb":
        argv += ["-device", "qemu-xhci,id=xhci", *blockdev(format_node(iso, "raw", node_name="stick",
                                                                       protocol=file_protocol(iso))),
                 "-device", "usb-storage,bus=xhci.0,drive=stick,bootindex=0"]
    else:
        argv += [*blockdev(format_node(iso, "raw", node_name="cd", protocol=file_protocol(iso))),
                 "-device", "ide-cd,drive=cd,bootindex=0"]
    argv += firmware_args(firmware, work)  # -machine pc, with OVMF's flash for UEFI
    for i, d in enumerate(disks):
        argv += [*blockdev(format_node(d, "raw", node_name=f"disk{i}", protocol=file_protocol(d), writable=True,
                                       flush=False)),
                 "-device", f"virtio-blk-pci,drive=disk{i}"]
    return argv


def run_iso(iso: str, disks: list[str], *, firmware: str = "bios", timeout: float = 600, memory_mib: int = 1024,
            cpus: int = 2, accel: str = "auto", append_console: str | None = None,
            iso_media: str = "cdrom") -> VmRun:
    """Boots `iso` with `disks` (raw files, read-write) as virtio disks vda, vdb... The ISO is a
    CD-ROM, or with iso_media="usb" a USB stick it was dd'ed to (the hybrid boot path).
    Returns when the guest powers off or `timeout` passes (then QEMU is killed)."""
    qemu = find_program("qemu-system-x86_64")
    accel_name, _ = choose_accel(accel)
    with tempfile.TemporaryDirectory(prefix="imgkit-rescue-vm-") as work:
        log = os.path.join(work, "console.log")
        argv = vm_argv(qemu, iso, disks, work, log, firmware=firmware, memory_mib=memory_mib, cpus=cpus,
                       accel=accel_name, iso_media=iso_media)
        # every vCPU thread may burn CPU for the whole wall-clock timeout (TCG)
        limits = Limits(cpu_seconds=int(timeout * cpus) + 60, address_space=(memory_mib << 20) + (4 << 30),
                        wall_seconds=timeout)
        stderr_path = os.path.join(work, "qemu.stderr")
        start = time.monotonic()
        # QEMU's stderr goes to a file, as boot-check's does: a pipe nobody reads until the end
        # would stop a chatty QEMU (warnings, a guest error loop) once 64 KiB of it filled up.
        with open(stderr_path, "wb") as stderr:
            proc = popen(argv, limits, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            proc.wait(timeout=timeout)
            powered_off = True
        except subprocess.TimeoutExpired:
            powered_off = False
        finally:
            kill_group(proc)  # also on Ctrl-C: QEMU is in its own session and would run on
        seconds = time.monotonic() - start
        try:
            with open(log, "rb") as f:
                console = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            console = ""  # QEMU failed before opening its serial file
        if append_console:
            with open(append_console, "w") as f:
                f.write(console)
        if proc.returncode not in (0, -9) and powered_off:
            line = last_line(stderr_path) or f"exit status {proc.returncode}"
            if problem := kvm_failure(line):
                raise problem
            raise EnvironmentProblem(f"qemu failed (exit {proc.returncode}): {line}")
        return VmRun(powered_off, seconds, console, accel_name)
