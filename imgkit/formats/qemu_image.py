"""A foreign image (qcow2, VHD, VHDX, VMDK) read through qemu, as a Stream.

qemu-storage-daemon opens the file with an explicit driver chain given as JSON (file -> format,
read-only, `backing: null` where the format has backing files), after imgkit/formats/foreign.py
inspected the header, and exports it over NBD on a private unix socket. imgkit reads it with libnbd
(python3-libnbd), one connection per thread so capture's workers read in parallel, and builds runs()
from NBD block status (base:allocation), so unallocated and zero ranges are never read.

Chosen over qemu-nbd because qemu-storage-daemon takes the whole driver chain as explicit JSON (no
filename parsing). Fast path: `qemu-img map` (same explicit chain, Nova's limits: 30 s CPU, 1 GiB
address space) tells where uncompressed data sits in the file; those ranges are read with pread
straight from the image file (checked against its size), which measured ~5x faster than the NBD
round trip through qemu. Everything else (compressed clusters, formats whose map has no offsets)
goes through NBD.
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from typing import Iterator

from ..errors import BadImage, EnvironmentProblem, OperationFailed
from ..errors import ImgkitError
from ..platform.qemu_tools import (
    INFO_LIMITS,
    Limits,
    kill_group,
    limits_for_size,
    popen,
    run,
    wait_for_socket,
)
from ..stream import DATA, ZERO, Run, Stream, merge_runs
from .detect import QEMU_DRIVER, QEMU_FORMATS
from .foreign import ForeignImage

EXPORT_NAME = "disk"
MAX_NBD_READ = 32 << 20
STATUS_WINDOW = 1 << 30
NBD_STATE_ZERO = 2
MAX_MAP_OUTPUT = 256 << 20   # qemu-img map JSON; beyond that, read everything through NBD


def _import_nbd():
    try:
        import nbd  # python3-libnbd (Debian), for the system interpreter; the venv sees system packages
    except ImportError:
        raise EnvironmentProblem("the libnbd Python binding is missing (needed to read foreign images)",
                                 hint="apt-get install python3-libnbd") from None
    return nbd


def create_overlay(path: str, size: int, *, cluster: int | None = None, backing: str | None = None,
                   what: str = "qemu-img create (the overlay)") -> None:
    """A new, empty qcow2 of `size` bytes at `path`: imgkit's one `qemu-img create` (boot-check's and
    run's overlays and cache, run's --overlay and --mirror-to target, shrink's overlay). Formats are
    always explicit: -f qcow2, and `backing`, a name only recorded in the header, with -F raw and -u
    (never opened here; imgkit gives the backing node at run time, except libguestfs' qemu for
    shrink, which follows the name it was made with). Run by qemu_tools with its limits, locale and
    process group; a failure raises OperationFailed with qemu-img's own last line."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-u", "-b", backing, "-F", "raw"]
    if cluster:
        cmd += ["-o", f"cluster_size={cluster}"]
    run(cmd + [path, str(size)], what=what)


