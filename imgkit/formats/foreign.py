"""Foreign image formats: inspect their headers and refuse the hostile or malformed ones BEFORE
qemu ever opens the file (../shared guides security.md).

One job: inspect and refuse. Telling which format a file is: detect.py; reading the data:
qemu_image.py.

Refused: qcow2 backing files and backing-format extensions, the qcow2 external data file (incompatible
feature bit 2 or the data-file header extension), encrypted qcow2, VMDK descriptor files and embedded
descriptors naming anything but the single extent of a monolithicSparse/streamOptimized file or a
parent, VHD/VHDX differencing disks (parents), `json:` names, and anything whose header does not
parse within bounds (truncated, absurd sizes, tables outside the file). Layouts follow qemu's
docs/interop/qcow2.txt, Microsoft's VHD (2006) and MS-VHDX specifications, and VMware's Virtual Disk
Format 5.0; the checks mirror OpenStack's format_inspector (CVE-2024-32498).
"""
from __future__ import annotations

import os
import re
import stat
import struct
import uuid
from dataclasses import dataclass, field

from ..errors import InputError
from .detect import RefusedImage, refuse_json_name

MAX_VIRTUAL_SIZE = 1 << 46       # 64 TiB: beyond that a header is lying (qemu's own caps are larger)
MAX_QCOW2_L1_BYTES = 32 << 20    # qemu's QCOW_MAX_L1_SIZE
MAX_QCOW2_SNAPSHOTS = 65536      # qemu's QCOW_MAX_SNAPSHOTS


@dataclass
class ForeignImage:
    path: str
    format: str
    virtual_size: int
    file_size: int
    subformat: str | None = None
    details: dict = field(default_factory=dict)
    # Where the format's own map lies, as inspection found and bounded it (VHDX: VhdxLayout), so
    # no later reader parses the headers again. Not part of describe().
    layout: object = None
    # The descriptor inspection read. qemu gets this same descriptor (qemu_filename), never the
    # path again: a file swapped after inspection (a clean qcow2 replaced by one naming a backing
    # or data file) cannot change what qemu reads. Not part of describe(); close() releases it.
    fd: int = -1

    @property
    def qemu_filename(self) -> str:
        """The inspected file as qemu opens it: its inherited descriptor (pass_fds=[fd])."""
        if self.fd < 0:
            raise ValueError("this inspection holds no descriptor (closed)")
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict:
        return {"format": self.format, "subformat": self.subformat, "virtual_size": self.virtual_size,
                "file_size": self.file_size, **self.details}


# -- inspection -----------------------------------------------------------------------------------
_INSPECTORS = {}  # filled below the inspectors


