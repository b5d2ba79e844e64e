"""Boot the rescue ISO in QEMU with extra disks and wait until it powers off: the tests' and the
benchmark's way to run a job in the real ISO (boot-check covers booting to the banner)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from ..platform.accel import choose_accel
from ..operations.bootcheck import find_ovmf
from ..errors import EnvironmentProblem


@dataclass
class VmRun:
    powered_off: bool      # QEMU exited by itself (the guest powered off)
    seconds: float
    console: str           # everything the serial console printed
    accel: str


def run_iso(iso: str, disks: list[str], *, firmware: str = "bios", timeout: float = 600, memory_mib: int = 1024,
            cpus: int = 2, accel: str = "auto", append_console: str | None = None,
            iso_media: str = "cdrom") -> VmRun:
    """Boots `iso` with `disks` (raw files, read-write) as virtio disks vda, vdb... The ISO is a
    CD-ROM, or with iso_media="usb" a USB stick it was dd'ed to (the hybrid boot path).
    Returns when the guest powers off or `timeout` passes (then QEMU is killed)."""
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise EnvironmentProblem("qemu-system-x86_64 not found", hint="apt-get install qemu-system-x86")
    accel_name, _ = choose_accel(accel)
    with tempfile.TemporaryDirectory(prefix="imgkit-rescue-vm-") as work:
        log = os.path.join(work, "console.log")
        argv = [qemu, "-nodefaults", "-no-user-config", "-accel", accel_name, "-m", f"{memory_mib}M",
                "-smp", str(cpus), "-display", "none", "-vga", "std", "-nic", "none", "-no-reboot",
                "-serial", f"file:{log}", "-monitor", "none"]
        if iso_media == "usb":
            argv += ["-device", "qemu-xhci,id=xhci",
                     "-drive", f"if=none,id=stick,file={iso},format=raw,readonly=on",
                     "-device", "usb-storage,bus=xhci.0,drive=stick,bootindex=0"]
        else:
            argv += ["-drive", f"if=none,id=cd,file={iso},format=raw,media=cdrom,readonly=on",
                     "-device", "ide-cd,drive=cd,bootindex=0"]
        machine = "pc"
        if firmware == "uefi":
            code, vars_template = find_ovmf()
            vars_copy = os.path.join(work, "vars.fd")
            shutil.copyfile(vars_template, vars_copy)
            argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={code}",
                     "-drive", f"if=pflash,format=raw,file={vars_copy}"]
        argv += ["-machine", machine]
        for d in disks:
            argv += ["-drive", f"file={d},format=raw,if=virtio,cache=unsafe"]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            powered_off = True
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            powered_off = False
        seconds = time.monotonic() - start
        with open(log, "rb") as f:
            console = f.read().decode("utf-8", "replace")
        if append_console:
            with open(append_console, "w") as f:
                f.write(console)
        if proc.returncode not in (0, -9) and powered_off:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise EnvironmentProblem(f"qemu failed (exit {proc.returncode}): {err.strip()[-500:]}")
        return VmRun(powered_off, seconds, console, accel_name)