def format_node(path: str, fmt: str, *, fd: int | None = None, node_name: str | None = None,
                protocol: str = "file", writable: bool = False, own: bool = False, backing: str | None = None,
                flush: bool = True) -> dict:
    """The explicit qemu driver chain protocol -> `fmt` for `path`: nothing probed, and
    `backing: null` where the format can name a backing file (the inspector already refused those:
    belt and braces). Every qemu process imgkit starts on an image opens it through this.
    A foreign image is opened through `fd`, the descriptor its inspection read (foreign.inspect), as
    /proc/self/fd/N in the qemu process it is passed to: never by its path again, so a file swapped
    after inspection changes nothing qemu reads.

    protocol "nbd": `path` is the unix socket of an NBD export (an imgk image served by imgkit's own
    reader, views/nbd_export). `writable`: one of imgkit's own files (an overlay it created, a copy of
    the firmware's NVRAM, a scratch disk), never an image being read; `own`: the same kind of file
    opened read-only (shrink measuring its overlay). Only such a file may be opened by path in a
    foreign format, and may get its backing image as the node named `backing`, given at run time (the
    name in its header is never followed). `flush=False` ignores the guest's flushes on a writable
    scratch file nobody keeps after a host crash (what `-drive cache=unsafe` meant)."""
    own = own or writable
    if fmt in QEMU_FORMATS and fd is None and not own:
        raise ValueError(f"a {fmt} image reaches qemu only through its inspected descriptor")
    if backing is not None and not own:
        raise ValueError("only imgkit's own overlays get a backing node")
    if not flush and not writable:
        raise ValueError("flush=False is for writable scratch files")
    if protocol == "nbd":
        file = {"driver": "nbd", "server": {"type": "unix", "path": path}}
    else:
        file = {"driver": protocol, "filename": f"/proc/self/fd/{fd}" if fd is not None else os.path.abspath(path)}
    file["read-only"] = not writable
    node = {"driver": QEMU_DRIVER[fmt], "read-only": not writable, "file": file}
    if not flush:
        node["cache"] = file["cache"] = {"no-flush": True}
    if node_name:
        node["node-name"] = node_name
    if fmt in ("qcow2", "vmdk"):
        node["backing"] = backing
    return node


def file_protocol(path: str) -> str:
    """qemu's protocol driver for a local path: `file` for a regular file, `host_device` for a
    block device."""
    return "file" if os.path.isfile(path) else "host_device"


def filter_node(driver: str, node_name: str, over: str) -> dict:
    """A filter node (copy-on-read, ...) named `node_name` on top of the node named `over`: the one
    kind of block node that is not a protocol -> format chain, built here beside format_node so that
    every node imgkit gives qemu comes from this module."""
    return {"driver": driver, "node-name": node_name, "file": over}


def window_node(node_name: str, over: str, offset: int, size: int, *, writable: bool = False) -> dict:
    """`size` bytes at `offset` of the node named `over` as a disk of their own (a partition as a
    file: shrink's FUSE exports), read-only unless `writable`."""
    if offset < 0 or size <= 0:
        raise ValueError(f"window {offset}+{size}: not a byte range")
    return {"driver": "raw", "node-name": node_name, "file": over, "read-only": not writable,
            "offset": offset, "size": size}


def blockdev_args(inspected: ForeignImage) -> list[str]:
    """qemu-storage-daemon --blockdev options opening an inspected image as node "fmt0"."""
    return ["--blockdev", json.dumps(format_node(inspected.path, inspected.format, fd=inspected.fd,
                                                 node_name="fmt0"))]


def image_spec(inspected: ForeignImage) -> str:
    """The same chain as one qemu `json:` name (for qemu-img), built by imgkit, never taken from a
    user. The qemu-img process must inherit inspected.fd (pass_fds)."""
    return "json:" + json.dumps(format_node(inspected.path, inspected.format, fd=inspected.fd))


class HostMap:
    """Guest ranges stored uncompressed at a known offset of the image file (from qemu-img map)."""

    def __init__(self, extents: list[tuple[int, int, int]]):
        self.starts = [e[0] for e in extents]
        self.ends = [e[0] + e[1] for e in extents]
        self.hosts = [e[2] for e in extents]

    @classmethod
    def build(cls, inspected: ForeignImage, file_size: int, virtual_size: int) -> "HostMap":
        try:
            out = run(["qemu-img", "map", "--output=json", image_spec(inspected)], INFO_LIMITS,
                      what="qemu-img map", pass_fds=(inspected.fd,)).stdout
        except ImgkitError:
            return cls([])  # no fast path; NBD still reads everything
        if len(out) > MAX_MAP_OUTPUT:
            return cls([])
        extents = []
        for e in json.loads(out):
            start, length, host = e.get("start"), e.get("length"), e.get("offset")
            if not (e.get("data") and e.get("depth", 0) == 0 and isinstance(host, int)
                    and isinstance(start, int) and isinstance(length, int)):
                continue
            if start < 0 or length <= 0 or start + length > virtual_size or host < 0 or host + length > file_size:
                continue  # never trust a map entry that points outside the file
            extents.append((start, length, host))
        extents.sort()
        return cls(extents)

    def pieces(self, offset: int, end: int):
        """(start, end, host offset or None) covering [offset, end)."""
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        pos = offset
        while pos < end:
            if i < len(self.starts) and self.starts[i] <= pos < self.ends[i]:
                stop = min(end, self.ends[i])
                yield pos, stop, self.hosts[i] + (pos - self.starts[i])
                pos = stop
                i += 1
                continue
            if i < len(self.starts) and self.ends[i] <= pos:
                i += 1
                continue
            nxt = self.starts[i] if i < len(self.starts) else end
            stop = min(end, nxt)
            yield pos, stop, None
            pos = stop


