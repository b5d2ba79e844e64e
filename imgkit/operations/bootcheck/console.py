"""What a guest shows, as text: the serial console (or firmware log) kept bounded and cleaned of
escape sequences, the messages that mean booting failed, and the VGA text screen decoded.
Pure: no QEMU and no I/O beyond appending the raw bytes to --console-log
(tests/test_bootcheck_console.py)."""
from __future__ import annotations

import re

from .result import BOOTLOADER_FAILED, KERNEL_PANIC, NO_BOOTABLE_DEVICE

TAIL_LINES = 20
CONSOLE_KEEP = 4 << 20       # characters of console text kept (the rest is dropped from the front)
SEARCH_OVERLAP = 4 << 10     # new text is searched together with the 4 KiB before it (lines split across reads)
VGA_TEXT = 0xB8000           # VGA text-mode buffer: 80x25 cells of (character, attribute)
VGA_COLUMNS, VGA_ROWS = 80, 25
# The monitor command that dumps the VGA text buffer (one 16-bit cell per character).
SCREEN_DUMP = f"xp /{VGA_COLUMNS * VGA_ROWS}hx {VGA_TEXT:#x}"
LINE_SHOWN = 200             # characters of a matched line put in the report

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


class Console:
    """Console text as it arrives: kept (bounded), cleaned of escape sequences, searched incrementally.
    Positions are also counted from the first character ever added (`dropped` + index), so a place
    found earlier stays findable after the front was dropped."""

    def __init__(self, log_path: str | None = None):
        self.text = ""
        self.dropped = 0          # characters dropped from the front so far
        self.log_path = log_path  # raw bytes are appended here as they arrive (--console-log)

    def add(self, raw: bytes) -> str:
        if self.log_path and raw:
            with open(self.log_path, "ab") as f:
                f.write(raw)
        chunk = ANSI.sub("", raw.decode("utf-8", "replace")).replace("\r\n", "\n").replace("\r", "\n")
        self.text += chunk
        if len(self.text) > CONSOLE_KEEP:
            self.dropped += len(self.text) - CONSOLE_KEEP
            self.text = self.text[-CONSOLE_KEEP:]
        return chunk

    @property
    def end(self) -> int:
        """The position just past the last character (counted from the first ever added)."""
        return self.dropped + len(self.text)

    def window(self, new: int) -> str:
        """What arrived last (`new` characters) with some context: searching only this keeps a long,
        chatty boot linear instead of rescanning the whole log on every read."""
        return self.text[-(SEARCH_OVERLAP + new):]

    def line_at(self, pos: int, fallback: str) -> str:
        """The whole line around position `pos`; `fallback` if it was dropped already."""
        index = pos - self.dropped
        return line_of(self.text, index, fallback) if index >= 0 else fallback

    def line_ended_after(self, pos: int) -> bool:
        return "\n" in self.text[max(0, pos - self.dropped):]

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        lines = [ln.rstrip() for ln in self.text.splitlines()]
        lines = [ln for ln in lines if ln.strip()]
        return lines[-n:]


def classify(text: str) -> tuple[str, str] | None:
    """(reason, the text that shows it) when `text` shows a failed boot."""
    return _first(FAILURE_PATTERNS, text)


def classify_screen(screen: str) -> tuple[str, str] | None:
    """The same for the VGA text screen, where boot-sector code prints its errors."""
    return _first(SCREEN_FAILURE_PATTERNS, screen)


def _first(patterns, text: str) -> tuple[str, str] | None:
    for pattern, reason in patterns:
        m = pattern.search(text)
        if m:
            return reason, m.group(0).strip()
    return None


def line_of(text: str, start: int, fallback: str) -> str:
    """The whole console line a match is on (what a human wants to see), capped."""
    begin = text.rfind("\n", 0, start) + 1
    end = text.find("\n", start)
    return text[begin:end if end >= 0 else len(text)].strip()[:LINE_SHOWN] or fallback


def screen_from_dump(out: str) -> str:
    """The VGA text screen as 25 lines, from the monitor's SCREEN_DUMP output (`addr: 0x0741 ...`):
    the low byte of each cell is the character. Meaningful while the guest is in text mode (BIOS,
    boot loaders, the Linux VGA console); in graphics mode the buffer holds stale or no text, which
    simply does not match."""
    chars = []
    for line in out.splitlines():
        for cell in line.partition(":")[2].split():
            code = int(cell, 16) & 0xFF
            chars.append(chr(code) if 32 <= code < 127 else " ")
    rows = ["".join(chars[i:i + VGA_COLUMNS]).rstrip() for i in range(0, len(chars), VGA_COLUMNS)]
    return "\n".join(rows)
