"""Console watching without QEMU: what bootcheck's console keeps and finds in the bytes a guest writes
(escape sequences stripped, lines split across reads, the failure a console shows, a bounded log)."""
from __future__ import annotations

from imgkit.operations import bootcheck as B


def test_console_strips_escapes_and_joins_lines_split_across_reads(tmp_path):
    log = tmp_path / "console.log"
    c = B._Console(str(log))
    c.add(b"\x1b[2J\x1b[1;1HSeaBIOS (version 1.16)\r\nBooting from Hard Disk...\r\nKernel pa")
    new = c.add(b"nic - not syncing: VFS: Unable to mount root fs\r\n")
    assert "\x1b" not in c.text and "\r" not in c.text
    assert B._classify(c.window(len(new))) == (B.KERNEL_PANIC,
                                                "Kernel panic - not syncing: VFS: Unable to mount root fs")
    assert c.tail(2) == ["Booting from Hard Disk...", "Kernel panic - not syncing: VFS: Unable to mount root fs"]
    assert log.read_bytes().startswith(b"\x1b[2J")  # --console-log keeps the raw bytes


def test_each_failure_a_console_can_show_is_classified():
    assert B._classify("No bootable device.")[0] == B.NO_BOOTABLE_DEVICE
    assert B._classify("BdsDxe: No bootable option or device was found.")[0] == B.NO_BOOTABLE_DEVICE
    assert B._classify("error: file `/boot/vmlinuz' not found.\n")[0] == B.BOOTLOADER_FAILED
    assert B._classify("Welcome to GRUB!\nlogin: ") is None


def test_the_kept_console_is_bounded():
    c = B._Console()
    for _ in range(3):
        c.add(b"x" * (B.CONSOLE_KEEP // 2))
    assert len(c.text) == B.CONSOLE_KEEP
    assert len(c.window(10)) == B.SEARCH_OVERLAP + 10