def _stop_daemon(proc, timer, directory: str) -> None:
    if timer is not None:
        timer.cancel()
    if proc is not None:
        kill_group(proc)
    shutil.rmtree(directory, ignore_errors=True)


class QemuImage(Stream):
    """A foreign image as a Stream. Safe to read from several threads: each thread has its own NBD
    connection to qemu-storage-daemon, and the fast path is pread on the image file."""

    thread_safe = True
    _finalizer = None  # set once the daemon runs; close() of a half-made instance stops what started

    def __init__(self, path: str, fmt: str, inspected: ForeignImage, limits: Limits | None = None):
        self.path, self.format_name, self.inspected = path, fmt, inspected
        self._nbd = _import_nbd()
        self._dir = tempfile.mkdtemp(prefix="imgkit-qsd-")
        os.chmod(self._dir, 0o700)
        self.socket_path = os.path.join(self._dir, "nbd.sock")
        self._lock = threading.Lock()
        self._local = threading.local()
        self._handles: list = []
        self._runs: list[Run] | None = None
        self._proc = None
        self._timer = None
        self._fd = -1
        try:
            self._start(limits or limits_for_size(inspected.virtual_size))
            h = self._handle()
            self.size = h.get_size()
            try:
                self._align = max(1, min(4096, h.get_block_size(self._nbd.SIZE_MINIMUM) or 1))
            except (self._nbd.Error, AttributeError):
                self._align = 512
            self._fd = inspected.fd  # the fast path reads the inspected file too, not the path
            self.host_map, self._host_map_built = HostMap([]), False
        except BaseException:
            self.close()
            raise

    def _start(self, limits: Limits) -> None:
        argv = ["qemu-storage-daemon", *self._blockdev_args(),
                "--nbd-server", json.dumps({"addr": {"type": "unix", "path": self.socket_path}}),
                "--export", json.dumps({"type": "nbd", "id": "exp0", "node-name": "fmt0",
                                        "name": EXPORT_NAME, "writable": False})]
        # stderr to a file, not a pipe: nobody drains a pipe during a long capture, and a full pipe
        # would stall qemu.
        log_path = os.path.join(self._dir, "qsd.log")
        with open(log_path, "w") as log:
            self._proc = popen(argv, limits, stdout=subprocess.DEVNULL, stderr=log,
                               pass_fds=(self.inspected.fd,))
        try:
            wait_for_socket(self.socket_path, self._proc, log_path)
        except OperationFailed as e:
            if self._proc.poll() is None:
                raise
            # qemu refused the file: damaged beyond what imgkit's inspection checks (e.g. checksums)
            reason = str(e).split(": ", 1)[-1].rsplit(": ", 1)[-1]
            raise BadImage(f"{self.path}: qemu could not open it as {self.format_name}: {reason}") from None
        if limits.wall_seconds is not None:
            self._timer = threading.Timer(limits.wall_seconds, kill_group, args=(self._proc,))
            self._timer.daemon = True
            self._timer.start()
        # A stream nobody closed must not leave qemu-storage-daemon running: stop it when this
        # object is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop_daemon, self._proc, self._timer, self._dir)

    def _blockdev_args(self) -> list[str]:
        return blockdev_args(self.inspected)

    def _handle(self):
        h = getattr(self._local, "h", None)
        if h is None:
            h = self._nbd.NBD()
            h.set_export_name(EXPORT_NAME)
            h.add_meta_context("base:allocation")
            try:
                h.connect_unix(self.socket_path)
            except self._nbd.Error as e:
                raise BadImage(f"{self.path}: qemu could not open it as {self.format_name}: {e}") from None
            with self._lock:
                self._handles.append(h)
            self._local.h = h
        return h

    def _build_host_map(self) -> None:
        """Built when a consumer asks for runs() (capture, convert): a bulk read is coming. Small
        readers (info's partition probing) go through NBD and never pay for qemu-img map."""
        with self._lock:
            if self._host_map_built:
                return
            if self.format_name == "vhdx" and self.size == self.inspected.virtual_size:
                # qemu's VHDX driver has no block status: read the BAT
                from .vhdx_map import read_layout
                layout = read_layout(self.inspected)
                if layout is not None:
                    self._runs, extents = layout
                    self.host_map = HostMap(extents)
                    self._host_map_built = True
                    return
            self.host_map = HostMap.build(self.inspected, os.fstat(self._fd).st_size, self.size)
            self._host_map_built = True

    def describe(self) -> dict:
        return {"path": os.path.abspath(self.path), "kind": "image", "size": self.size,
                "format": self.format_name, "subformat": self.inspected.subformat,
                "file_size": self.inspected.file_size}

    def paths(self) -> list[str]:
        return [self.path]

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        parts = []
        for start, end, host in self.host_map.pieces(offset, offset + length):
            if host is not None:
                data = os.pread(self._fd, end - start, host)
                if len(data) != end - start:
                    raise BadImage(f"{self.path}: short read at file offset {host} (file changed?)")
                parts.append(data)
            else:
                parts.append(self._nbd_read(start, end - start))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _nbd_read(self, offset: int, length: int) -> bytes:
        """Through qemu; its export wants requests aligned to its minimum block size (512)."""
        h = self._handle()
        align = self._align
        lo = offset - offset % align
        hi = min(self.size, -(-(offset + length) // align) * align)
        parts = []
        try:
            for pos in range(lo, hi, MAX_NBD_READ):
                parts.append(h.pread(min(MAX_NBD_READ, hi - pos), pos))
        except self._nbd.Error as e:
            raise BadImage(f"{self.path}: qemu could not read {self.format_name} data at offset {offset}: "
                           f"{e} (damaged image?)") from None
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return bytes(data[offset - lo:offset - lo + length])  # libnbd hands out bytearrays

    def runs(self) -> Iterator[Run]:
        self._build_host_map()
        if self._runs is None:
            self._runs = list(merge_runs(self._allocation()))
        return iter(self._runs)

    def _allocation(self) -> Iterator[Run]:
        h = self._handle()
        if not h.can_meta_context("base:allocation"):
            yield Run(DATA, 0, self.size)
            return
        pos = 0
        while pos < self.size:
            found: list[Run] = []

            def collect(_context, offset, entries, _err, found=found):
                at = offset
                for i in range(0, len(entries) - 1, 2):
                    n, flags = entries[i], entries[i + 1]
                    found.append(Run(ZERO if flags & NBD_STATE_ZERO else DATA, at, n))
                    at += n
                return 0
            try:
                h.block_status(min(STATUS_WINDOW, self.size - pos), pos, collect)
            except self._nbd.Error as e:
                raise BadImage(f"{self.path}: qemu could not map {self.format_name} allocation: {e}") from None
            if not found:
                raise BadImage(f"{self.path}: qemu returned no allocation for offset {pos}")
            for r in found:
                end = min(r.end, self.size)
                if end > pos and r.offset <= pos:
                    yield Run(r.kind, pos, end - pos)
                    pos = end

    def close(self) -> None:
        self._fd = -1
        for h in self._handles:
            try:
                h.shutdown()
            except Exception:
                pass
        self._handles = []
        self._local = threading.local()
        if self._finalizer is not None:
            self._finalizer()
        else:
            _stop_daemon(self._proc, self._timer, self._dir)
        self._proc = None
        self.inspected.close()  # after qemu stopped: this stream owns the inspection's descriptor
