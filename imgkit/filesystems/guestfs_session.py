"""The libguestfs adapter: one read-only appliance over one disk, serving the files view.

The appliance is a small VM; the host kernel never mounts a filesystem from the image. The disk is
handed over read-only with an explicit format (never guessed) and no network. Calls on one handle
are serialised by a lock; the appliance is started on the first call (20-30 s under TCG) and is
always shut down and closed, even after an error. Everything it returns (names, link targets,
stat fields) is data from the image, i.e. untrusted: callers bound and filter it.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time

from ..platform.accel import choose_accel
from ..errors import EnvironmentProblem
from ..platform.qemu_tools import end_child
from ..views.vfs import LISTING_BATCH, FilesUnavailable
from .ext_extents import END_MARK

log = logging.getLogger("imgkit.guestfs")
MAX_PREAD = 2 << 20  # the appliance protocol caps one message at 4 MiB
# Text the appliance's shell may send back in one message (its protocol caps a message at 4 MiB):
# longer output is cut (`head -c`), and what was cut is noticed by the parsers (a last line without
# its newline, a section without its end mark).
MAX_SHELL_OUTPUT = 3 << 20
# How long the appliance may walk a filesystem for its list of regular files (~25 us an entry under
# TCG: a first read of a huge filesystem must not wait minutes). A line cut by the timeout is harmless:
# a map is used only for the inode number and size it was made for.
LIST_SECONDS = 20
MAX_MAP_BATCH = 4096  # inode numbers per debugfs run (~130 bytes of output each)
EXT_TYPES = {"ext2", "ext3", "ext4"}


class GuestfsSession:
    """Filesystems of `drive` (a raw disk file, or an NBD server with `protocol="nbd"`) mounted
    read-only inside the appliance at /<fs> (e.g. /p1), where `devices` maps fs -> partition number
    (0 = the whole disk)."""

    def __init__(self, drive: str, devices: dict[str, int], *, protocol: str | None = None,
                 server: list[str] | None = None):
        self.drive, self.devices = drive, dict(devices)
        self.protocol, self.server = protocol, server
        self._g = None
        self._lock = threading.Lock()
        self._mounted: dict[str, Exception | None] = {}
        self._ext_facts: dict[str, dict | None] = {}
        self._closed = False
        self.launch_seconds: float | None = None

    # life cycle -------------------------------------------------------------------------------
    def _handle(self):
        if self._closed:
            raise FilesUnavailable("the appliance was shut down")
        if self._g is not None:
            return self._g
        g, accel = new_handle()
        started = time.monotonic()
        try:
            g.set_autosync(False)  # read-only: nothing to sync, and no writes on shutdown
            opts = {"readonly": 1, "format": "raw"}
            if self.protocol:
                opts.update(protocol=self.protocol, server=self.server)
            g.add_drive_opts(self.drive, **opts)
            log.info("starting the libguestfs appliance (%s) on %s", accel, self.drive)
            g.launch()
        except Exception as e:  # GuestFSError or RuntimeError from the binding
            close_handle(g)
            raise FilesUnavailable(f"the libguestfs appliance did not start: {first_line(e)}",
                                   hint="run libguestfs-test-tool to see why") from None
        self.launch_seconds = time.monotonic() - started
        log.info("appliance up in %.1f s", self.launch_seconds)
        self._g = g
        return g

    def _mount(self, fs: str) -> str:
        where = "/" + fs
        if fs in self._mounted:
            if self._mounted[fs] is not None:
                raise FilesUnavailable(f"files/{fs}: {self._mounted[fs]}")
            return where
        if fs not in self.devices:
            raise FilesUnavailable(f"files/{fs}: unknown filesystem")
        g = self._handle()
        n = self.devices[fs]
        device = _device(n)
        self._ext_facts[fs] = self._read_ext_facts(g, device, n)  # before mounting: see there
        try:
            g.mkmountpoint(where)
            g.mount_ro(device, where)
            self._mounted[fs] = None
        except Exception as e:
            msg = first_line(e)
            self._mounted[fs] = FilesUnavailable(f"cannot mount {device} read-only: {msg}")
            log.error("files/%s: cannot mount %s: %s", fs, device, msg)
            raise self._mounted[fs]
        return where

    def _call(self, fs: str, path: str, fn):
        with self._lock:
            where = self._mount(fs)
            full = f"{where}/{path}" if path else where
            try:
                return fn(self._g, full)
            except RuntimeError as e:  # guestfs.GuestFSError derives from RuntimeError
                raise FilesUnavailable(f"files/{fs}/{path}: {first_line(e)}") from None

    def _read_ext_facts(self, g, device: str, n: int) -> dict | None:
        """An ext filesystem's superblock facts (tune2fs -l) and where the appliance's kernel sees its
        partition; None for other filesystems, {"error": why} when they could not be read (the
        daemon logs it: this process's log goes nowhere once the mount is a daemon). Read before the filesystem is mounted: mounting a filesystem with a
        journal to replay or orphans to clean up changes its superblock (in the appliance's overlay),
        and those are exactly the states in which the disk's blocks are not what the mount shows."""
        try:
            if g.vfs_type(device) not in EXT_TYPES:
                return None
            facts = {"tune2fs": g.tune2fs_l(device), "size": g.blockdev_getsize64(device), "start": 0}
            if n:
                # The partition's first sector as this kernel parsed the table (numbers only).
                facts["start"] = int(g.debug("sh", [f"cat /sys/class/block/sda{int(n)}/start"]).strip()) * 512
            return facts
        except (RuntimeError, ValueError) as e:  # no `debug` in this libguestfs, an odd answer
            return {"error": f"no superblock facts from the appliance ({first_line(e)[:200]})"}

    def _shell(self, fs: str, command: str) -> bytes:
        """Output of a shell command in the appliance (`debug sh`, present in Debian's libguestfs but
        not a stable API: a failure makes the caller fall back to pread). Commands are built from
        integers and imgkit's own names only, never from anything read from the image."""
        with self._lock:
            self._mount(fs)
            try:
                return self._g.debug("sh", [command]).encode("utf-8", "surrogateescape")
            except RuntimeError as e:
                raise FilesUnavailable(f"files/{fs}: appliance shell: {first_line(e)}") from None

    def ext_facts(self, fs: str) -> dict | None:
        with self._lock:
            self._mount(fs)
            return self._ext_facts.get(fs)

    def ext_regular_files(self, fs: str) -> bytes:
        """`inode size` of every regular file of an ext filesystem, one a line (numbers only: no names
        leave the appliance), then END_MARK, all cut at MAX_SHELL_OUTPUT (or the walk at
        LIST_SECONDS). Lets the files view map many neighbouring files in one debugfs run."""
        if not SAFE_FS.fullmatch(fs):
            raise FilesUnavailable(f"files/{fs}: unknown filesystem")
        return self._shell(fs, f"{{ timeout {LIST_SECONDS} find /sysroot/{fs} -xdev -type f -printf '%i %s\\n' "
                               f"2>/dev/null; "
                               f"echo '{END_MARK}'; }} | head -c {MAX_SHELL_OUTPUT}")

    def ext_extent_maps(self, fs: str, inodes: list[int]) -> bytes:
        """debugfs' leaf extents of these inodes (`ex -l <N>` each), closed by END_MARK; the device is
        read as the mounted filesystem left it (read-only, nothing replayed: see _read_ext_facts).
        END_MARK only when debugfs ended by itself: killed by the timeout (124) or a signal (>= 128),
        its last section may be cut mid-way and must not be taken as complete."""
        if not SAFE_FS.fullmatch(fs) or fs not in self.devices:
            raise FilesUnavailable(f"files/{fs}: unknown filesystem")
        numbers = [int(i) for i in inodes[:MAX_MAP_BATCH] if 0 < int(i) < 1 << 32]
        n = self.devices[fs]
        device = _device(n)
        return self._shell(fs, f"{{ printf 'ex -l <%d>\\n' {' '.join(map(str, numbers))} | "
                               f"timeout 60 debugfs -c -f - {device} 2>&1; [ $? -lt 124 ] && echo '{END_MARK}'; }} | head -c {MAX_SHELL_OUTPUT}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            g, self._g = self._g, None
        if g is not None:
            close_handle(g)

    # the FilesBackend interface (imgkit.views.vfs) --------------------------------------------------
    def root_stat(self, fs: str) -> dict:
        return self._call(fs, "", lambda g, p: g.lstatns(p))

    def listdir(self, fs: str, path: str) -> list[tuple[str, dict]]:
        def work(g, full):
            names = [e["name"] for e in g.readdir(full) if e["name"] not in (".", "..")]
            out = []
            for i in range(0, len(names), LISTING_BATCH):
                batch = names[i:i + LISTING_BATCH]
                out.extend(zip(batch, g.lstatnslist(full, batch)))
            return out
        return self._call(fs, path, work)

    def readlink(self, fs: str, path: str) -> str:
        return self._call(fs, path, lambda g, p: g.readlink(p))

    def pread(self, fs: str, path: str, size: int, offset: int) -> bytes:
        size = min(size, MAX_PREAD)
        return self._call(fs, path, lambda g, p: g.pread(p, size, offset))


SAFE_FS = re.compile(r"[a-z0-9]{1,16}")  # the files view's own names (p1, disk): safe in a command


def _device(n: int) -> str:
    """The appliance's name of partition n of its one disk (0: the whole disk)."""
    return "/dev/sda" if n == 0 else f"/dev/sda{int(n)}"


def new_handle():
    """(GuestFS handle, accel) set up the imgkit way: the direct backend, KVM or TCG as accel.py
    decides, no network. Not launched. Raises EnvironmentProblem without the Python binding."""
    try:
        import guestfs  # lazy: only what needs the appliance needs libguestfs at all
    except ImportError:
        raise EnvironmentProblem("the libguestfs Python binding is missing",
                                 hint="apt install python3-guestfs libguestfs-tools") from None
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    try:
        g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    except RuntimeError as e:  # the Debian binding raises RuntimeError
        raise EnvironmentProblem(f"libguestfs could not create a handle: {first_line(e)}") from None
    try:
        accel, why = choose_accel()
        log.info("accelerator %s: %s", accel, why)
        if accel == "tcg":
            g.set_backend_settings(["force_tcg"])
        g.set_network(False)
    except RuntimeError as e:
        close_handle(g)
        raise EnvironmentProblem(f"libguestfs handle setup failed: {first_line(e)}") from None
    except BaseException:
        close_handle(g)
        raise
    return g, accel


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libguestfs errors can be long, or empty)."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def close_handle(g) -> None:
    """Shut the appliance down and close the handle, best effort (never hides the first error)."""
    for step in (g.shutdown, g.close):
        try:
            step()
        except Exception as e:  # best effort: never let cleanup hide the original problem
            log.debug("guestfs %s: %s", step.__name__, e)


# -- the appliance in a helper process ------------------------------------------------------------
# The mount daemon cannot hold a guestfs handle itself: the appliance reads the daemon's own
# disk.raw, and some libguestfs calls (add_drive_opts checks the file) keep Python's GIL while they
# wait for that read, which the daemon's FUSE loop could then never answer. So the handle lives in a
# child process (python -m imgkit.filesystems.guestfs_session), spoken to over a pipe: length-prefixed JSON
# headers, raw bytes for file data. Guest data stays data on both sides of the pipe.

import json as _json
import struct as _struct
import subprocess as _subprocess
import sys as _sys

_FRAME = _struct.Struct("<I")
MAX_FRAME = 64 << 20


def _send(stream, header: dict, payload: bytes = b"") -> None:
    raw = _json.dumps(header).encode()
    stream.write(_FRAME.pack(len(raw)) + raw + _FRAME.pack(len(payload)) + payload)
    stream.flush()


def _recv(stream) -> tuple[dict, bytes] | None:
    def exact(n: int) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise EOFError
        return data
    try:
        (n,) = _FRAME.unpack(exact(_FRAME.size))
        if n > MAX_FRAME:
            raise EOFError
        header = _json.loads(exact(n))
        (m,) = _FRAME.unpack(exact(_FRAME.size))
        if m > MAX_FRAME:
            raise EOFError
        return header, exact(m)
    except EOFError:
        return None


_BYTES_OPS = {"pread", "ext_regular_files", "ext_extent_maps"}  # answered as raw bytes, not JSON


class GuestfsHelper:
    """A FilesBackend that runs a GuestfsSession in a child process (see above)."""

    def __init__(self, drive: str, devices: dict[str, int]):
        self._lock = threading.Lock()
        self._proc = _subprocess.Popen([_sys.executable, "-m", "imgkit.filesystems.guestfs_session", drive, _json.dumps(devices)],
                                       stdin=_subprocess.PIPE, stdout=_subprocess.PIPE, cwd="/",
                                       close_fds=True)

    def _ask(self, op: str, **args):
        with self._lock:
            if self._proc.poll() is not None:
                raise FilesUnavailable("the libguestfs helper process is gone")
            try:
                _send(self._proc.stdin, {"op": op, **args})
                reply = _recv(self._proc.stdout)
            except (BrokenPipeError, ValueError):
                reply = None
        if reply is None:
            raise FilesUnavailable("the libguestfs helper process died")
        header, payload = reply
        if "error" in header:
            cls = EnvironmentProblem if header.get("kind") == "EnvironmentProblem" else FilesUnavailable
            raise cls(header["error"], hint=header.get("hint"))
        return payload if op in _BYTES_OPS else header["result"]

    def root_stat(self, fs: str) -> dict:
        return self._ask("root_stat", fs=fs)

    def listdir(self, fs: str, path: str) -> list[tuple[str, dict]]:
        return [tuple(e) for e in self._ask("listdir", fs=fs, path=path)]

    def readlink(self, fs: str, path: str) -> str:
        return self._ask("readlink", fs=fs, path=path)

    def pread(self, fs: str, path: str, size: int, offset: int) -> bytes:
        return self._ask("pread", fs=fs, path=path, size=size, offset=offset)

    def ext_facts(self, fs: str) -> dict | None:
        return self._ask("ext_facts", fs=fs)

    def ext_regular_files(self, fs: str) -> bytes:
        return self._ask("ext_regular_files", fs=fs)

    def ext_extent_maps(self, fs: str, inodes: list[int]) -> bytes:
        return self._ask("ext_extent_maps", fs=fs, inodes=[int(i) for i in inodes])

    def close(self, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc.poll() is None:
            try:
                with self._lock:
                    _send(proc.stdin, {"op": "close"})
            except (BrokenPipeError, ValueError, OSError):
                pass
        end_child(proc, timeout)


def _serve_helper(drive: str, devices: dict[str, int]) -> int:
    from ..errors import ImgkitError
    session = GuestfsSession(drive, devices)
    inp = _sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # nothing but frames on the pipe, whatever libguestfs or qemu print
    _sys.stdout = _sys.stderr
    try:
        while True:
            msg = _recv(inp)
            if msg is None or msg[0].get("op") == "close":
                return 0
            req = msg[0]
            try:
                op = req["op"]
                if op == "pread":
                    _send(out, {"result": None}, session.pread(req["fs"], req["path"], int(req["size"]),
                                                               int(req["offset"])))
                    continue
                if op == "ext_regular_files":
                    _send(out, {"result": None}, session.ext_regular_files(req["fs"]))
                    continue
                if op == "ext_extent_maps":
                    _send(out, {"result": None}, session.ext_extent_maps(req["fs"], list(req["inodes"])))
                    continue
                if op == "root_stat":
                    result = session.root_stat(req["fs"])
                elif op == "listdir":
                    result = session.listdir(req["fs"], req["path"])
                elif op == "readlink":
                    result = session.readlink(req["fs"], req["path"])
                elif op == "ext_facts":
                    result = session.ext_facts(req["fs"])
                else:
                    raise FilesUnavailable(f"unknown request {op!r}")
                _send(out, {"result": result})
            except ImgkitError as e:
                _send(out, {"error": str(e), "hint": e.hint, "kind": type(e).__name__})
    finally:
        session.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="imgkit-guestfs[%(process)d] %(message)s")
    _sys.exit(_serve_helper(_sys.argv[1], _json.loads(_sys.argv[2])))