def inspect(path: str, fmt: str) -> ForeignImage:
    """Check a foreign image before qemu opens it; raise RefusedImage if it is hostile or malformed.
    The file is opened once: the result holds that descriptor (ForeignImage.fd), and qemu must be
    given it (ForeignImage.qemu_filename with pass_fds), so qemu reads the bytes that were checked.
    The caller closes the result."""
    refuse_json_name(path)
    if fmt not in _INSPECTORS:
        raise InputError(f"{fmt}: not a foreign format imgkit inspects")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise InputError(f"{path}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedImage(f"{path}: refused: a {fmt} image must be a regular file")
        result = _INSPECTORS[fmt](_Reader(fd, st.st_size, path))
        result.fd = fd
        return result
    except BaseException:
        os.close(fd)
        raise


class _Reader:
    """Bounded reads: every read names what it wanted, and a read past the end is a refusal."""

    def __init__(self, fd: int, size: int, path: str):
        self.fd, self.size, self.path = fd, size, path

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RefusedImage(f"{self.path}: refused before qemu opens it: {what} lies outside the file (offset {offset}, "
                               f"{length} bytes, file is {self.size} bytes): truncated or malformed")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise RefusedImage(f"{self.path}: refused before qemu opens it: {what}: short read (truncated)")
        return data

    def refuse(self, why: str, hint: str | None = None):
        raise RefusedImage(f"{self.path}: refused before qemu opens it: {why}", hint=hint)


def _check_virtual_size(r: _Reader, size: int, fmt: str) -> None:
    if size <= 0 or size > MAX_VIRTUAL_SIZE:
        r.refuse(f"{fmt} header claims a virtual size of {size} bytes (absurd)")


# qcow2 (qemu docs/interop/qcow2.txt) ------------------------------------------------------------
QCOW2_INCOMPAT_DIRTY, QCOW2_INCOMPAT_CORRUPT, QCOW2_INCOMPAT_DATA_FILE = 1, 2, 4
QCOW2_INCOMPAT_COMPRESSION, QCOW2_INCOMPAT_EXTL2 = 8, 16
QCOW2_KNOWN_INCOMPAT = 0x1F
QCOW2_EXT_END, QCOW2_EXT_BACKING_FORMAT, QCOW2_EXT_DATA_FILE = 0, 0xE2792ACA, 0x44415441
QCOW2_EXT_FDE = 0x0537BE77


def _inspect_qcow2(r: _Reader) -> ForeignImage:
    h = r.read(0, 72, "qcow2 header")
    (magic, version, backing_off, backing_len, cluster_bits, vsize, crypt, l1_size, l1_off,
     rc_off, rc_clusters, nb_snap, snap_off) = struct.unpack(">4sIQIIQIIQQIIQ", h)
    if version not in (2, 3):
        r.refuse(f"qcow2 version {version} is not 2 or 3")
    if backing_off or backing_len:
        r.refuse("this qcow2 image names a backing file (a backing file can make qemu read any "
                 "file on this host)", hint="flatten it where it was made: qemu-img convert -O qcow2")
    if not 9 <= cluster_bits <= 21:
        r.refuse(f"qcow2 cluster_bits {cluster_bits} out of range 9..21")
    cluster = 1 << cluster_bits
    _check_virtual_size(r, vsize, "qcow2")
    if crypt:
        r.refuse("encrypted qcow2 images are not supported")
    if l1_size * 8 > MAX_QCOW2_L1_BYTES:
        r.refuse(f"qcow2 L1 table of {l1_size} entries exceeds qemu's 32 MiB cap")
    needed_l1 = -(-vsize // (cluster * (cluster // 8)))
    if l1_size < needed_l1:
        r.refuse(f"qcow2 L1 table has {l1_size} entries, the virtual size needs {needed_l1}")
    for what, off, length in (("L1 table", l1_off, l1_size * 8), ("refcount table", rc_off, rc_clusters * cluster)):
        if off % cluster or off + length > r.size or (length and off == 0):
            r.refuse(f"qcow2 {what} at {off} (+{length}) is misaligned or outside the file")
    if nb_snap > MAX_QCOW2_SNAPSHOTS or (nb_snap and (snap_off % 8 or snap_off >= r.size)):
        r.refuse(f"qcow2 snapshot table ({nb_snap} snapshots at {snap_off}) is out of bounds")
    header_len, incompat, compression = 72, 0, 0
    if version == 3:
        h3 = r.read(72, 32, "qcow2 version 3 header")
        incompat, compat, autoclear, refcount_order, header_len = struct.unpack(">QQQII", h3)
        if header_len < 104 or header_len > cluster or header_len % 8:
            r.refuse(f"qcow2 header_length {header_len} is invalid")
        if header_len > 104:
            compression = r.read(104, 1, "qcow2 compression type")[0]
        if refcount_order > 6:
            r.refuse(f"qcow2 refcount_order {refcount_order} out of range")
    if incompat & QCOW2_INCOMPAT_DATA_FILE:
        r.refuse("this qcow2 image keeps its data in an external data file (it can make qemu "
                 "read any file on this host)")
    if incompat & QCOW2_INCOMPAT_CORRUPT:
        r.refuse("this qcow2 image is marked corrupt", hint="repair it with qemu-img check -r all elsewhere")
    if incompat & ~QCOW2_KNOWN_INCOMPAT:
        r.refuse(f"qcow2 incompatible feature bits {incompat & ~QCOW2_KNOWN_INCOMPAT:#x} are unknown")
    if compression not in (0, 1):
        r.refuse(f"qcow2 compression type {compression} is unknown")
    # Header extensions: between the header and the end of the first cluster.
    pos, limit, extensions = header_len, min(cluster, r.size), []
    for _ in range(64):
        if pos + 8 > limit:
            r.refuse("qcow2 header extensions run past the first cluster (no end marker)")
        etype, elen = struct.unpack(">II", r.read(pos, 8, "qcow2 header extension"))
        if etype == QCOW2_EXT_END:
            break
        if pos + 8 + elen > limit:
            r.refuse(f"qcow2 header extension {etype:#x} runs past the first cluster")
        if etype == QCOW2_EXT_DATA_FILE:
            r.refuse("this qcow2 image names an external data file")
        if etype == QCOW2_EXT_BACKING_FORMAT:
            r.refuse("this qcow2 image carries a backing-format extension")
        if etype == QCOW2_EXT_FDE:
            r.refuse("encrypted qcow2 images are not supported")
        extensions.append(etype)
        pos += 8 + ((elen + 7) & ~7)
    else:
        r.refuse("qcow2 has too many header extensions")
    return ForeignImage(r.path, "qcow2", vsize, r.size, subformat=f"compat={'0.10' if version == 2 else '1.1'}",
                        details={"cluster_size": cluster, "compression_type": ("zlib", "zstd")[compression],
                                 "snapshots": nb_snap, "dirty": bool(incompat & QCOW2_INCOMPAT_DIRTY)})


# VHD (Microsoft Virtual Hard Disk Image Format Specification, 2006) --------------------------------
VHD_FIXED, VHD_DYNAMIC, VHD_DIFFERENCING = 2, 3, 4


def _vhd_checksum(footer: bytes, at: int) -> int:
    return ~sum(footer[:at] + b"\0\0\0\0" + footer[at + 4:]) & 0xFFFFFFFF


def _inspect_vhd(r: _Reader) -> ForeignImage:
    if r.size < 512:
        r.refuse("VHD file is shorter than its 512-byte footer")
    footer = r.read(r.size - 512, 512, "VHD footer")
    if not footer.startswith(b"conectix"):
        # A dynamic disk keeps a copy of the footer at offset 0; a missing tail footer means truncation.
        copy = r.read(0, 512, "VHD footer copy")
        if not copy.startswith(b"conectix"):
            r.refuse("VHD footer missing")
        footer = copy
        truncated = True
    else:
        truncated = False
    (cookie, features, version, data_off, _ts, creator_app, _cver, _cos, orig_size, cur_size, geometry,
     disk_type, checksum) = struct.unpack(">8sIIQI4sI4sQQIII", footer[:68])
    if checksum != _vhd_checksum(footer, 64):
        r.refuse("VHD footer checksum mismatch (damaged)")
    if version >> 16 != 1:
        r.refuse(f"VHD version {version:#x} is not 1.x")
    if disk_type == VHD_DIFFERENCING:
        r.refuse("this is a differencing VHD (it names a parent disk)",
                 hint="merge it into its parent where it was made")
    if disk_type not in (VHD_FIXED, VHD_DYNAMIC):
        r.refuse(f"VHD disk type {disk_type} is unknown")
    _check_virtual_size(r, cur_size, "VHD")
    details = {"creator": creator_app.decode("latin-1").strip("\0 ")}
    if disk_type == VHD_FIXED:
        if truncated or r.size - 512 < cur_size:
            r.refuse(f"fixed VHD holds {r.size - 512} bytes of data but claims {cur_size} (truncated)")
        return ForeignImage(r.path, "vhd", cur_size, r.size, "fixed", details)
    if truncated:
        r.refuse("dynamic VHD has no footer at its end (truncated)")
    dyn = r.read(data_off, 1024, "VHD dynamic disk header")
    (dcookie, _doff, table_off, _hver, max_entries, block_size) = struct.unpack(">8sQQIII", dyn[:36])
    if dcookie != b"cxsparse":
        r.refuse("VHD dynamic disk header missing")
    if block_size < 512 or block_size & (block_size - 1) or block_size > (256 << 20):
        r.refuse(f"VHD block size {block_size} is invalid")
    if max_entries * block_size < cur_size or max_entries > (MAX_VIRTUAL_SIZE // block_size) + 1:
        r.refuse(f"VHD block table of {max_entries} entries does not match the disk size")
    r.read(table_off, max_entries * 4, "VHD block allocation table")
    details["block_size"] = block_size
    return ForeignImage(r.path, "vhd", cur_size, r.size, "dynamic", details)


# VHDX (MS-VHDX) -------------------------------------------------------------------------------------
VHDX_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
VHDX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VHDX_LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
VHDX_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VHDX_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_MAX_ENTRIES = 2047


@dataclass(frozen=True)
class VhdxLayout:
    bat_offset: int
    bat_length: int
    block_size: int
    sector_size: int | None  # None: the logical sector size item is missing
    log_pending: bool  # a header names a log to replay: the BAT on disk may be stale


def _inspect_vhdx(r: _Reader) -> ForeignImage:
    r.read(0, 8, "VHDX file identifier")
    log_pending = False
    for hoff in (64 << 10, 128 << 10):
        header = r.read(hoff, 64, "VHDX header")
        if header[:4] != b"head":
            r.refuse(f"VHDX header at {hoff} missing")
        log_pending |= header[48:64] != bytes(16)  # LogGuid set: a log to replay
    regions = {}
    for roff in (192 << 10, 256 << 10):
        rt = r.read(roff, 64 << 10, "VHDX region table")
        sig, _crc, count = struct.unpack_from("<4sII", rt, 0)
        if sig != b"regi" or count > VHDX_MAX_ENTRIES:
            r.refuse(f"VHDX region table at {roff} is invalid")
        for i in range(count):
            guid, off, length, required = struct.unpack_from("<16sQII", rt, 16 + 32 * i)
            gid = uuid.UUID(bytes_le=guid)
            if off % (1 << 20) or length % (1 << 20) or off + length > r.size:
                r.refuse(f"VHDX region {gid} at {off} (+{length}) is misaligned or outside the file")
            if gid not in (VHDX_BAT, VHDX_METADATA) and required:
                r.refuse(f"VHDX requires unknown region {gid}")
            regions[gid] = (off, length)
        if regions:
            break
    if VHDX_BAT not in regions or VHDX_METADATA not in regions:
        r.refuse("VHDX lacks a BAT or metadata region")
    moff, mlen = regions[VHDX_METADATA]
    mt = r.read(moff, 64 << 10, "VHDX metadata table")
    sig, _res, count = struct.unpack_from("<8sHH", mt, 0)
    if sig != b"metadata" or count > VHDX_MAX_ENTRIES:
        r.refuse("VHDX metadata table is invalid")
    vsize = block_size = sector_size = None
    for i in range(count):
        guid, ioff, ilen, flags = struct.unpack_from("<16sIII", mt, 32 + 32 * i)
        gid = uuid.UUID(bytes_le=guid)
        if ioff + ilen > mlen or (ilen and ioff < (64 << 10)):
            r.refuse(f"VHDX metadata item {gid} lies outside its region")
        if gid == VHDX_PARENT_LOCATOR:
            r.refuse("this is a differencing VHDX (it names a parent disk)")
        if gid == VHDX_VIRTUAL_DISK_SIZE:
            (vsize,) = struct.unpack("<Q", r.read(moff + ioff, 8, "VHDX virtual disk size"))
        if gid == VHDX_LOGICAL_SECTOR_SIZE:
            (sector_size,) = struct.unpack("<I", r.read(moff + ioff, 4, "VHDX logical sector size"))
        if gid == VHDX_FILE_PARAMETERS:
            block_size, fp_flags = struct.unpack("<II", r.read(moff + ioff, 8, "VHDX file parameters"))
            if fp_flags & 2:
                r.refuse("this is a differencing VHDX (HasParent)")
            if block_size < (1 << 20) or block_size > (256 << 20) or block_size & (block_size - 1):
                r.refuse(f"VHDX block size {block_size} is invalid")
    if vsize is None or block_size is None:
        r.refuse("VHDX metadata lacks the virtual disk size or file parameters")
    _check_virtual_size(r, vsize, "VHDX")
    bat_offset, bat_length = regions[VHDX_BAT]
    return ForeignImage(r.path, "vhdx", vsize, r.size, None, {"block_size": block_size},
                        layout=VhdxLayout(bat_offset, bat_length, block_size, sector_size, log_pending))


# VMDK (VMware Virtual Disk Format 5.0) ----------------------------------------------------------------
VMDK_EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')
MAX_VMDK_DESCRIPTOR = 1 << 20


def _inspect_vmdk(r: _Reader) -> ForeignImage:
    head = r.read(0, min(r.size, 4), "VMDK magic")
    if head == b"COWD":
        r.refuse("VMDK3 (ESX COWD) sparse extents are not supported")
    if head != b"KDMV":
        r.refuse("this is a VMDK descriptor file: it names extent files outside itself",
                 hint="convert the VMDK to monolithicSparse or streamOptimized where it was made")
    h = r.read(0, 79, "VMDK sparse extent header")
    (_magic, version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd_off, overhead,
     _unclean, nl) = struct.unpack("<4sIIQQQQIQQQB4s", h[:77])
    (compress,) = struct.unpack_from("<H", h, 77)
    if version not in (1, 2, 3):
        r.refuse(f"VMDK sparse version {version} is unknown")
    if nl != b"\n \r\n":
        r.refuse("VMDK header newline check failed (damaged in text-mode transfer)")
    _check_virtual_size(r, capacity * 512, "VMDK")
    if grain < 1 or grain > 128 or grain & (grain - 1):
        r.refuse(f"VMDK grain size {grain} sectors is invalid")
    if gtes != 512:
        r.refuse(f"VMDK has {gtes} entries per grain table, expected 512")
    if compress not in (0, 1):
        r.refuse(f"VMDK compression algorithm {compress} is unknown")
    if not desc_off or not desc_size:
        r.refuse("VMDK sparse extent has no embedded descriptor (it is one extent of a larger disk)")
    if desc_size * 512 > MAX_VMDK_DESCRIPTOR:
        r.refuse(f"VMDK embedded descriptor of {desc_size * 512} bytes is too large")
    text = r.read(desc_off * 512, desc_size * 512, "VMDK embedded descriptor").split(b"\0", 1)[0]
    try:
        desc = text.decode("utf-8")
    except UnicodeDecodeError:
        r.refuse("VMDK descriptor is not text")
    create_type, extents = None, []
    for line in desc.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = VMDK_EXTENT_RE.match(line)
        if m:
            extents.append(m)
            continue
        if re.match(r"^(RW|RDONLY|NOACCESS)\b", line):
            r.refuse(f"VMDK extent line {line[:80]!r} does not parse")
        if not re.match(r"^[A-Za-z][\w.]*\s*=", line):
            r.refuse(f"VMDK descriptor line {line[:80]!r} does not parse")
        if "=" in line:
            key, _, value = line.partition("=")
            key, value = key.strip(), value.strip().strip('"')
            if key == "createType":
                create_type = value
            if key in ("parentFileNameHint",) or (key == "parentCID" and value.lower() != "ffffffff"):
                r.refuse("this VMDK names a parent disk")
    if create_type not in ("monolithicSparse", "streamOptimized"):
        r.refuse(f"VMDK createType {create_type!r}: only monolithicSparse and streamOptimized are accepted")
    if len(extents) != 1:
        r.refuse(f"VMDK descriptor names {len(extents)} extents; a monolithic VMDK has exactly one")
    ext = extents[0]
    name = ext.group(4) or ""
    if ext.group(3) != "SPARSE" or "/" in name or "\\" in name or name in ("", ".", "..") or ":" in name:
        r.refuse(f"VMDK extent line {ext.group(0)!r} names something other than this file itself")
    if int(ext.group(2)) != capacity:
        r.refuse("VMDK extent size does not match the header capacity")
    return ForeignImage(r.path, "vmdk", capacity * 512, r.size, create_type,
                        {"grain_size": grain * 512, "compressed": bool(compress)})


_INSPECTORS.update(qcow2=_inspect_qcow2, vhd=_inspect_vhd, vhdx=_inspect_vhdx, vmdk=_inspect_vmdk)
