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
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field

from ...platform.accel import choose_accel
from ...errors import EnvironmentProblem, InputError
from ...platform.qemu_tools import Limits, find_program, kill_group, popen
from ...platform.qemu_tools import run as run_qemu
from ...platform.qmp import QmpClient
from ...formats.imgk_writer import DEFAULT_CHUNK_SIZE
from ...stream import Stream

# The vm-fixtures marker, a login prompt, or the rescue ISO's banner (imgkit/rescue/files/banner).
DEFAULT_EXPECT = r"IMGKIT-BOOT-OK|\blogin:\s*$|imgkit rescue \S+ ready"
DEFAULT_TIMEOUT = 120.0
DEFAULT_MEMORY = 512 << 20   # GRUB EFI wants more than 256 MiB to load a Debian kernel
MIN_MEMORY = 16 << 20
MAX_MEMORY = 64 << 30
TAIL_LINES = 20
CONSOLE_KEEP = 4 << 20       # bytes of console text kept (the rest is dropped from the front)
SEARCH_OVERLAP = 4 << 10     # new text is searched together with the 4 KiB before it (lines split across reads)
FIRMWARE_POLL = 0.1          # seconds between reads of the firmware log file
SCREEN_POLL = 1.0            # seconds between reads of the VGA text screen (BIOS guests)
VGA_TEXT = 0xB8000           # VGA text-mode buffer: 80x25 cells of (character, attribute)
VGA_COLUMNS, VGA_ROWS = 80, 25
QCOW2_MAX_CLUSTER = 2 << 20
STREAM_CLUSTER = min(DEFAULT_CHUNK_SIZE, QCOW2_MAX_CLUSTER)  # overlay cluster for streamed images:
                                                            # one imgk chunk of the default size
TCG_TB_MIB = 256             # TCG translation cache; the 1 GiB default would count against RLIMIT_AS

PASS = None
NO_BOOTABLE_DEVICE = "no bootable device"
KERNEL_PANIC = "kernel panic"
TIMEOUT = "timeout"
BOOTLOADER_FAILED = "bootloader failed"
GUEST_STOPPED = "guest stopped"
QEMU_FAILED = "qemu failed"
REASONS = (NO_BOOTABLE_DEVICE, KERNEL_PANIC, TIMEOUT, BOOTLOADER_FAILED, GUEST_STOPPED, QEMU_FAILED)

# What firmware and kernels print when booting failed; the reason each one means.
FAILURE_PATTERNS = [
    (re.compile(r"No bootable device"), NO_BOOTABLE_DEVICE),                          # SeaBIOS
    (re.compile(r"No bootable option or device was found"), NO_BOOTABLE_DEVICE),     # OVMF BdsDxe
    (re.compile(r"UEFI Interactive Shell|^Shell> ", re.M), NO_BOOTABLE_DEVICE),      # OVMF fell to its shell
    (re.compile(r"Kernel panic - not syncing[^\r\n]*"), KERNEL_PANIC),
    (re.compile(r"grub rescue> ?$|error: (?:file|disk) [^\r\n]* not found", re.M), BOOTLOADER_FAILED),
]
# Messages that MBR and boot-sector code print only on the screen (int 10h), never on a serial port.
SCREEN_FAILURE_PATTERNS = [
    (re.compile(r"Missing operating system|Operating system not found|Invalid partition table|"
                r"Error loading operating system|No bootable device"), NO_BOOTABLE_DEVICE),
    (re.compile(r"BOOTMGR is (?:missing|compressed)|NTLDR is missing|Non-system disk or disk error|"
                r"GRUB Loading stage1\.5\.\s*Error \d+|GRUB\s+(?:Hard Disk|Read|Geom) Error"), BOOTLOADER_FAILED),
]
ANSI = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1bc")

OVMF_CANDIDATES = [  # (code, vars): Debian/Ubuntu, then Fedora/Arch
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
    ("/usr/share/edk2/x64/OVMF_CODE.fd", "/usr/share/edk2/x64/OVMF_VARS.fd"),
]


@dataclass
class BootPlan:
    """How an image will be booted, decided before QEMU starts."""
    format: str          # imgk, raw, iso, qcow2, vhd, vhdx, vmdk
    media: str           # disk or cdrom
    firmware: str        # bios or uefi
    firmware_why: str
    size: int


