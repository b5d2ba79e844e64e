#!/usr/bin/env python3
"""tiny-bios: an 8 MiB disk whose MBR boot code prints the marker on COM1 and powers off.

The 30 bytes of real-mode code are assembled here by hand (no nasm needed); the listing is below so
the bytes can be checked. The disk also has one MBR partition, so partition-aware tools see a
normal disk. Boots in well under a second under TCG."""
from __future__ import annotations

import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MARKER, MIB, make_sparse, write_at  # noqa: E402

NAME = "tiny-bios"
DISK_SIZE = 8 * MIB
MESSAGE = f"\r\n{MARKER} {NAME}\r\n".encode()

CODE_AT = 0x7C00
MSG_OFFSET = 30
CODE = bytes.fromhex(
    "FA"          # 00 cli
    "31C0"        # 01 xor ax, ax
    "8ED8"        # 03 mov ds, ax
    "FC"          # 05 cld
) + b"\xBE" + struct.pack("<H", CODE_AT + MSG_OFFSET) + bytes.fromhex(  # 06 mov si, message
    "BAF803"      # 09 mov dx, 0x3f8         ; COM1 data register (QEMU needs no UART set-up)
    "AC"          # 12 .next: lodsb
    "84C0"        # 13 test al, al
    "7403"        # 15 jz .off
    "EE"          # 17 out dx, al
    "EBF8"        # 18 jmp .next
    "BA0406"      # 20 .off: mov dx, 0x604    ; ACPI PM1a control (SeaBIOS puts PM base at 0x600)
    "B80020"      # 23 mov ax, 0x2000         ; SLP_EN with SLP_TYP 0 = S5: QEMU powers off
    "EF"          # 26 out dx, ax
    "F4"          # 27 .halt: hlt            ; if power-off did not happen, stop here
    "EBFD"        # 28 jmp .halt
)
assert len(CODE) == MSG_OFFSET


def boot_sector() -> bytes:
    mbr = bytearray(512)
    mbr[:len(CODE)] = CODE
    mbr[MSG_OFFSET:MSG_OFFSET + len(MESSAGE) + 1] = MESSAGE + b"\0"
    mbr[440:444] = struct.pack("<I", 0x494D474B)  # disk id "IMGK"
    first, count = 2048, DISK_SIZE // 512 - 2048
    # One active Linux partition; CHS fields are the "use LBA" values (0xFE/0xFF/0xFF).
    mbr[446:462] = bytes([0x80, 0xFE, 0xFF, 0xFF, 0x83, 0xFE, 0xFF, 0xFF]) + struct.pack("<II", first, count)
    mbr[510:512] = b"\x55\xAA"
    return bytes(mbr)


def inputs() -> list[str]:
    return []


def build(out_dir: str) -> str:
    path = os.path.join(out_dir, f"{NAME}.img")
    make_sparse(path, DISK_SIZE)
    write_at(path, 0, boot_sector())
    return path


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "."))
