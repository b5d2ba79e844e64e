"""What a boot check reports: BootResult, and the reasons a boot can fail."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

PASS = None
NO_BOOTABLE_DEVICE = "no bootable device"
KERNEL_PANIC = "kernel panic"
TIMEOUT = "timeout"
BOOTLOADER_FAILED = "bootloader failed"
GUEST_STOPPED = "guest stopped"
QEMU_FAILED = "qemu failed"
REASONS = (NO_BOOTABLE_DEVICE, KERNEL_PANIC, TIMEOUT, BOOTLOADER_FAILED, GUEST_STOPPED, QEMU_FAILED)


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
