"""The boot verdict from a scripted feed, no QEMU (imgkit/operations/bootcheck/judge.py): what the
runner hands the judge (serial bytes, firmware-log bytes, VGA screens, QEMU stopping) and when, and
the outcome that must come of it."""
from __future__ import annotations

import re

from imgkit.operations.bootcheck.judge import PANIC_GRACE, Judge
from imgkit.operations.bootcheck.options import DEFAULT_EXPECT
from imgkit.operations.bootcheck.result import (BOOTLOADER_FAILED, GUEST_STOPPED, KERNEL_PANIC,
                                                NO_BOOTABLE_DEVICE, QEMU_FAILED, TIMEOUT)

T0 = 1000.0   # the judge has no clock: times are whatever the runner says


def judge(timeout: float = 30.0, expect: str = DEFAULT_EXPECT) -> Judge:
    return Judge(re.compile(expect, re.M), T0, timeout)


def test_the_expected_text_split_across_reads_is_a_pass_with_its_whole_line():
    j = judge()
    j.serial(b"\x1b[2JSeaBIOS (version 1.16)\r\nBooting from Hard Disk...\r\nIMGKIT-BOO", T0 + 0.2)
    assert not j.decided and not j.over(T0 + 0.2)
    j.serial(b"T-OK tiny", T0 + 0.3)
    assert j.passed and j.over(T0 + 0.3) and j.matched_on == "serial"
    assert j.line_open()          # the runner waits briefly for the rest of the line
    j.serial(b"-bios\r\nmore", T0 + 0.4)
    assert not j.line_open()
    assert j.matched == "IMGKIT-BOOT-OK tiny-bios"
    assert j.seconds_to_result(T0 + 9) == 0.3 and j.reason is None


def test_a_login_prompt_matches_only_at_the_end_of_a_line():
    j = judge()
    j.serial(b"Debian GNU/Linux 12 host ttyS0\n\nhost login: ", T0 + 8)
    assert j.passed and j.matched == "host login:"
    j2 = judge()
    j2.serial(b"the login: prompt is printed later\n", T0 + 1)
    assert not j2.decided


def test_a_kernel_panic_waits_for_its_message_then_fails_whatever_follows():
    j = judge()
    j.serial(b"[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-bl", T0 + 5)
    assert j.decided and j.reason == KERNEL_PANIC
    assert not j.over(T0 + 5 + PANIC_GRACE / 2)   # the rest of the message may still come
    j.serial(b"ock(0,0)\r\n", T0 + 5.5)
    j.serial(b"login: \n", T0 + 5.6)                # too late: the verdict stands
    assert j.over(T0 + 5 + PANIC_GRACE)
    assert not j.passed and j.matched is None
    assert j.failure_detail == "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
    assert j.seconds_to_result(T0 + 99) == 5.0


def test_a_panic_just_before_the_deadline_stays_a_panic():
    j = judge(timeout=10)
    j.serial(b"Kernel panic - not syncing: Attempted to kill init!\n", T0 + 9.5)
    assert j.over(T0 + 10.2)
    assert j.reason == KERNEL_PANIC


def test_nothing_by_the_deadline_is_a_timeout_naming_the_pattern():
    j = judge(timeout=12, expect="READY")
    j.serial(b"still booting\n", T0 + 3)
    assert not j.over(T0 + 11.9)
    assert j.over(T0 + 12)
    assert j.reason == TIMEOUT and j.detail == "no match for 'READY' within 12 s"
    assert j.seconds_to_result(T0 + 50) == 12.0


def test_a_failure_in_the_firmware_log_ends_the_watch():
    j = judge()
    j.firmware(b"SeaBIOS (version 1.16.2)\nBooting from Hard Disk...\nBoot failed: not a bootable disk\n\n"
               b"No bootable device.\n", T0 + 0.4)
    assert j.over(T0 + 0.4) and j.reason == NO_BOOTABLE_DEVICE and j.detail == "No bootable device"
    assert j.firmware_log.tail(1) == ["No bootable device."]


def test_the_first_verdict_stands():
    j = judge()
    j.serial(b"error: file `/boot/vmlinuz' not found.\n", T0 + 2)
    j.serial(b"login: \n", T0 + 3)
    j.screen("login:", T0 + 3)
    assert j.reason == BOOTLOADER_FAILED and not j.passed


def test_the_text_screen_of_a_bios_guest_can_pass_or_fail():
    j = judge(expect="HELLO")
    j.screen("SeaBIOS\nBooting from Hard Disk...\nHELLO from the boot sector", T0 + 1)
    assert j.passed and j.matched_on == "screen" and j.matched == "HELLO from the boot sector"
    j2 = judge()
    j2.screen("Missing operating system", T0 + 1)
    assert j2.over(T0 + 1) and j2.reason == NO_BOOTABLE_DEVICE and not j2.passed


def test_qemu_stopping_is_judged_on_everything_it_wrote():
    j = judge()   # the last bytes arrive with the stop
    j.stopped(b"Welcome\r\nhost login: ", T0 + 4, 0, True, None)
    assert j.passed and j.matched == "host login:"

    j = judge()
    j.firmware(b"x" * 10, T0 + 1)
    j.serial(b"quiet guest\n", T0 + 1)
    j.stopped(b"", T0 + 2, 0, True, None)
    assert j.over(T0 + 2) and j.reason == GUEST_STOPPED

    j = judge()   # QEMU refused to start: the monitor never came up
    j.stopped(b"", T0 + 0.1, 1, False, "qemu-system-x86_64: -blockdev ...: Could not open 'x'")
    assert j.reason == QEMU_FAILED and "Could not open" in j.detail
    j = judge()
    j.stopped(b"", T0 + 0.1, 1, False, None)
    assert j.detail == "exit status 1"
    j = judge()   # an exit status after the guest ran is the guest stopping, not QEMU failing
    j.stopped(b"", T0 + 3, 1, True, "whatever")
    assert j.reason == GUEST_STOPPED


def test_a_panic_interrupted_by_qemu_stopping_keeps_what_arrived():
    j = judge()
    j.serial(b"Kernel panic - not syncing: Fatal exc", T0 + 1)
    j.stopped(b"eption\n", T0 + 1.1, 0, True, None)
    assert j.over(T0 + 1.1) and j.reason == KERNEL_PANIC
    assert j.failure_detail == "Kernel panic - not syncing: Fatal exception"