@dataclass
class BootResult:
    image: str
    passed: bool
    reason: str | None               # None on a pass, else one of REASONS
    detail: str | None               # the line that decided it (the panic message, ...)
    seconds_to_result: float | None  # from QEMU's start to the match or the failure
    total_seconds: float             # the whole check, set-up included
    expect: str
    matched: str | None
    matched_on: str | None           # "serial" or "screen" (VGA text of a BIOS guest)
    format: str
    media: str
    firmware: str
    firmware_why: str
    accel: str
    accel_why: str
    streamed: bool                   # served by imgkit over NBD (imgk) rather than opened by qemu
    timeout: float
    memory: int
    console_tail: list[str] = field(default_factory=list)
    firmware_log_tail: list[str] = field(default_factory=list)
    screenshot: str | None = None
    screenshot_error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.passed:
            return (f"PASS {self.image}: matched {self.matched!r} after {self.seconds_to_result:.1f} s "
                    f"({self.firmware}, {self.media}, {self.accel})")
        return (f"FAIL {self.image}: {self.reason}" + (f" ({self.detail})" if self.detail else "")
                + f" after {self.seconds_to_result or 0:.1f} s ({self.firmware}, {self.media}, {self.accel})")


# -- deciding how to boot ----------------------------------------------------------------------------

def plan_boot(stream: Stream, fmt: str, firmware: str = "auto", metadata: dict | None = None) -> BootPlan:
    """Media and firmware for a disk. `auto`: an ISO 9660 image boots as a CD-ROM with BIOS; a GPT disk
    with an EFI system partition and no BIOS boot code (MBR code all zero, no BIOS boot partition)
    boots with UEFI; everything else with BIOS."""
    from ...filesystems.disk_info import optical_facts
    from ...formats.partitions import read_partition_table

    optical = (metadata or {}).get("optical") or optical_facts(stream)
    media = "cdrom" if (fmt == "iso" or optical) else "disk"
    if firmware in ("bios", "uefi"):
        return BootPlan(fmt, media, firmware, "forced by --firmware", stream.size)
    if media == "cdrom":
        return BootPlan(fmt, media, "bios", "ISO 9660 image: El Torito boot from a CD-ROM", stream.size)
    mbr = stream.read(0, 512)
    boot_code = len(mbr) == 512 and any(mbr[:440])
    table = read_partition_table(stream)
    esp = any(p.is_esp for p in table.partitions)
    bios_boot = any(p.is_bios_boot for p in table.partitions)
    if table.type == "gpt" and esp and not boot_code and not bios_boot:
        return BootPlan(fmt, media, "uefi", "GPT with an EFI system partition and no BIOS boot code",
                        stream.size)
    if table.type == "gpt" and esp:
        why = "GPT with an ESP, but also BIOS boot code" + (" and a BIOS boot partition" if bios_boot else "")
    elif boot_code:
        why = f"{table.type.upper() if table.type != 'none' else 'no partition table'}, MBR boot code present"
    else:
        why = "no EFI system partition"
    return BootPlan(fmt, media, "bios", why, stream.size)


def find_ovmf() -> tuple[str, str]:
    code, vars_ = os.environ.get("IMGKIT_OVMF_CODE"), os.environ.get("IMGKIT_OVMF_VARS")
    if code and vars_:
        candidates = [(code, vars_)]
    else:
        candidates = OVMF_CANDIDATES
    for c, v in candidates:
        if os.path.isfile(c) and os.path.isfile(v):
            return c, v
    raise EnvironmentProblem("UEFI firmware (OVMF) not found",
                             hint="apt-get install ovmf, or set IMGKIT_OVMF_CODE and IMGKIT_OVMF_VARS")


_SANDBOX: dict[str, bool] = {}


def _sandbox_supported(qemu: str) -> bool:
    if qemu not in _SANDBOX:
        try:
            out = subprocess.run([qemu, "-sandbox", "help"], capture_output=True, text=True, timeout=10)
            text = out.stdout + out.stderr
            _SANDBOX[qemu] = "seccomp support is disabled" not in text and "invalid option" not in text
        except (OSError, subprocess.TimeoutExpired):
            _SANDBOX[qemu] = False
    return _SANDBOX[qemu]


