"""The boot-check run loop without QEMU (imgkit/operations/bootcheck/runner.py): a stand-in process
writes what a guest would (serial on stdout, the firmware log file, an error on stderr), and, where
a scenario needs one, answers a minimal QMP on the monitor socket (the text screen, screendump, the
SHUTDOWN event). BootRun must read it all, reach the verdict, report it and stop the process.
Real QEMU boots are in tests/test_bootcheck_*.py."""
from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from imgkit.errors import EnvironmentProblem
from imgkit.operations.bootcheck.options import BootOptions
from imgkit.operations.bootcheck.plan import BootPlan
from imgkit.operations.bootcheck.result import GUEST_STOPPED, NO_BOOTABLE_DEVICE, QEMU_FAILED, TIMEOUT
from imgkit.operations.bootcheck.runner import BootRun

# A minimal QMP server for the stand-in: greeting, {"return": ...} for every command, the VGA text
# buffer as `xp` prints it, a file for screendump, and events on request.
MONITOR = r'''
import json, os, socket, sys, threading, time
work = sys.argv[1]
conn = None
def dump(text):
    cells = []
    for row in (text.splitlines() + [""] * 25)[:25]:
        cells += [0x0700 | ord(ch) for ch in row[:80].ljust(80)]
    return "".join(f"{0xb8000 + i * 2:016x}: " + " ".join(f"0x{c:04x}" for c in cells[i:i + 8]) + "\n"
                   for i in range(0, len(cells), 8))
def monitor(screen=""):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(os.path.join(work, "qmp.sock"))
    srv.listen(1)
    ready = threading.Event()
    def serve():
        global conn
        conn, _ = srv.accept()
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        ready.set()
        for line in conn.makefile("rb"):
            cmd = json.loads(line)
            ret = {}
            if cmd["execute"] == "human-monitor-command":
                ret = dump(screen)
            elif cmd["execute"] == "screendump":
                with open(cmd["arguments"]["filename"], "wb") as f:
                    f.write(b"\x89PNG stand-in")
            conn.sendall(json.dumps({"return": ret}).encode() + b"\n")
    threading.Thread(target=serve, daemon=True).start()
    ready.wait(10)
def event(name):
    conn.sendall(json.dumps({"event": name, "data": {}}).encode() + b"\n")
'''


class StandIn(BootRun):
    script = ""

    def command(self) -> list[str]:
        return [sys.executable, "-c", MONITOR + textwrap.dedent(self.script), self.work]


def run(tmp_path, script: str, firmware: str = "bios", **options) -> BootRun:
    work = tmp_path / "work"
    work.mkdir()
    r = StandIn("qemu-system-x86_64", "disk.raw", BootPlan("raw", "disk", firmware, "test", 1 << 20),
                BootOptions(**options), ("tcg", "test"), {}, str(work), False, time.monotonic())
    r.script = script
    return r


def test_serial_output_in_pieces_is_a_pass_with_the_whole_line(tmp_path):
    r = run(tmp_path, r"""
        monitor()
        for piece in (b"SeaBIOS\r\nBooting from Hard Disk...\r\n", b"IMGKIT-BOOT-", b"OK tiny", b"-bios\r\n"):
            sys.stdout.buffer.write(piece); sys.stdout.flush(); time.sleep(0.1)
        time.sleep(30)
        """, console_log=str(tmp_path / "console.log"))
    result = r.run()
    assert result.passed and result.reason is None
    assert result.matched == "IMGKIT-BOOT-OK tiny-bios" and result.matched_on == "serial"
    assert result.console_tail[-1] == "IMGKIT-BOOT-OK tiny-bios"
    assert (tmp_path / "console.log").read_bytes().startswith(b"SeaBIOS\r\n")
    assert 0 < result.seconds_to_result <= result.total_seconds < 10


def test_the_firmware_log_is_read_and_judged(tmp_path):
    r = run(tmp_path, r"""
        monitor()
        with open(os.path.join(work, "firmware.log"), "w") as f:
            f.write("SeaBIOS (version 1.16.2)\nBooting from Hard Disk...\nNo bootable device.\n")
        time.sleep(30)
        """)
    result = r.run()
    assert not result.passed and result.reason == NO_BOOTABLE_DEVICE
    assert result.firmware_log_tail[-1] == "No bootable device."
    assert result.seconds_to_result < 5


def test_the_text_screen_of_a_bios_guest_passes_and_the_screenshot_is_taken(tmp_path):
    shot = tmp_path / "screen.png"
    r = run(tmp_path, r"""
        monitor("SeaBIOS\nIMGKIT-BOOT-OK from the boot sector")
        time.sleep(30)
        """, screenshot=str(shot))
    result = r.run()
    assert result.passed and result.matched_on == "screen"
    assert result.matched == "IMGKIT-BOOT-OK from the boot sector"
    assert result.screenshot == str(shot) and shot.read_bytes() == b"\x89PNG stand-in"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_a_boot_sector_error_on_the_screen_fails(tmp_path):
    r = run(tmp_path, r"""
        monitor("Missing operating system")
        time.sleep(30)
        """)
    result = r.run()
    assert result.reason == NO_BOOTABLE_DEVICE and result.detail == "Missing operating system"


def test_the_screen_is_not_read_for_a_uefi_guest(tmp_path):
    r = run(tmp_path, r"""
        monitor("IMGKIT-BOOT-OK")
        time.sleep(30)
        """, firmware="uefi", timeout=2)
    assert r.run().reason == TIMEOUT


def test_a_powered_off_guest_is_guest_stopped(tmp_path):
    r = run(tmp_path, r"""
        monitor()
        print("Power down.", flush=True)
        time.sleep(0.3)
        event("SHUTDOWN")
        time.sleep(30)
        """)
    result = r.run()
    assert result.reason == GUEST_STOPPED and result.console_tail == ["Power down."]


def test_qemu_exiting_with_an_error_is_qemu_failed_with_its_last_line(tmp_path):
    r = run(tmp_path, r"""
        sys.stderr.write("qemu-system-x86_64: warning: something\nqemu-system-x86_64: -blockdev x: Could not open\n")
        sys.exit(1)
        """, screenshot=str(tmp_path / "shot.png"))
    result = r.run()
    assert result.reason == QEMU_FAILED and result.detail == "qemu-system-x86_64: -blockdev x: Could not open"
    assert result.screenshot is None and result.screenshot_error == "QEMU had already exited"


def test_a_missing_kvm_is_the_environments_fault(tmp_path):
    r = run(tmp_path, r"""
        sys.stderr.write("Could not access KVM kernel module: No such file or directory\n")
        sys.exit(1)
        """)
    with pytest.raises(EnvironmentProblem):
        r.run()


def test_silence_until_the_deadline_is_a_timeout_and_the_process_is_stopped(tmp_path):
    r = run(tmp_path, r"""
        monitor()
        print("booting", flush=True)
        with open(os.path.join(work, "pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
        """, timeout=1.5)
    result = r.run()
    assert result.reason == TIMEOUT and 1.5 <= result.seconds_to_result < 3
    assert result.console_tail == ["booting"]
    pid = int((tmp_path / "work" / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)   # the stand-in is gone (kill_group); a zombie would still answer
            time.sleep(0.1)
