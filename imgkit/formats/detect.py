"""Which format an image file is: the names imgkit knows, the extensions that name them, and
imgkit's own reading of the magic bytes (never qemu's guess). Every open needs this; only a foreign
image needs its header inspected (foreign.py, imported when one is opened: the inspectors are most of
its import time, which opening an imgk or raw image does not pay)."""
from __future__ import annotations

import os
import stat

from ..errors import BadImage
from . import imgk_layout

FORMATS = ("imgk", "raw", "iso", "qcow2", "vhd", "vhdx", "vmdk")
QEMU_FORMATS = ("qcow2", "vhd", "vhdx", "vmdk")
QEMU_DRIVER = {"qcow2": "qcow2", "vhd": "vpc", "vhdx": "vhdx", "vmdk": "vmdk", "raw": "raw", "iso": "raw"}
EXTENSIONS = {".imgk": "imgk", ".img": "raw", ".raw": "raw", ".bin": "raw", ".iso": "iso", ".qcow2": "qcow2",
              ".qcow": "qcow2", ".vhd": "vhd", ".vpc": "vhd", ".vhdx": "vhdx", ".vmdk": "vmdk"}
HEADER_READ = 64 << 10


class RefusedImage(BadImage):
    """A foreign image imgkit will not hand to qemu (hostile or malformed)."""


def refuse_json_name(path: str) -> None:
    if path.startswith("json:"):
        raise RefusedImage(f"{path[:40]}: refused: a json: name is a qemu option string, not a file",
                           hint="give the path of an image file")


def format_from_extension(path: str) -> str | None:
    return EXTENSIONS.get(os.path.splitext(path)[1].lower())


def detect_format(path: str) -> str:
    """The format of a file from its own bytes (never qemu's guess). Block devices are raw disks."""
    refuse_json_name(path)
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return "raw"
    with open(path, "rb") as f:
        head = f.read(HEADER_READ)
        size = os.fstat(f.fileno()).st_size
        tail = b""
        if size >= 512:
            f.seek(size - 512)
            tail = f.read(512)
        iso = b""
        if size >= 0x8006:
            f.seek(0x8001)
            iso = f.read(5)
    try:
        return detect_bytes(head, tail, iso)
    except RefusedImage as e:
        raise RefusedImage(f"{path}: refused: {e}", hint=e.hint) from None


def detect_bytes(head: bytes, tail: bytes, iso: bytes) -> str:
    if head.startswith(imgk_layout.MAGIC):
        return "imgk"
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head.startswith(b"KDMV") or head.startswith(b"COWD") or _looks_like_vmdk_descriptor(head):
        return "vmdk"
    if head.startswith(b"conectix") or tail.startswith(b"conectix"):
        return "vhd"
    for magic, name in ((b"QFI\xfe", "qcow (version 1)"), (b"QED\0", "QED"), (b"LUKS\xba\xbe", "LUKS"),
                        (b"WithoutFreeSpace", "Parallels"), (b"cloop", "cloop")):
        if head.startswith(magic):
            raise RefusedImage(f"this is a {name} image, a format imgkit does not convert",
                               hint="use --from raw to take its bytes as they are")
    if len(head) >= 0x44 and head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        raise RefusedImage("this is a VDI image, a format imgkit does not convert",
                           hint="use --from raw to take its bytes as they are")
    if iso == b"CD001":
        return "iso"
    return "raw"


def _looks_like_vmdk_descriptor(head: bytes) -> bool:
    text = head[:4096].lstrip()
    return text.startswith(b"# Disk DescriptorFile") or (
        text.startswith(b"version=") and b"createType" in text[:1024])
