"""QEMU's command line for a boot check, and the pieces `imgkit run` shares: machine, accelerator,
firmware, serial console, firmware log, QMP, sandbox, and the disk's block graph.

Every block node comes from formats/qemu_image.py (format_node, filter_node): explicit drivers, the
image read-only, no backing file followed. The graph under the guest's disk:

    src     the image: a file (raw, ISO, or a foreign format through its inspected descriptor), or
            imgkit's NBD export of an imgk image ("streamed"); read-only
    disk    a throwaway qcow2 overlay in the private work directory, backing src: every guest write
    cor     copy-on-read over disk, streamed images only (see disk_args)
A CD-ROM that is not streamed sits on src directly (read-only media: nothing to write).

Building has side effects only inside the work directory: the overlay is created (qemu-img create)
and, for UEFI, the firmware's NVRAM template is copied there (the guest may write NVRAM; never to the
system copy)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

from ...formats.imgk_settings import DEFAULT_CHUNK_SIZE
from ...formats.qemu_image import create_overlay, file_protocol, filter_node, format_node
from .plan import BootPlan, find_ovmf

QCOW2_MAX_CLUSTER = 2 << 20
STREAM_CLUSTER = min(DEFAULT_CHUNK_SIZE, QCOW2_MAX_CLUSTER)  # overlay cluster for streamed images:
                                                            # one imgk chunk of the default size
TCG_TB_MIB = 256             # TCG translation cache; the 1 GiB default would count against RLIMIT_AS
SANDBOX = "on,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

_SANDBOX: dict[str, bool] = {}


def opt_path(path: str) -> str:
    """A path inside a qemu `key=value,...` option: commas are doubled."""
    return path.replace(",", ",,")


def qmp_socket(work: str) -> str:
    return os.path.join(work, "qmp.sock")


def firmware_log(work: str) -> str:
    """Where SeaBIOS's debug port (0x402) is written."""
    return os.path.join(work, "firmware.log")


def sandbox_supported(qemu: str) -> bool:
    if qemu not in _SANDBOX:
        try:
            out = subprocess.run([qemu, "-sandbox", "help"], capture_output=True, text=True, timeout=10)
            text = out.stdout + out.stderr
            _SANDBOX[qemu] = "seccomp support is disabled" not in text and "invalid option" not in text
        except (OSError, subprocess.TimeoutExpired):
            _SANDBOX[qemu] = False
    return _SANDBOX[qemu]


def blockdev(node: dict) -> list[str]:
    return ["-blockdev", json.dumps(node)]


def machine_args(qemu: str, name: str, accel: str, memory: int, cpus: int = 1) -> list[str]:
    """The program and the machine's size: no default devices, no user config files."""
    return [qemu, "-nodefaults", "-no-user-config", "-name", name,
            "-accel", f"tcg,tb-size={TCG_TB_MIB}" if accel == "tcg" else "kvm",
            "-m", f"{memory >> 20}M", "-smp", str(cpus), "-vga", "std"]


def qmp_args(work: str) -> list[str]:
    return ["-chardev", f"socket,id=qmp,path={opt_path(qmp_socket(work))},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control"]


def firmware_args(firmware: str, work: str) -> list[str]:
    """-machine, with UEFI's flash: OVMF's code read-only, a private copy of its variables."""
    machine = "pc"
    argv = []
    if firmware == "uefi":
        code, vars_template = find_ovmf()
        vars_copy = os.path.join(work, "OVMF_VARS.fd")
        shutil.copyfile(vars_template, vars_copy)  # the guest may write NVRAM: never to the system copy
        argv += blockdev(format_node(code, "raw", node_name="ovmf-code"))
        argv += blockdev(format_node(vars_copy, "raw", node_name="ovmf-vars", writable=True))
        machine += ",pflash0=ovmf-code,pflash1=ovmf-vars"
    return argv + ["-machine", machine]


def sandbox_args(qemu: str) -> list[str]:
    return ["-sandbox", SANDBOX] if sandbox_supported(qemu) else []


def file_source(image: str, fmt: str, fd: int | None = None) -> dict:
    """The image opened by qemu itself: a file or block device, a foreign one through `fd`."""
    return format_node(image, fmt, fd=fd, node_name="src", protocol=file_protocol(image))


def nbd_source(socket_path: str) -> dict:
    """The image as imgkit's NBD export serves it (raw bytes on a unix socket)."""
    return format_node(socket_path, "raw", node_name="src", protocol="nbd")


def disk_args(plan: BootPlan, src: dict, work: str, streamed: bool) -> list[str]:
    """The block graph (module docstring) and the guest's IDE device on its top node."""
    argv = blockdev(src)
    device = "ide-cd" if plan.media == "cdrom" else "ide-hd"
    if plan.media == "cdrom" and not streamed:
        return argv + ["-device", f"{device},drive=src,bootindex=0"]  # read-only media: no overlay
    overlay = os.path.join(work, "overlay.qcow2")
    create_overlay(overlay, max(plan.size, 512), cluster=STREAM_CLUSTER if streamed else None)
    argv += blockdev(format_node(overlay, "qcow2", node_name="disk", writable=True, backing="src"))
    top = "disk"
    if streamed:
        # Firmware reads a sector at a time (SeaBIOS IDE PIO: 512 bytes per request). Over NBD each
        # would be a round trip through imgkit; copy-on-read fetches whole overlay clusters instead,
        # so the next reads of that cluster are local (measured: 18,777 NBD reads -> 15 for
        # linux-bios). The overlay grows by what the guest reads, in the private temp directory.
        argv += blockdev(filter_node("copy-on-read", "cor", over="disk"))
        top = "cor"
    return argv + ["-device", f"{device},drive={top},bootindex=0"]


def boot_check_argv(qemu: str, plan: BootPlan, src: dict, work: str, memory: int, accel: str,
                    streamed: bool) -> list[str]:
    """The whole command line: no network, no display, no reboot; COM1 on QEMU's stdout, SeaBIOS's
    log in a file, QMP on a socket, all inside `work`."""
    return (machine_args(qemu, "imgkit-boot-check", accel, memory)
            + ["-display", "none", "-nic", "none", "-no-reboot", "-no-shutdown",
               "-chardev", "stdio,id=com1,signal=off", "-serial", "chardev:com1",
               "-chardev", f"file,id=fwlog,path={opt_path(firmware_log(work))}",
               "-device", "isa-debugcon,iobase=0x402,chardev=fwlog"]
            + qmp_args(work)
            + firmware_args(plan.firmware, work)
            + disk_args(plan, src, work, streamed)
            + sandbox_args(qemu))
