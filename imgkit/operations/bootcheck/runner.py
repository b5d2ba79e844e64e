"""One QEMU run of a boot check, as an object: start QEMU, watch what the guest shows (feeding the
judge) until a verdict or the deadline, take the screenshot, stop QEMU and report.

The guest's outputs: COM1 from a pipe (QEMU's stdout), SeaBIOS's log from a file in the work
directory, the VGA text screen of a BIOS guest read from guest memory once a second, and QMP, which
tells when the guest powered off and takes the screenshot."""
from __future__ import annotations

import os
import select
import subprocess
import time

from ...platform.accel import kvm_failure
from ...platform.qemu_tools import Limits, kill_group, last_line, popen
from ...platform.qmp import QmpClient
from . import qemu_cmdline
from .console import SCREEN_DUMP, Console, screen_from_dump
from .judge import Judge
from .options import BootOptions
from .plan import BootPlan
from .result import QEMU_FAILED, BootResult

FIRMWARE_POLL = 0.1          # seconds between reads of the firmware log file
SCREEN_POLL = 1.0            # seconds between reads of the VGA text screen (BIOS guests)
SELECT_WAIT = 0.1            # the longest the loop sleeps between looks at the clock
LINE_WAIT = 0.5              # after a match, how long to wait for the rest of its line
READ_SIZE = 65536
FIRMWARE_READ = 1 << 20
MONITOR_ERRORS = (RuntimeError, OSError, EOFError, TimeoutError)


