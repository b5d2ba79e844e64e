"""Which accelerator QEMU (and the libguestfs appliance) should use: KVM when it really works, else TCG.

An existing /dev/kvm is not enough: on some hosts (nested virtualisation, these CI machines) it opens
but guests hang. So `auto` boots a 512-byte guest that writes one byte to the serial port and exits
through isa-debug-exit; if that does not happen within a few seconds, KVM is declared unusable.
IMGKIT_ACCEL=tcg|kvm|auto overrides (tcg skips the probe). The verdict is cached per boot.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

PROBE_TIMEOUT = 5.0
_verdict: str | None = None

# mov dx,0x3f8; mov al,'K'; out dx,al; mov al,0; out 0xf4,al; hlt; jmp $-1
_BOOT_CODE = bytes.fromhex("baf803" "b04b" "ee" "b000" "e6f4" "f4" "ebfd")


def _boot_sector() -> bytes:
    return _BOOT_CODE + bytes(510 - len(_BOOT_CODE)) + b"\x55\xaa"


def _cache_path() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    base = "/run/imgkit" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, f"accel-{boot}") if base else None


def kvm_works(timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot the tiny guest under KVM; True only if it printed its byte and exited in time."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return False
    with tempfile.NamedTemporaryFile(suffix=".img") as disk:
        disk.write(_boot_sector())
        disk.flush()
        try:
            proc = subprocess.run([qemu, "-accel", "kvm", "-display", "none", "-nodefaults", "-no-user-config",
                                   "-m", "16", "-serial", "stdio", "-monitor", "none",
                                   "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                                   "-drive", f"file={disk.name},format=raw,if=floppy,readonly=on",
                                   "-boot", "a"], capture_output=True, timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            return False
    return b"K" in proc.stdout


def choose_accel() -> str:
    """'kvm' or 'tcg'."""
    global _verdict
    wanted = os.environ.get("IMGKIT_ACCEL", "auto").lower()
    if wanted in ("tcg", "kvm"):
        return wanted
    if _verdict:
        return _verdict
    cache = _cache_path()
    if cache:
        try:
            with open(cache) as f:
                cached = f.read().strip()
            if cached in ("kvm", "tcg"):
                _verdict = cached
                return cached
        except OSError:
            pass
    _verdict = "kvm" if kvm_works() else "tcg"
    if cache:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "w") as f:
                f.write(_verdict)
        except OSError:
            pass
    return _verdict
