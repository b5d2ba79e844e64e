"""The mount operation: check the mount point and FUSE, open the image (asking the password once),
build its tree, then serve it through imgkit_fuse, by default from a daemon that reports back
through a pipe only once the mount is live. And its inverse, unmount, which also cleans up the
stale mount a killed daemon leaves behind."""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import logging.handlers
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from ..views.caching_reader import CachingReader
from ..formats.registry import open_image
from .info import image_info
from ..platform.parallel import share_one_heap
from ..errors import EnvironmentProblem, ImgkitError, InputError, OperationFailed
from ..remote.locations import is_s3
from ..views.vfs import ImageTree
from ..platform.blockdev import mountinfo
from ..platform.writeback import replace_small_file

log = logging.getLogger("imgkit.operations.mount")
DEFAULT_CACHE = 64 << 20
# How far ahead of a sequential reader (cp, dd of disk.raw) chunks are decoded, within the cache: deep
# enough that both cores keep decoding while the kernel copies pages and the reader writes them out.
READ_AHEAD = 16 << 20


# -- mount table --------------------------------------------------------------------------------
@dataclass
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str  # major:minor


def find_mount(mountpoint: str) -> MountEntry | None:
    """The last (topmost) mount on this path in /proc/self/mountinfo."""
    target = os.path.abspath(mountpoint)
    names = (target, os.path.realpath(target))
    found = None
    for e in mountinfo():
        if e.mount_point in names:
            found = MountEntry(e.mount_point, e.fstype, e.source, e.device)
    return found


def _runtime_file(mountpoint: str) -> str:
    base = "/run/imgkit" if os.geteuid() == 0 else os.path.join(
        os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/imgkit-{os.getuid()}")
    key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:20]
    return os.path.join(base, "mounts", key + ".json")


def _daemon_pid(mountpoint: str) -> int | None:
    try:
        with open(_runtime_file(mountpoint)) as f:
            pid = int(json.load(f)["pid"])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"imgkit" not in f.read():
                return None  # the pid was reused by something else
        return pid
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- checks -------------------------------------------------------------------------------------
def check_mountpoint(mountpoint: str) -> str:
    path = os.path.abspath(mountpoint)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{mountpoint}: no such directory", hint=f"create it: mkdir -p {mountpoint}") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise InputError(f"{mountpoint}: a stale FUSE mount is in the way (its daemon died)",
                             hint=f"clean it up with: imgkit umount {mountpoint}") from None
        raise InputError(f"{mountpoint}: {e.strerror}") from None
    import stat as _stat
    if not _stat.S_ISDIR(st.st_mode):
        raise InputError(f"{mountpoint}: not a directory")
    if os.path.ismount(path) or find_mount(path) is not None:
        raise InputError(f"{mountpoint}: already a mount point (busy)",
                         hint=f"unmount it first (imgkit umount {mountpoint}) or choose another directory")
    return path


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise EnvironmentProblem("/dev/fuse does not exist: FUSE is not available here",
                                 hint="load the module (modprobe fuse) and install fuse3; in a container, "
                                      "pass --device /dev/fuse")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as e:
        raise EnvironmentProblem(f"FUSE is not permitted: /dev/fuse: {e.strerror}",
                                 hint="run as root, or add your user to the group that owns /dev/fuse") from None
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        raise EnvironmentProblem("fusermount3 is missing (needed to mount as a non-root user)",
                                 hint="apt install fuse3")