def _opt_path(path: str) -> str:
    """A path inside a qemu `key=value,...` option: commas are doubled."""
    return path.replace(",", ",,")


# -- the check ---------------------------------------------------------------------------------------

def boot_check(image: str, *, expect: str | None = None, firmware: str = "auto", timeout: float = DEFAULT_TIMEOUT,
               memory: int = DEFAULT_MEMORY, accel: str = "auto", screenshot: str | None = None,
               password=None, fmt: str | None = None, console_log: str | None = None) -> BootResult:
    """Boot `image` (any format imgkit reads) and report. Raises InputError for unusable arguments
    or images, EnvironmentProblem when QEMU or OVMF is missing; a failed boot is a BootResult."""
    from ...formats.registry import open_image
    from ...formats import foreign
    from ...formats.qemu_image import format_node

    started = time.monotonic()
    expect = expect or DEFAULT_EXPECT
    try:
        expect_re = re.compile(expect, re.M)
    except re.error as e:
        raise InputError(f"--expect {expect!r} is not a valid regular expression: {e}") from None
    if firmware not in ("auto", "bios", "uefi"):
        raise InputError(f"--firmware {firmware!r}: expected auto, bios or uefi")
    if not (0 < timeout <= 24 * 3600):
        raise InputError("--timeout must be between 0 and 86400 seconds")
    if not (MIN_MEMORY <= memory <= MAX_MEMORY):
        raise InputError("--memory must be between 16 MiB and 64 GiB")
    qemu = find_program("qemu-system-x86_64")
    from ...remote.s3 import is_s3
    if is_s3(image):  # an imgk image in S3: served over NBD from ranged GETs, like a local one
        fmt = fmt or "imgk"
    else:
        foreign.refuse_json_name(image)
        if not os.path.exists(image):
            raise InputError(f"{image}: no such file or device")
        fmt = fmt or (foreign.detect_format(image) if os.path.isfile(image) else "raw")
    accel_name, accel_why = choose_accel(accel)

    stream = open_image(image, password, fmt=fmt)  # inspects foreign headers, checks imgk structure
    pinned_fd = None
    try:
        from ...views.caching_reader import CachingReader
        metadata = stream.metadata
        with CachingReader(stream, 8 << 20) as probe:  # many small reads of the same first chunks
            plan = plan_boot(probe, fmt, firmware, metadata)
        if fmt in foreign.QEMU_FORMATS:
            # QEMU reads the very file that was inspected: the inspection's descriptor, duplicated
            # before the planning stream (which owns it) closes, never the path again.
            pinned_fd = os.dup(stream.inspected.fd)
        if fmt != "imgk":
            stream.close()  # qemu opens the file itself; the Stream was only for planning
            stream = None
        with tempfile.TemporaryDirectory(prefix="imgkit-boot-") as work:
            os.chmod(work, 0o700)
            if stream is not None:
                from ...views.nbd_export import export_stream
                with export_stream(stream, socket_dir=work) as export:
                    src = {"driver": "raw", "node-name": "src", "read-only": True,
                           "file": {"driver": "nbd", "server": {"type": "unix", "path": export.socket_path}}}
                    return _run(qemu, image, plan, src, work, expect, expect_re, timeout, memory, accel_name,
                                accel_why, screenshot, True, started, console_log)
            protocol = "file" if os.path.isfile(image) else "host_device"  # a block device
            # never a backing file; a foreign image through its inspected descriptor
            src = format_node(image, fmt, fd=pinned_fd, node_name="src", protocol=protocol)
            return _run(qemu, image, plan, src, work, expect, expect_re, timeout, memory, accel_name,
                        accel_why, screenshot, False, started, console_log,
                        pass_fds=(pinned_fd,) if pinned_fd is not None else ())
    finally:
        if stream is not None:
            stream.close()
        if pinned_fd is not None:
            os.close(pinned_fd)


