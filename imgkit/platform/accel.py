"""Which QEMU accelerator to boot with: KVM when it really works, else TCG.

/dev/kvm existing is not enough: on some hosts (nested virtualisation gone wrong, these CI machines)
a KVM guest hangs forever. So `auto` boots a one-sector guest under KVM that writes one byte to
COM1 and powers off, and gives it PROBE_SECONDS. Finishing is not enough either: on these machines
the probe finishes under KVM in 2.7 s (0.08 s under TCG) while a Linux guest hangs, so a probe slower
than FAST_SECONDS is timed again under TCG, and KVM is used only if it is not several times slower
(a loaded host slows both alike). The verdict is cached per host boot (boot_id) and kernel release in
~/.cache/imgkit/kvm-probe.json, so only the first check after a reboot pays for the probe.
IMGKIT_ACCEL=tcg|kvm overrides everything (CI sets tcg).
"""
from __future__ import annotations

import json
import os
import platform
import select
import subprocess
import tempfile
import time

from ..errors import EnvironmentProblem, InputError
from .qemu_tools import Limits, kill_group, popen
from .writeback import replace_small_file

PROBE_SECONDS = 3.0
FAST_SECONDS = 1.0  # a working KVM runs the probe in ~0.1 s, QEMU's own start included
SLOWER_THAN_TCG = 3.0  # a KVM probe this many times slower than the TCG one means a broken KVM
PROBE_VERSION = 2  # cached verdicts of an older probe rule are not trusted
PROBE_BYTE = b"K"
ACCELS = ("auto", "kvm", "tcg")

# Real-mode code: mov dx,0x3f8; mov al,'K'; out dx,al; mov dx,0x604; mov ax,0x2000; out dx,ax; hlt; jmp $-1
_PROBE_CODE = bytes.fromhex("BAF803B0") + PROBE_BYTE + bytes.fromhex("EEBA0406B80020EFF4EBFD")


def probe_disk() -> bytes:
    sector = bytearray(512)
    sector[:len(_PROBE_CODE)] = _PROBE_CODE
    sector[510:] = b"\x55\xaa"
    return bytes(sector)


def _cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "imgkit", "kvm-probe.json")


def _host_key() -> dict:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = None
    return {"boot_id": boot_id, "kernel": platform.release()}


def _cached_verdict() -> bool | None:
    try:
        with open(_cache_path()) as f:
            doc = json.load(f)
        if ({k: doc.get(k) for k in ("boot_id", "kernel")} == _host_key() and isinstance(doc.get("kvm_works"), bool)
                and doc.get("probe") == PROBE_VERSION):
            return doc["kvm_works"]
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _store_verdict(works: bool, seconds: float) -> None:
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        replace_small_file(path, json.dumps({**_host_key(), "probe": PROBE_VERSION, "kvm_works": works,
                                             "probe_seconds": round(seconds, 3), "checked": int(time.time())}))
    except OSError:
        pass  # a read-only home only costs a probe per check


def probe_argv(disk: str, accel_name: str) -> list[str]:
    """QEMU booting the probe sector `disk`. Its one block node is written out here rather than by
    formats/qemu_image.format_node, on purpose: platform/ is the bottom layer (formats build on
    platform.qemu_tools; nothing in platform imports upwards), and this node never sees an image:
    `disk` is the 512 bytes probe_disk() made, in probe_kvm's private temp directory. It is as
    explicit as format_node's (both drivers named, nothing probed); tests compare the two."""
    node = {"driver": "raw", "node-name": "d", "read-only": False,
            "file": {"driver": "file", "filename": os.path.abspath(disk), "read-only": False}}
    return ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-accel", accel_name, "-m", "16",
            "-display", "none", "-no-reboot", "-nic", "none", "-serial", "stdio",
            "-blockdev", json.dumps(node), "-device", "ide-hd,drive=d"]