# -- mount --------------------------------------------------------------------------------------
def build_tree(image: str, mountpoint: str, password, cache_size: int) -> ImageTree:
    """Open the image (asks the password now, before any daemon exists) and describe it."""
    img = open_image(image, password, serving=True)
    try:
        ahead = max(img.read_ahead_bytes, READ_AHEAD) if img.read_ahead_bytes else 0
        disk = CachingReader(img, cache_size, read_ahead_bytes=ahead)
        info = image_info(disk)
        disk.clear()  # what reading the partition table cached will not be read again
        mtime = img.mtime_ns or os.stat(image).st_mtime_ns
        disk_path = os.path.join(mountpoint, "disk.raw")

        def files_backend(devices):
            from ..filesystems.guestfs_session import GuestfsHelper
            # The appliance reads our own disk.raw, served by this daemon (see docs/mount.md), from
            # a helper process that owns the guestfs handle.
            return GuestfsHelper(disk_path, devices)

        return ImageTree(disk, info, cache_bytes=cache_size, files_backend=files_backend, mtime_ns=mtime)
    except BaseException:
        img.close()
        raise


def _opens_in_process(image: str) -> bool:
    from ..formats.registry import detect, lookup
    return not lookup(detect(image)).via_qemu  # a device is raw


def _setup_logging(log_file: str | None, foreground: bool, debug: bool) -> None:
    root = logging.getLogger("imgkit")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s imgkit[%(process)d] %(levelname)s %(message)s")
    handler: logging.Handler | None = None
    if log_file:
        handler = logging.FileHandler(log_file)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log")
            fmt = logging.Formatter("imgkit[%(process)d]: %(message)s")
        except OSError:
            handler = None
    if handler is not None:
        handler.setFormatter(fmt)
        root.addHandler(handler)


def _write_runtime_file(mountpoint: str, image: str) -> str:
    path = _runtime_file(mountpoint)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    replace_small_file(path, json.dumps({"pid": os.getpid(), "mountpoint": mountpoint,
                                         "image": image if is_s3(image) else os.path.abspath(image)}),
                       mode=0o600)
    return path


def mount(image: str, mountpoint: str, *, password=None, foreground: bool = False, allow_other: bool = False,
          cache_size: int = DEFAULT_CACHE, log_file: str | None = None, debug: bool = False) -> int:
    """Mount `image` read-only at `mountpoint`. Returns the daemon's pid once the mount is live
    (or, with foreground, serves until unmounted and returns 0)."""
    path = check_mountpoint(mountpoint)
    check_fuse()
    if log_file:
        log_file = os.path.abspath(log_file)
    if not is_s3(image):
        image = os.path.abspath(image)
    if _opens_in_process(image):
        tree = build_tree(image, path, password, cache_size)  # errors and the password prompt: here
    else:
        # A foreign image is read through a qemu-storage-daemon child with worker threads: it must
        # be started by the process that serves it, after the fork. Check that it opens first, so
        # a refused or damaged image is an error here, not in the daemon's log.
        open_image(image, password).close()
        tree = functools.partial(build_tree, image, path, password, cache_size)
    if foreground:
        tree = tree() if callable(tree) else tree
        _setup_logging(log_file, True, debug)
        runtime = _write_runtime_file(path, image)
        try:
            _serve(tree, path, allow_other, None)
        finally:
            _remove(runtime)
        return 0
    return _daemonize(tree, image, path, allow_other, log_file, debug)


