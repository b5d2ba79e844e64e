"""Opening images: which formats imgkit reads, how it tells them apart, and which Stream reads each.

This sits below the operations: capture, restore, convert, mount and boot-check get their Stream
here (imgkit/api.py only re-exports open_image for users). The three steps are
- detect: imgkit's own reading of the header (detect.detect_format), never qemu's guess;
- inspect: a foreign image's header is checked and refused if hostile (foreign.inspect) before qemu
  ever sees the file;
- open: the format's opener makes the Stream.
A new format is its reader module plus one entry in FORMATS.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..errors import BadImage, InputError
from ..stream import Stream
from ..remote.locations import is_rbd, is_s3
from . import detect as detection

Password = bytes | str | Callable[[], bytes | str] | None
PasswordProvider = Callable[[], bytes]


def password_provider(password: Password) -> PasswordProvider | None:
    """A callable asked for the password only when an image turns out to be encrypted."""
    if password is None:
        return None
    if callable(password):
        return lambda: _as_bytes(password())
    return lambda: _as_bytes(password)


def _as_bytes(p: bytes | str) -> bytes:
    return p.encode() if isinstance(p, str) else p


@dataclass(frozen=True)
class OpenRequest:
    password: PasswordProvider | None = None
    serving: bool = False  # the stream backs a mount: no CPU or time limit on helper processes
    base_dir: str | None = None  # where an incremental image's parents are, if not beside it


@dataclass(frozen=True)
class Format:
    name: str
    open: Callable[[str, OpenRequest], Stream]
    # qemu's driver for the file itself, when qemu may read it directly (boot-check of a foreign
    # image, qemu-img convert from a raw file); None: only imgkit reads it.
    qemu_driver: str | None = None
    # A foreign format qemu decodes for imgkit: inspected (and refused if hostile) before opening.
    via_qemu: bool = False
    # An optical disc image (ISO 9660): booted as a CD-ROM whatever its contents say.
    optical: bool = False


def _open_imgk(path: str, req: OpenRequest) -> Stream:
    from .imgk_chain import open_chain  # a child is read with its parents, as one Stream
    return open_chain(path, req.password, req.base_dir)


def _open_raw(path: str, req: OpenRequest) -> Stream:
    from .sources import RawSource
    return RawSource(path)


def _open_qemu(fmt: str) -> Callable[[str, OpenRequest], Stream]:
    def open_(path: str, req: OpenRequest) -> Stream:
        from ..platform.qemu_tools import SERVING_LIMITS
        from . import foreign  # the header inspectors: loaded only when a foreign image is opened
        from .qemu_image import QemuImage
        inspected = foreign.inspect(path, fmt)  # holds the descriptor qemu will read: QemuImage owns it
        try:
            return QemuImage(path, fmt, inspected, SERVING_LIMITS if req.serving else None)
        except BaseException:
            inspected.close()
            raise
    return open_


FORMATS: dict[str, Format] = {
    "imgk": Format("imgk", _open_imgk),
    "raw": Format("raw", _open_raw, qemu_driver="raw"),
    "iso": Format("iso", _open_raw, qemu_driver="raw", optical=True),
    **{f: Format(f, _open_qemu(f), qemu_driver=detection.QEMU_DRIVER[f], via_qemu=True)
       for f in detection.QEMU_FORMATS},
}


def detect(path: str) -> str:
    """The format of a local file or device, from its own bytes (a device is raw)."""
    return detection.detect_format(path) if os.path.isfile(path) else "raw"


def lookup(fmt: str) -> Format:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise InputError(f"unknown image format {fmt!r}", hint="formats: " + ", ".join(FORMATS)) from None


def open_image(path: str, password: Password = None, *, fmt: str | None = None,
               allow_raw: bool = True, serving: bool = False, base_dir: str | None = None) -> Stream:
    """Open any image imgkit reads as a Stream: imgk, raw (a file or block device), ISO, or a foreign
    qcow2/vhd/vhdx/vmdk image read through qemu; also an RBD image (`rbd:pool/image`) and an imgk
    image in S3 (`s3://...`). The format is `fmt` if given ("raw" always takes the bytes as they
    are), else imgkit's own reading of the header, never qemu's guess. A foreign image is inspected
    and refused (RefusedImage) before qemu opens it if it is hostile or malformed. With
    allow_raw=False, a file in no recognised format is refused instead of being taken as raw bytes.
    `serving`: the stream backs a mount, so the qemu process behind a foreign image gets no CPU or
    time limit (batch work keeps limits proportional to the disk size). An incremental imgk image
    opens with its parents, found next to it or in `base_dir` (imgk_chain.py)."""
    req = OpenRequest(password_provider(password), serving, base_dir)
    if is_rbd(path):  # a Ceph block image, read through librbd from a snapshot
        if fmt not in (None, "raw"):
            raise InputError(f"{path}: an RBD image is read as raw bytes, not {fmt}")
        from ..remote.rbd_image import RbdSource  # librados and librbd: only for rbd: images
        return RbdSource(path)
    if is_s3(path):  # an object store holds imgk images only (qemu does not read from S3)
        if fmt not in (None, "imgk"):
            raise InputError(f"{path}: only imgk images are read from S3, not {fmt}")
        return _open_imgk(path, req)  # a child's parents: objects beside it (or base_dir)
    detection.refuse_json_name(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or device")
    if os.path.isdir(path):  # said here: detection would take it for a raw "device"
        raise InputError(f"{path}: is a directory, not a disk or image file")
    explicit = fmt is not None
    fmt = fmt or detect(path)
    entry = lookup(fmt)
    if entry.open is _open_raw and not allow_raw and not explicit:
        raise BadImage(f"{path}: not an imgk image (no imgk magic at offset 0)")
    return entry.open(path, req)