def _qemu_argv(qemu: str, plan: BootPlan, src: dict, work: str, memory: int, accel: str,
               streamed: bool) -> list[str]:
    argv = [qemu, "-nodefaults", "-no-user-config", "-name", "imgkit-boot-check",
            "-accel", f"tcg,tb-size={TCG_TB_MIB}" if accel == "tcg" else "kvm",
            "-m", f"{memory >> 20}M", "-smp", "1",
            "-display", "none", "-vga", "std", "-nic", "none",
            "-no-reboot", "-no-shutdown",
            "-chardev", "stdio,id=com1,signal=off", "-serial", "chardev:com1",
            "-chardev", f"file,id=fwlog,path={_opt_path(os.path.join(work, 'firmware.log'))}",
            "-device", "isa-debugcon,iobase=0x402,chardev=fwlog",
            "-chardev", f"socket,id=qmp,path={_opt_path(os.path.join(work, 'qmp.sock'))},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-blockdev", json.dumps(src)]
    machine = "pc"
    if plan.firmware == "uefi":
        code, vars_template = find_ovmf()
        vars_copy = os.path.join(work, "OVMF_VARS.fd")
        shutil.copyfile(vars_template, vars_copy)  # the guest may write NVRAM: never to the system copy
        argv += ["-blockdev", json.dumps({"driver": "raw", "node-name": "ovmf-code", "read-only": True,
                                          "file": {"driver": "file", "filename": code}}),
                 "-blockdev", json.dumps({"driver": "raw", "node-name": "ovmf-vars",
                                          "file": {"driver": "file", "filename": vars_copy}})]
        machine += ",pflash0=ovmf-code,pflash1=ovmf-vars"
    argv += ["-machine", machine]
    device = "ide-cd" if plan.media == "cdrom" else "ide-hd"
    if plan.media == "cdrom" and not streamed:
        argv += ["-device", f"{device},drive=src,bootindex=0"]  # a CD-ROM is read-only: no overlay needed
        top = None
    else:
        overlay = os.path.join(work, "overlay.qcow2")
        # No backing file in the overlay's header: the backing node is given at run time (-blockdev).
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if streamed:
            cmd += ["-o", f"cluster_size={STREAM_CLUSTER}"]
        # qemu_tools.run: the same limits, locale and process group as every other qemu-img call
        run_qemu(cmd + [overlay, str(max(plan.size, 512))], what="qemu-img create (the overlay)")
        argv += ["-blockdev", json.dumps({"driver": "qcow2", "node-name": "disk", "backing": "src",
                                          "file": {"driver": "file", "filename": overlay}})]
        top = "disk"
        if streamed:
            # Firmware reads a sector at a time (SeaBIOS IDE PIO: 512 bytes per request). Over NBD each
            # would be a round trip through imgkit; copy-on-read fetches whole overlay clusters instead,
            # so the next reads of that cluster are local (measured: 18,777 NBD reads -> 15 for
            # linux-bios). The overlay grows by what the guest reads, in the private temp directory.
            argv += ["-blockdev", json.dumps({"driver": "copy-on-read", "node-name": "cor", "file": "disk"})]
            top = "cor"
        argv += ["-device", f"{device},drive={top},bootindex=0"]
    if _sandbox_supported(qemu):
        argv += ["-sandbox", "on,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    return argv


class _Console:
    """Console text as it arrives: kept (bounded), cleaned of escape sequences, searched incrementally."""

    def __init__(self, log_path: str | None = None):
        self.text = ""
        self.log_path = log_path  # raw bytes are appended here as they arrive (--console-log)

    def add(self, raw: bytes) -> str:
        if self.log_path:
            with open(self.log_path, "ab") as f:
                f.write(raw)
        chunk = ANSI.sub("", raw.decode("utf-8", "replace")).replace("\r\n", "\n").replace("\r", "\n")
        self.text += chunk
        if len(self.text) > CONSOLE_KEEP:
            self.text = self.text[-CONSOLE_KEEP:]
        return chunk

    def window(self, new: int) -> str:
        """What arrived last (`new` characters) with some context: searching only this keeps a long,
        chatty boot linear instead of rescanning the whole log on every read."""
        return self.text[-(SEARCH_OVERLAP + new):]

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        lines = [ln.rstrip() for ln in self.text.splitlines()]
        lines = [ln for ln in lines if ln.strip()]
        return lines[-n:]


def _classify(text: str) -> tuple[str, str] | None:
    for pattern, reason in FAILURE_PATTERNS:
        m = pattern.search(text)
        if m:
            return reason, m.group(0).strip()
    return None


def _screen_text(qmp: QmpClient) -> str:
    """The VGA text screen as 25 lines, read from guest memory through the monitor (`xp`). Meaningful
    while the guest is in text mode (BIOS, boot loaders, the Linux VGA console); in graphics mode the
    buffer holds stale or no text, which simply does not match."""
    out = qmp.command("human-monitor-command", **{"command-line": f"xp /{VGA_COLUMNS * VGA_ROWS}hx {VGA_TEXT:#x}"})
    chars = []
    for line in out.splitlines():
        for cell in line.partition(":")[2].split():
            code = int(cell, 16) & 0xFF
            chars.append(chr(code) if 32 <= code < 127 else " ")
    rows = ["".join(chars[i:i + VGA_COLUMNS]).rstrip() for i in range(0, len(chars), VGA_COLUMNS)]
    return "\n".join(rows)


def _take_screenshot(qmp: QmpClient | None, path: str) -> str | None:
    """Screendump to `path` (PNG) through a temp name; an error message, or None when it worked."""
    if qmp is None:
        return "QEMU had already exited"
    final = os.path.abspath(path)
    tmp = f"{final}.tmp-{os.getpid()}"
    try:
        qmp.command("screendump", filename=tmp, format="png")
        os.replace(tmp, final)
        return None
    except (RuntimeError, OSError, EOFError, TimeoutError) as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return str(e) or type(e).__name__


def _run(qemu, image, plan, src, work, expect, expect_re, timeout, memory, accel, accel_why, screenshot,
         streamed, started, console_log, pass_fds: tuple[int, ...] = ()) -> BootResult:
    argv = _qemu_argv(qemu, plan, src, work, memory, accel, streamed)
    limits = Limits(cpu_seconds=int(timeout) + 60, address_space=memory + (4 << 30), wall_seconds=timeout)
    stderr_path = os.path.join(work, "qemu.stderr")
    console, fwlog = _Console(console_log), _Console()
    fw_path = os.path.join(work, "firmware.log")
    fw_pos, fw_polled, screen_polled = 0, 0.0, time.monotonic()
    reason = detail = matched = None
    matched_on = "serial"
    qmp = None
    with open(stderr_path, "wb") as stderr:
        # From the main thread, qemu_tools gives QEMU PR_SET_PDEATHSIG: it dies if imgkit is killed.
        proc = popen(argv, limits, stdout=subprocess.PIPE, stderr=stderr, pass_fds=pass_fds)
    launched = time.monotonic()
    ended_at = None
    try:
        try:
            qmp = QmpClient(os.path.join(work, "qmp.sock"), proc)
        except (OSError, EOFError, TimeoutError):
            qmp = None  # QEMU died at start: its stderr says why (below)
        out_fd = proc.stdout.fileno()
        os.set_blocking(out_fd, False)
        deadline = launched + timeout
        panic_grace = None   # after a panic line, wait briefly for the rest of the message
        stopped = False
        while True:
            now = time.monotonic()
            if panic_grace is not None and (now >= panic_grace or stopped):
                break
            if now >= deadline:
                reason, detail = TIMEOUT, f"no match for {expect!r} within {timeout:g} s"
                break
            fds = [out_fd] + ([qmp] if qmp is not None else [])
            ready, _, _ = select.select(fds, [], [], min(0.1, max(0.0, deadline - now)))
            new = 0
            if out_fd in ready:
                try:
                    data = os.read(out_fd, 65536)
                except BlockingIOError:
                    data = b""
                if data:
                    new = len(console.add(data))
                elif proc.poll() is not None:
                    stopped = True
            if qmp is not None and qmp in ready:
                try:
                    qmp.pump()
                except (EOFError, OSError):
                    qmp = None
            if qmp is not None and any(e.get("event") == "SHUTDOWN" for e in qmp.events):
                stopped = True  # powered off or reset (-no-reboot): nothing more will come
            fw_new = 0
            if now - fw_polled >= FIRMWARE_POLL or stopped:
                fw_polled = now
                try:
                    with open(fw_path, "rb") as f:
                        f.seek(fw_pos)
                        more = f.read(1 << 20)
                    fw_pos += len(more)
                    if more:
                        fw_new = len(fwlog.add(more))
                except OSError:
                    pass
            if new and reason is None:
                window = console.window(new)
                m = expect_re.search(window)
                if m:
                    ended_at = time.monotonic()
                    _finish_line(out_fd, console, len(console.text) - len(window) + m.end())
                    matched = _line_of(console.text, len(console.text) - len(window) + m.start(), m)
                    break
            if reason is None and qmp is not None and plan.firmware == "bios" and now - screen_polled >= SCREEN_POLL:
                screen_polled = now
                try:
                    screen = _screen_text(qmp)
                except (RuntimeError, OSError, EOFError, TimeoutError, ValueError):
                    screen = ""
                m = expect_re.search(screen)
                if m:
                    ended_at = time.monotonic()
                    matched, matched_on = _line_of(screen, m.start(), m), "screen"
                    break
                for pattern, why in SCREEN_FAILURE_PATTERNS:
                    m = pattern.search(screen)
                    if m:
                        reason, detail, ended_at = why, m.group(0).strip(), time.monotonic()
                        break
                if reason is not None:
                    break
            if reason is None and (new or fw_new):
                found = (_classify(console.window(new)) if new else None) or \
                        (_classify(fwlog.window(fw_new)) if fw_new else None)
                if found:
                    reason, detail = found
                    ended_at = time.monotonic()
                    if reason != KERNEL_PANIC:
                        break
                    panic_grace = ended_at + 2.0
            if stopped and panic_grace is None:
                # Drain what QEMU wrote before it stopped, then judge.
                rest = _drain(out_fd)
                if rest:
                    console.add(rest)
                    window = console.window(len(rest))
                    m = expect_re.search(window)
                    if m:
                        ended_at = time.monotonic()
                        matched = _line_of(console.text, len(console.text) - len(window) + m.start(), m)
                        break
                found = _classify(console.text) or _classify(fwlog.text)
                if found:
                    reason, detail = found
                else:
                    code = proc.poll()
                    if qmp is None and code not in (None, 0):
                        reason, detail = QEMU_FAILED, _last_line(stderr_path) or f"exit status {code}"
                    else:
                        reason, detail = GUEST_STOPPED, "the guest powered off or reset without the expected output"
                ended_at = time.monotonic()
                break
        if reason == KERNEL_PANIC:  # the grace period let the whole panic line arrive
            detail = _classify(console.text)[1] if _classify(console.text) else detail
        shot_error = None
        if screenshot:
            shot_error = _take_screenshot(qmp, screenshot)
    finally:
        if qmp is not None:
            qmp.close()
        kill_group(proc)
        proc.stdout.close()
    if reason == QEMU_FAILED:
        _raise_if_environment(stderr_path)
    if ended_at is None:
        ended_at = time.monotonic()
    passed = matched is not None
    return BootResult(
        image=image, passed=passed, reason=None if passed else reason, detail=None if passed else detail,
        seconds_to_result=round(ended_at - launched, 3), total_seconds=round(time.monotonic() - started, 3),
        expect=expect, matched=matched, matched_on=matched_on if matched else None, format=plan.format,
        media=plan.media, firmware=plan.firmware,
        firmware_why=plan.firmware_why, accel=accel, accel_why=accel_why, streamed=streamed,
        timeout=timeout, memory=memory, console_tail=console.tail(), firmware_log_tail=fwlog.tail(8),
        screenshot=os.path.abspath(screenshot) if screenshot and not shot_error else None,
        screenshot_error=shot_error)


def _line_of(text: str, start: int, m: re.Match) -> str:
    """The whole console line a match is on (what a human wants to see), capped."""
    begin = text.rfind("\n", 0, start) + 1
    end = text.find("\n", start)
    return text[begin:end if end >= 0 else len(text)].strip()[:200] or m.group(0)


def _finish_line(fd: int, console: _Console, pos: int, wait: float = 0.5) -> None:
    """After a match, read on briefly until its line ends, so the report shows the whole line."""
    deadline = time.monotonic() + wait
    while "\n" not in console.text[pos:] and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not data:
            return
        console.add(data)


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return out
        if not data:
            return out
        out += data


def _last_line(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[-1] if lines else None
    except OSError:
        return None


def _raise_if_environment(stderr_path: str) -> None:
    """QEMU refusing to start for lack of something on the host is the environment's fault (exit 4)."""
    line = _last_line(stderr_path) or ""
    if "Could not access KVM" in line or "failed to initialize kvm" in line.lower():
        raise EnvironmentProblem(f"qemu: {line}", hint="use --accel tcg")