def _serve(tree: ImageTree, path: str, allow_other: bool, on_ready) -> None:
    from imgkit_fuse import serve
    share_one_heap()  # before the FUSE loop's and the read-ahead's threads exist
    try:
        serve(tree, path, allow_other=allow_other, on_ready=on_ready)
    except RuntimeError as e:  # pyfuse3.init: fuse_session_mount failed (libfuse printed why)
        raise EnvironmentProblem(f"the kernel refused the FUSE mount on {path}: {e}",
                                 hint="is FUSE permitted here (root, or user_allow_other for --allow-other)?") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _daemonize(tree, image: str, path: str, allow_other: bool, log_file: str | None,
               debug: bool) -> int:
    # Fork before any thread exists (trio, worker threads and the appliance all start in the child)
    # and report back through a pipe, so `imgkit mount` returns only when the mount is live.
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        runtime = None
        try:
            os.close(r)
            os.setsid()
            os.chdir("/")  # never keep a directory (or a filesystem) busy
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            _setup_logging(log_file, False, debug)
            runtime = _write_runtime_file(path, image)
            if callable(tree):
                tree = tree()

            def ready():
                os.write(w, b"OK\n")
                os.close(w)
                os.dup2(devnull, 1)  # detach from the terminal only now: libfuse's own errors
                os.dup2(devnull, 2)  # during the mount reached the user
                log.info("mounted %s on %s", image, path)

            _serve(tree, path, allow_other, ready)
            code = 0
        except BaseException as e:
            message = str(e) if isinstance(e, ImgkitError) else f"{type(e).__name__}: {e}"
            hint = (e.hint if isinstance(e, ImgkitError) else None) or ""
            try:
                os.write(w, f"ERR\t{type(e).__name__}\t{message}\t{hint}\n".encode())
            except OSError:
                pass
            if logging.getLogger("imgkit").handlers:
                log.error("the mount daemon failed: %s", message, exc_info=debug)
        finally:
            if runtime:
                _remove(runtime)
            os._exit(code)
    os.close(w)
    if not callable(tree):
        tree.disk.stream.close()  # the daemon owns the image now
    chunks = []
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    reply = b"".join(chunks).decode(errors="replace")
    if reply.startswith("OK"):
        return pid
    os.waitpid(pid, 0)
    if reply.startswith("ERR\t"):
        _, kind, message, hint = (reply.rstrip("\n").split("\t") + ["", "", ""])[:4]
        cls = EnvironmentProblem if kind in ("EnvironmentProblem", "RuntimeError") else InputError
        raise cls(message, hint=hint or None)
    raise EnvironmentProblem("the mount daemon exited before the mount was ready",
                             hint="run with --foreground --debug to see why")


# -- unmount ------------------------------------------------------------------------------------
def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_unmounted(path: str, timeout: float, pid: int | None = None) -> bool:
    """Until the mount is gone, or its daemon exited without removing it (e.g. the mount was busy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if find_mount(path) is None:
            return True
        if pid is not None and _pid_gone(pid):
            break
        time.sleep(0.05)
    return find_mount(path) is None


def _fusermount(path: str, lazy: bool) -> tuple[bool, str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [path]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode == 0, proc.stderr.strip()


def unmount(mountpoint: str, timeout: float = 60.0) -> str:
    """Unmount an imgkit mount: ask its daemon to stop (it shuts the appliance down first), else
    unmount directly; a stale mount (dead daemon, 'Transport endpoint is not connected') is
    detached lazily. Returns how it was done: "daemon", "unmounted" or "stale"."""
    path = os.path.abspath(mountpoint)
    entry = find_mount(path)
    if entry is None:
        raise InputError(f"{mountpoint}: not mounted")
    if entry.fstype != "fuse.imgkit":
        raise InputError(f"{mountpoint}: not an imgkit mount ({entry.fstype})", hint="use umount(8)")
    runtime = _runtime_file(path)
    pid = _daemon_pid(path)
    how = None
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
            if _wait_unmounted(path, timeout, pid):
                how = "daemon"
                # The mount is gone before the daemon has finished (read-ahead stopped, the image
                # closed, its runtime file removed): a mount on the same directory right after this
                # returns must not have its runtime file removed by the old daemon.
                deadline = time.monotonic() + 10.0
                while not _pid_gone(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
        except ProcessLookupError:
            pass
    if how is None:
        stale = False
        try:
            os.stat(path)
        except OSError as e:
            stale = e.errno == errno.ENOTCONN
        ok, err = _fusermount(path, lazy=False) if not stale else (False, "")
        if ok:
            how = "unmounted"
        else:
            ok, err2 = _fusermount(path, lazy=True)
            if not ok:
                raise OperationFailed(f"{mountpoint}: could not unmount: {err2 or err}",
                                      hint="close programs using the mount (fuser -m) and retry")
            how = "stale" if stale or pid is None else "unmounted"
        _wait_unmounted(path, 5.0)
    _remove(runtime)
    return how