def probe_kvm(timeout: float = PROBE_SECONDS, accel_name: str = "kvm") -> tuple[bool, float]:
    """Boot the one-sector guest under KVM; (works, seconds). Never waits longer than `timeout`."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imgkit-kvm-probe-") as tmp:
        disk = os.path.join(tmp, "probe.img")
        with open(disk, "wb") as f:
            f.write(probe_disk())
        proc = popen(probe_argv(disk, accel_name), Limits(int(timeout) + 5, 2 << 30, timeout),
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        got = b""
        try:
            deadline = started + timeout
            while PROBE_BYTE not in got:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready, _, _ = select.select([proc.stdout], [], [], left)
                if not ready:
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                got += chunk
        finally:
            kill_group(proc)  # SIGTERM, then SIGKILL: a hung KVM guest still dies
            proc.stdout.close()
    return PROBE_BYTE in got, time.monotonic() - started


# What QEMU prints (accel/kvm/kvm-all.c) when KVM fails it: at start (no module, no permission, busy)
# or on the first guest entry. Matched in lower case; anything else in a failed run is QEMU's own error.
KVM_FAILURES = ("could not access kvm", "failed to initialize kvm", "kvm run failed", "kvm: entry failed",
                "kvm internal error")


def kvm_failure(stderr_line: str | None) -> EnvironmentProblem | None:
    """The error to raise when QEMU's last stderr line says KVM failed (the host's fault: exit 4, with
    the way around it), else None. One rule for boot-check and run."""
    line = (stderr_line or "").strip()
    if any(s in line.lower() for s in KVM_FAILURES):
        return EnvironmentProblem(f"qemu: {line}", hint="use --accel tcg (or IMGKIT_ACCEL=tcg)")
    return None


def choose_accel(requested: str = "auto") -> tuple[str, str]:
    """(accel, why). `requested` is auto/kvm/tcg; IMGKIT_ACCEL overrides auto."""
    env = (os.environ.get("IMGKIT_ACCEL") or "").strip().lower()
    if env and env not in ACCELS:
        raise InputError(f"IMGKIT_ACCEL={env!r}: expected one of {', '.join(ACCELS)}")
    if requested == "auto" and env and env != "auto":
        requested, source = env, "IMGKIT_ACCEL"
    else:
        source = "--accel"
    if requested == "tcg":
        return "tcg", f"forced by {source}"
    if requested == "kvm":
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise EnvironmentProblem("--accel kvm: /dev/kvm is missing or not accessible",
                                     hint="load the kvm module, join the kvm group, or use --accel tcg")
        return "kvm", f"forced by {source}"
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm"
    cached = _cached_verdict()
    if cached is not None:
        return ("kvm", "KVM probe passed (cached for this boot)") if cached else \
               ("tcg", "KVM probe failed, or ran far slower than TCG, earlier this boot (cached): KVM is broken here")
    works, seconds = probe_kvm()
    tcg = probe_kvm(accel_name="tcg") if works and seconds > FAST_SECONDS else None
    accel_name, why = decide(works, seconds, tcg)
    _store_verdict(accel_name == "kvm", seconds)
    return accel_name, why


def decide(kvm_works: bool, kvm_seconds: float, tcg: tuple[bool, float] | None) -> tuple[str, str]:
    """The verdict from the KVM probe and, when that was slow, the same probe under TCG."""
    if not kvm_works:
        return "tcg", f"KVM probe guest did not run within {PROBE_SECONDS:.0f} s: using TCG"
    if kvm_seconds <= FAST_SECONDS or tcg is None:
        return "kvm", f"KVM probe passed in {kvm_seconds:.1f} s"
    tcg_works, tcg_seconds = tcg
    if tcg_works and kvm_seconds > SLOWER_THAN_TCG * max(tcg_seconds, 0.05):
        return "tcg", (f"KVM probe took {kvm_seconds:.1f} s, {kvm_seconds / max(tcg_seconds, 0.05):.0f}x "
                       f"the {tcg_seconds:.2f} s of TCG: KVM is broken here, using TCG")
    return "kvm", f"KVM probe passed in {kvm_seconds:.1f} s (TCG {tcg_seconds:.1f} s: a loaded host)"