class BootRun:
    """`src` is the image's block node (qemu_cmdline.file_source or nbd_source); `streamed` says it
    is imgkit's NBD export; `started` is when the whole check began (for total_seconds)."""

    def __init__(self, qemu: str, image: str, plan: BootPlan, options: BootOptions, accel: tuple[str, str],
                 src: dict, work: str, streamed: bool, started: float, pass_fds: tuple[int, ...] = ()):
        self.qemu, self.image, self.plan, self.options = qemu, image, plan, options
        self.accel, self.accel_why = accel
        self.src, self.work, self.streamed, self.started, self.pass_fds = src, work, streamed, started, pass_fds
        self.stderr_path = os.path.join(work, "qemu.stderr")
        self.proc: subprocess.Popen | None = None
        self.qmp: QmpClient | None = None
        self.judge: Judge | None = None
        self.shot_error: str | None = None
        self._fw_pos = 0

    def run(self) -> BootResult:
        try:
            self.start()
            self.watch()
            if self.options.screenshot:
                self.screenshot(self.options.screenshot)
        finally:
            self.stop()
        return self.finish()

    def command(self) -> list[str]:
        """QEMU's argv (tests/test_bootcheck_runner.py puts a stand-in for QEMU here)."""
        return qemu_cmdline.boot_check_argv(self.qemu, self.plan, self.src, self.work, self.options.memory,
                                            self.accel, self.streamed)

    def start(self) -> None:
        argv = self.command()
        timeout, memory = self.options.timeout, self.options.memory
        limits = Limits(cpu_seconds=int(timeout) + 60, address_space=memory + (4 << 30), wall_seconds=timeout)
        with open(self.stderr_path, "wb") as stderr:
            # From the main thread, qemu_tools gives QEMU PR_SET_PDEATHSIG: it dies if imgkit is killed.
            self.proc = popen(argv, limits, stdout=subprocess.PIPE, stderr=stderr, pass_fds=self.pass_fds)
        launched = time.monotonic()
        self.judge = Judge(self.options.expect_re, launched, timeout, Console(self.options.console_log))
        try:
            self.qmp = QmpClient(qemu_cmdline.qmp_socket(self.work), self.proc)
        except (OSError, EOFError, TimeoutError):
            self.qmp = None  # QEMU died at start: its stderr says why (finish)
        os.set_blocking(self.proc.stdout.fileno(), False)

    def watch(self) -> None:
        """Feed the judge until it has a verdict (or the deadline passed)."""
        judge, out_fd = self.judge, self.proc.stdout.fileno()
        fw_polled, screen_polled = 0.0, time.monotonic()
        while not judge.over(now := time.monotonic()):
            fds = [out_fd] + ([self.qmp] if self.qmp is not None else [])
            ready, _, _ = select.select(fds, [], [], min(SELECT_WAIT, max(0.0, judge.deadline - now)))
            stopped = False
            if out_fd in ready:
                data = _read(out_fd)
                if data:
                    judge.serial(data, time.monotonic())
                elif data == b"" and self.proc.poll() is not None:
                    stopped = True
            if self.qmp is not None and self.qmp in ready:
                try:
                    self.qmp.pump()
                except (EOFError, OSError):
                    self.qmp = None
            if self.qmp is not None and any(e.get("event") == "SHUTDOWN" for e in self.qmp.events):
                stopped = True  # powered off or reset (-no-reboot): nothing more will come
            if now - fw_polled >= FIRMWARE_POLL or stopped:
                fw_polled = now
                self._read_firmware_log()
            if (not judge.decided and self.qmp is not None and self.plan.firmware == "bios"
                    and now - screen_polled >= SCREEN_POLL):
                screen_polled = now
                judge.screen(self._screen(), time.monotonic())
            if stopped:
                judge.stopped(_drain(out_fd), time.monotonic(), self.proc.poll(), self.qmp is not None,
                              last_line(self.stderr_path))
        if judge.line_open():
            self._finish_line(out_fd)
        else:
            data = _read(out_fd)  # what waits in the pipe still belongs in the report's console tail
            if data:
                judge.serial(data, time.monotonic())

    def screenshot(self, path: str) -> None:
        """Screendump to `path` (PNG) through a temp name; the error is reported, not raised."""
        if self.qmp is None:
            self.shot_error = "QEMU had already exited"
            return
        final = os.path.abspath(path)
        tmp = f"{final}.tmp-{os.getpid()}"
        try:
            self.qmp.command("screendump", filename=tmp, format="png")
            os.replace(tmp, final)
        except MONITOR_ERRORS as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self.shot_error = str(e) or type(e).__name__

    def stop(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.proc is not None:
            kill_group(self.proc)  # QEMU's whole process group, also when start failed half-way
            self.proc.stdout.close()

    def finish(self) -> BootResult:
        judge, o = self.judge, self.options
        if judge.reason == QEMU_FAILED and (problem := kvm_failure(last_line(self.stderr_path))):
            raise problem
        passed = judge.passed
        shot = o.screenshot
        return BootResult(
            image=self.image, passed=passed, reason=None if passed else judge.reason,
            detail=None if passed else judge.failure_detail,
            seconds_to_result=judge.seconds_to_result(time.monotonic()),
            total_seconds=round(time.monotonic() - self.started, 3),
            expect=o.expect, matched=judge.matched if passed else None,
            matched_on=judge.matched_on if passed else None, format=self.plan.format, media=self.plan.media,
            firmware=self.plan.firmware, firmware_why=self.plan.firmware_why, accel=self.accel,
            accel_why=self.accel_why, streamed=self.streamed, timeout=o.timeout, memory=o.memory,
            console_tail=judge.console.tail(), firmware_log_tail=judge.firmware_log.tail(8),
            screenshot=os.path.abspath(shot) if shot and not self.shot_error else None,
            screenshot_error=self.shot_error)

    # -- inside ----------------------------------------------------------------------------------

    def _read_firmware_log(self) -> None:
        try:
            with open(qemu_cmdline.firmware_log(self.work), "rb") as f:
                f.seek(self._fw_pos)
                more = f.read(FIRMWARE_READ)
        except OSError:
            return
        self._fw_pos += len(more)
        if more:
            self.judge.firmware(more, time.monotonic())

    def _screen(self) -> str:
        try:
            out = self.qmp.command("human-monitor-command", **{"command-line": SCREEN_DUMP})
            return screen_from_dump(out)
        except (*MONITOR_ERRORS, ValueError):
            return ""

    def _finish_line(self, fd: int) -> None:
        """After a match, read on briefly until its line ends, so the report shows the whole line."""
        deadline = time.monotonic() + LINE_WAIT
        while self.judge.line_open() and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return
            data = _read(fd)
            if data == b"":
                return
            if data:
                self.judge.serial(data, time.monotonic())


def _read(fd: int) -> bytes | None:
    """What is waiting on a non-blocking pipe: b"" at its end, None when nothing is there yet."""
    try:
        return os.read(fd, READ_SIZE)
    except BlockingIOError:
        return None


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            data = os.read(fd, READ_SIZE)
        except OSError:
            return out
        if not data:
            return out
        out += data
