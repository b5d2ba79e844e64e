"""Running qemu programs safely: found on PATH (or a clear "install qemu-utils"), with resource limits
(CPU seconds and address space, as OpenStack Nova does for qemu-img info) and a wall-clock timeout,
in their own process group so a timeout kills the whole group.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from ..errors import EnvironmentProblem, OperationFailed

INFO_CPU_SECONDS = 30
INFO_ADDRESS_SPACE = 1 << 30
WORK_ADDRESS_SPACE = 4 << 30   # convert/serve: qemu's coroutine stacks and buffers need more than 1 GiB


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int | None  # None: no CPU limit (a daemon that lives as long as a mount)
    address_space: int
    wall_seconds: float | None  # None: no deadline (same)


INFO_LIMITS = Limits(INFO_CPU_SECONDS, INFO_ADDRESS_SPACE, 60)


# A qemu-storage-daemon behind a mount serves reads for as long as the mount lives, so it gets no
# CPU or time limit (either would turn into EIO hours later); its memory stays bounded.
SERVING_LIMITS = Limits(cpu_seconds=None, address_space=WORK_ADDRESS_SPACE, wall_seconds=None)


def limits_for_size(size: int) -> Limits:
    """Finite limits for work proportional to a disk's size: generous (a slow shared machine, zstd)
    but never unbounded."""
    mib = max(1, size >> 20)
    return Limits(cpu_seconds=120 + mib // 8, address_space=WORK_ADDRESS_SPACE, wall_seconds=300 + mib / 4)


_INSTALL_HINTS = {
    "qemu-system-x86_64": ("boot-check", "apt-get install qemu-system-x86"),
}


def find_program(name: str) -> str:
    path = shutil.which(name)
    if not path:
        need, hint = _INSTALL_HINTS.get(name, (
            "foreign image formats", "apt-get install qemu-utils (Debian/Ubuntu) or qemu-img (Fedora)"))
        raise EnvironmentProblem(f"{name} is not installed (needed for {need})", hint=hint)
    return path


PR_SET_PDEATHSIG = 1


def _libc():
    import ctypes
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _preexec(limits: Limits, die_with_parent: bool):
    def apply():
        if limits.cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if die_with_parent and _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return apply


def popen(argv: list[str], limits: Limits, **kw) -> subprocess.Popen:
    """Start a qemu program in its own process group (so a timeout kills all of it). It must not
    outlive imgkit: when started from the main thread it gets SIGKILL if imgkit dies (PDEATHSIG
    fires when the forking *thread* ends, so from other threads callers rely on close()/finalizers)."""
    argv = [find_program(argv[0]), *argv[1:]]
    env = dict(os.environ, LC_ALL="C")
    import threading
    die_with_parent = threading.current_thread() is threading.main_thread()
    kw.setdefault("stdin", subprocess.DEVNULL)  # `imgkit run` hands QEMU the terminal (stdin=None)
    return subprocess.Popen(argv, preexec_fn=_preexec(limits, die_with_parent), start_new_session=True,
                            env=env, **kw)


def kill_group(proc: subprocess.Popen) -> None:
    """Stop a process we started, with its group (it was started in a new session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> bool:
    """Give a process we asked to stop (QMP quit) `timeout` seconds to exit; past that its whole
    group is killed. True when it exited by itself."""
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return False


def end_child(proc: subprocess.Popen, timeout: float) -> None:
    """End a helper child that takes requests on its stdin (the appliance helpers of the files view and
    of shrink): end of input is its signal to finish; past `timeout` it is killed. Its pipes are closed."""
    try:
        proc.stdin.close()
    except (OSError, ValueError):
        pass  # already gone: the wait below reaps it
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        proc.stdout.close()
    except OSError:
        pass


def communicate_bounded(proc: subprocess.Popen, limits: Limits, what: str) -> tuple[str, str]:
    """proc's output once it exits; past the wall-clock limit (or on any exception, Ctrl-C too) its
    whole process group is killed, so no tool outlives the command that started it."""
    try:
        return proc.communicate(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise OperationFailed(f"{what} took longer than {limits.wall_seconds:.0f} s: stopped") from None
    except BaseException:
        kill_group(proc)
        raise


def run(argv: list[str], limits: Limits = INFO_LIMITS, what: str | None = None,
        pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    """Run to completion; a timeout or failure raises with qemu's own message. `pass_fds`: the
    descriptors of inspected images the command opens as /proc/self/fd/N."""
    proc = popen(argv, limits, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)
    out, err = communicate_bounded(proc, limits, what or argv[0])
    if proc.returncode != 0:
        raise OperationFailed(f"{what or argv[0]} failed: {describe_failure(proc.returncode, err)}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def describe_failure(returncode: int, stderr: str) -> str:
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        why = {"SIGXCPU": "CPU time limit reached", "SIGKILL": "killed (limit reached?)"}.get(sig, sig)
        return why
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {returncode}"


STDERR_TAIL = 64 << 10


def last_line(path: str) -> str | None:
    """The last non-blank line of a child's stderr log (only its tail is read: a chatty QEMU's log
    may be large), or None when there is none or it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - STDERR_TAIL))
            tail = f.read(STDERR_TAIL).decode("utf-8", "replace")
    except OSError:
        return None
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def wait_for_socket(path: str, proc: subprocess.Popen, log_path: str | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            err = ""
            if log_path:
                with open(log_path, errors="replace") as f:
                    err = f.read(65536)
            raise OperationFailed(f"qemu-storage-daemon exited: {describe_failure(proc.returncode, err)}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise OperationFailed("qemu-storage-daemon did not start its NBD server in time")
        time.sleep(0.02)
