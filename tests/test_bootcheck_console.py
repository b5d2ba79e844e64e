"""Console watching without QEMU (imgkit/operations/bootcheck/console.py): what boot-check's console
keeps and finds in the bytes a guest writes (escape sequences stripped, lines split across reads, the
failure a console shows, a bounded log, the VGA text screen)."""
from __future__ import annotations

from imgkit.operations.bootcheck import console as C
from imgkit.operations.bootcheck.result import BOOTLOADER_FAILED, KERNEL_PANIC, NO_BOOTABLE_DEVICE


def test_console_strips_escapes_and_joins_lines_split_across_reads(tmp_path):
    log = tmp_path / "console.log"
    c = C.Console(str(log))
    c.add(b"\x1b[2J\x1b[1;1HSeaBIOS (version 1.16)\r\nBooting from Hard Disk...\r\nKernel pa")
    new = c.add(b"nic - not syncing: VFS: Unable to mount root fs\r\n")
    assert "\x1b" not in c.text and "\r" not in c.text
    assert C.classify(c.window(len(new))) == (KERNEL_PANIC,
                                              "Kernel panic - not syncing: VFS: Unable to mount root fs")
    assert c.tail(2) == ["Booting from Hard Disk...", "Kernel panic - not syncing: VFS: Unable to mount root fs"]
    assert log.read_bytes().startswith(b"\x1b[2J")  # --console-log keeps the raw bytes


def test_each_failure_a_console_can_show_is_classified():
    assert C.classify("No bootable device.")[0] == NO_BOOTABLE_DEVICE
    assert C.classify("BdsDxe: No bootable option or device was found.")[0] == NO_BOOTABLE_DEVICE
    assert C.classify("error: file `/boot/vmlinuz' not found.\n")[0] == BOOTLOADER_FAILED
    assert C.classify("Welcome to GRUB!\nlogin: ") is None


def test_the_kept_console_is_bounded():
    c = C.Console()
    for _ in range(3):
        c.add(b"x" * (C.CONSOLE_KEEP // 2))
    assert len(c.text) == C.CONSOLE_KEEP
    assert len(c.window(10)) == C.SEARCH_OVERLAP + 10


def test_positions_survive_the_front_being_dropped():
    c = C.Console()
    c.add(b"boot line one\nlogin: ")
    pos = c.end - len("login: ")
    c.add(b"y" * C.CONSOLE_KEEP)  # pushes the whole first text out of the kept window
    assert c.dropped == len("boot line one\nlogin: ")
    assert c.line_at(pos, "login:") == "login:"   # dropped: the fallback, not a wrong line
    c2 = C.Console()
    c2.add(b"first\nsecond half")
    assert c2.line_at(len("first\nsec"), "x") == "second half"
    assert not c2.line_ended_after(len("first\n"))
    c2.add(b" done\n")
    assert c2.line_ended_after(len("first\n"))


def test_the_vga_screen_is_decoded_from_the_monitor_dump():
    # What `xp /2000hx 0xb8000` prints: an address, then 16-bit cells (attribute high, character low).
    cells = [0x0700 | ord(ch) for ch in "Missing operating system"] + [0x0700] * (C.VGA_COLUMNS - 24)
    cells += [0x1F00 | ord("A"), 0x0700 | 0x01]  # a coloured letter and a control character
    out = "\n".join(f"{0xb8000 + i * 2:016x}: " + " ".join(f"0x{c:04x}" for c in cells[i:i + 8])
                    for i in range(0, len(cells), 8))
    screen = C.screen_from_dump(out)
    assert screen.splitlines() == ["Missing operating system", "A"]
    assert C.classify_screen(screen) == (NO_BOOTABLE_DEVICE, "Missing operating system")
    assert C.classify_screen("NTLDR is missing")[0] == BOOTLOADER_FAILED
    assert C.classify_screen("GRUB loading.\nWelcome") is None
