"""Running a filesystem's own userspace tool (e2fsck, resize2fs, ntfsresize...) on untrusted data,
confined by bubblewrap.

These tools parse on-disk structures that an image's author controls. They run on the host only
inside a sandbox: no network and no other namespace shared (--unshare-all), every capability dropped,
an empty environment, a read-only view of /usr (the programs and their libraries) and nothing else of
the host's files: no /etc, /home, /root, /tmp or /work. The only writable things are the files named
by the caller (each one partition of a copy-on-write overlay, bound at /fs/<name>) and a private
tmpfs /tmp. CPU time and address space are limited (rlimits survive exec) and a wall-clock timeout
kills the whole process group. Nothing is mounted by the host kernel: the parsers read a plain file.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from ..errors import EnvironmentProblem, OperationFailed
from .qemu_tools import Limits, _preexec, communicate_bounded, describe_failure

BWRAP_HINT = "apt-get install bubblewrap"

# Debian 12 is merged-/usr: /bin, /sbin, /lib and /lib64 are symlinks into /usr.
_MERGED_USR = ("bin", "sbin", "lib", "lib64")


def available() -> bool:
    return shutil.which("bwrap") is not None


def confined_argv(argv: list[str], files: dict[str, str], read_only: dict[str, str] | None = None,
                  env: dict[str, str] | None = None) -> list[str]:
    """The bwrap command line that runs `argv` with only `files` ({name: host path}) writable, at
    /fs/<name>; `read_only` files likewise but read-only; `env` the only environment besides PATH."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise EnvironmentProblem("bubblewrap is needed to run filesystem tools confined", hint=BWRAP_HINT)
    program = shutil.which(argv[0], path="/usr/sbin:/usr/bin:/sbin:/bin")
    if program is None:
        raise EnvironmentProblem(f"{argv[0]} is not installed")
    # multi-call programs (mtools) read their name from argv[0]: run the link, check its target
    if not program.startswith("/usr/") or not os.path.realpath(program).startswith("/usr/"):
        raise EnvironmentProblem(f"{program} is outside /usr: it would not be visible in the sandbox")
    cmd = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--clearenv", "--setenv", "PATH", "/usr/sbin:/usr/bin", "--setenv", "LC_ALL", "C",
           "--ro-bind", "/usr", "/usr"]
    for name in _MERGED_USR:
        if os.path.islink(f"/{name}"):
            cmd += ["--symlink", f"usr/{name}", f"/{name}"]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", "/fs"]
    for name, host_path in files.items():
        cmd += ["--bind", host_path, f"/fs/{name}"]
    for name, host_path in (read_only or {}).items():
        cmd += ["--ro-bind", host_path, f"/fs/{name}"]
    for key, value in (env or {}).items():
        cmd += ["--setenv", key, value]
    cmd += ["--chdir", "/", program, *argv[1:]]
    return cmd


def run_confined(argv: list[str], files: dict[str, str], limits: Limits, what: str,
                 ok_codes: tuple[int, ...] = (0,), read_only: dict[str, str] | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `argv` confined (see the module doc); an exit status outside `ok_codes`, a limit reached
    or the timeout raises OperationFailed naming `what` and the tool's last line."""
    proc = subprocess.Popen(confined_argv(argv, files, read_only, env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            preexec_fn=_preexec(limits, die_with_parent=True), start_new_session=True)
    out, err = communicate_bounded(proc, limits, what)
    if proc.returncode not in ok_codes:
        # bwrap reports a child killed by signal N as exit status 128+N
        code = 128 - proc.returncode if 128 < proc.returncode < 128 + 65 else proc.returncode
        raise OperationFailed(f"{what} failed: {describe_failure(code, err or out)}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
