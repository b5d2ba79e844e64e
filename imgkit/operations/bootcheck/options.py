"""What a user asks of a boot check (the expected text, firmware, limits, outputs), checked once."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ...errors import InputError

# The vm-fixtures marker, a login prompt, or the rescue ISO's banner (imgkit/rescue/files/banner).
DEFAULT_EXPECT = r"IMGKIT-BOOT-OK|\blogin:\s*$|imgkit rescue \S+ ready"
DEFAULT_TIMEOUT = 120.0
DEFAULT_MEMORY = 512 << 20   # GRUB EFI wants more than 256 MiB to load a Debian kernel
MIN_MEMORY = 16 << 20
MAX_MEMORY = 64 << 30
MAX_TIMEOUT = 24 * 3600
FIRMWARES = ("auto", "bios", "uefi")


def check_firmware(firmware: str) -> None:
    if firmware not in FIRMWARES:
        raise InputError(f"--firmware {firmware!r}: expected auto, bios or uefi")


def check_memory(memory: int) -> None:
    if not (MIN_MEMORY <= memory <= MAX_MEMORY):
        raise InputError("--memory must be between 16 MiB and 64 GiB")


def check_output_path(path: str, option: str) -> None:
    """An output file of the check (--screenshot, --console-log, --junit) must be writable where it
    is named: said before the boot, not after minutes of it."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{option} {path}: {parent} is not a directory")
    if os.path.isdir(path):
        raise InputError(f"{option} {path}: is a directory")


@dataclass
class BootOptions:
    """Raises InputError on construction for anything unusable, before QEMU or the image is touched."""
    expect: str = DEFAULT_EXPECT
    firmware: str = "auto"
    timeout: float = DEFAULT_TIMEOUT
    memory: int = DEFAULT_MEMORY
    accel: str = "auto"
    screenshot: str | None = None    # PNG written when the check ends
    console_log: str | None = None   # the raw serial bytes are appended here
    expect_re: re.Pattern = field(init=False, repr=False)

    def __post_init__(self):
        self.expect = self.expect or DEFAULT_EXPECT
        try:
            self.expect_re = re.compile(self.expect, re.M)
        except re.error as e:
            raise InputError(f"--expect {self.expect!r} is not a valid regular expression: {e}") from None
        check_firmware(self.firmware)
        if not (0 < self.timeout <= MAX_TIMEOUT):
            raise InputError("--timeout must be between 0 and 86400 seconds")
        check_memory(self.memory)
        for path, option in ((self.screenshot, "--screenshot"), (self.console_log, "--console-log")):
            if path:
                check_output_path(path, option)
