"""The verdict of one boot: fed what the guest shows (serial bytes, firmware-log bytes, VGA text
screens) and when, it decides pass or why not. It has no clock and does no I/O (the runner passes
`now` and the bytes), so every outcome can be tested from a scripted feed
(tests/test_bootcheck_judge.py).

The rules: the expected text on the serial console or, for a BIOS guest, on the text screen is a
pass; a failure message (console.FAILURE_PATTERNS on the console or the firmware log,
SCREEN_FAILURE_PATTERNS on the screen) is a fail with that reason, except that a kernel panic waits
PANIC_GRACE seconds for the rest of its message; nothing by the deadline is a timeout; QEMU stopping
first is a failure seen in what it wrote, else `qemu failed` (it exited with an error before the
monitor was up) or `guest stopped`."""
from __future__ import annotations

import re

from .console import Console, classify, classify_screen, line_of
from .result import GUEST_STOPPED, KERNEL_PANIC, QEMU_FAILED, TIMEOUT

PANIC_GRACE = 2.0   # seconds a panic's remaining lines get to arrive


class Judge:
    def __init__(self, expect: re.Pattern, launched: float, timeout: float, console: Console | None = None,
                 firmware_log: Console | None = None):
        self.expect = expect
        self.launched = launched
        self.timeout = timeout
        self.deadline = launched + timeout
        self.console = console or Console()
        self.firmware_log = firmware_log or Console()
        self.reason: str | None = None
        self.detail: str | None = None
        self.matched_on: str | None = None
        self.ended_at: float | None = None
        self._serial_match: tuple[int, int, str] | None = None   # console positions and text of the match
        self._screen_line: str | None = None
        self._grace_until: float | None = None
        self._over = False

    # -- what the runner feeds -------------------------------------------------------------------

    def serial(self, data: bytes, now: float) -> None:
        """Bytes from the serial console (after a verdict they are only kept, for the report)."""
        new = len(self.console.add(data))
        if new and not self.decided and not self._search(new, now):
            self._fail(classify(self.console.window(new)), now)

    def firmware(self, data: bytes, now: float) -> None:
        """Bytes from the firmware's log (SeaBIOS's debug port)."""
        new = len(self.firmware_log.add(data))
        if new and not self.decided:
            self._fail(classify(self.firmware_log.window(new)), now)

    def screen(self, text: str, now: float) -> None:
        """The VGA text screen, read now."""
        if self.decided:
            return
        m = self.expect.search(text)
        if m:
            self._screen_line, self.matched_on, self.ended_at = line_of(text, m.start(), m.group(0)), "screen", now
            self._over = True
            return
        found = classify_screen(text)
        if found:
            self.reason, self.detail = found
            self.ended_at, self._over = now, True

    def stopped(self, rest: bytes, now: float, exit_status: int | None, monitor_up: bool,
                qemu_error: str | None) -> None:
        """QEMU exited, or the guest powered off or reset: `rest` is what QEMU wrote before that.
        `monitor_up`: QMP was connected (QEMU got as far as running the guest)."""
        if self.decided:  # a panic in its grace period: nothing more will come
            self.console.add(rest)
            self._over = True
            return
        if rest:
            new = len(self.console.add(rest))
            if self._search(new, now):
                return
        found = classify(self.console.text) or classify(self.firmware_log.text)
        if found:
            self.reason, self.detail = found
        elif not monitor_up and exit_status not in (None, 0):
            self.reason, self.detail = QEMU_FAILED, qemu_error or f"exit status {exit_status}"
        else:
            self.reason, self.detail = GUEST_STOPPED, "the guest powered off or reset without the expected output"
        self.ended_at, self._over = now, True

    # -- what the runner asks --------------------------------------------------------------------

    @property
    def decided(self) -> bool:
        """A match or a failure was seen (a panic may still be completing its message)."""
        return self._serial_match is not None or self._screen_line is not None or self.reason is not None

    def over(self, now: float) -> bool:
        """True when watching can stop: a verdict whose grace period (if any) is over, or the deadline."""
        if self._grace_until is not None and now >= self._grace_until:
            self._over = True
        if not self._over and now >= self.deadline:
            if not self.decided:
                self.reason = TIMEOUT
                self.detail = f"no match for {self.expect.pattern!r} within {self.timeout:g} s"
                self.ended_at = now
            self._over = True
        return self._over

    def line_open(self) -> bool:
        """The serial line with the match has not ended yet (its rest is worth a short wait)."""
        return self._serial_match is not None and not self.console.line_ended_after(self._serial_match[1])

    @property
    def passed(self) -> bool:
        return self._serial_match is not None or self._screen_line is not None

    @property
    def matched(self) -> str | None:
        """The whole line the expected text was found on."""
        if self._serial_match is not None:
            start, _end, text = self._serial_match
            return self.console.line_at(start, text)
        return self._screen_line

    @property
    def failure_detail(self) -> str | None:
        """For a panic, its message as complete as it arrived during the grace period."""
        if self.reason == KERNEL_PANIC:
            found = classify(self.console.text)
            if found:
                return found[1]
        return self.detail

    def seconds_to_result(self, now: float) -> float:
        return round((self.ended_at if self.ended_at is not None else now) - self.launched, 3)

    # -- inside ----------------------------------------------------------------------------------

    def _search(self, new: int, now: float) -> bool:
        window = self.console.window(new)
        m = self.expect.search(window)
        if not m:
            return False
        base = self.console.end - len(window)
        self._serial_match = (base + m.start(), base + m.end(), m.group(0))
        self.matched_on, self.ended_at, self._over = "serial", now, True
        return True

    def _fail(self, found: tuple[str, str] | None, now: float) -> None:
        if not found:
            return
        self.reason, self.detail = found
        self.ended_at = now
        if self.reason == KERNEL_PANIC:
            self._grace_until = now + PANIC_GRACE
        else:
            self._over = True
