"""Shared helpers of the mount tests: the test disk (built once per process), its images, and a
context manager that mounts through the real CLI and always unmounts."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import tempfile
import time

from tests.conftest import run_imgkit
from tests.mount.disks import build_multifs_disk

ENV = {"IMGKIT_ACCEL": "tcg", "LIBGUESTFS_BACKEND": "direct"}


@functools.lru_cache(maxsize=None)
def built_disk() -> dict:
    work = tempfile.mkdtemp(prefix="imgkit-mount-test-")
    built = build_multifs_disk(work)
    built["work"] = work
    return built


@functools.lru_cache(maxsize=None)
def captured(*extra: str) -> str:
    """The test disk captured with extra `imgkit capture` options (cached per option set)."""
    disk = built_disk()
    name = "img-" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8] + ".imgk"
    out = os.path.join(disk["work"], name)
    run_imgkit("capture", disk["disk"], out, "--progress", "none", *extra, check=True)
    return out


def sha256_file(path: str, bs: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bs)
            if not b:
                return h.hexdigest()
            h.update(b)


def mounted_here(mountpoint: str) -> bool:
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(mountpoint: str) -> None:
    if mounted_here(mountpoint):
        subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True)


@contextlib.contextmanager
def mounted(image: str, mountpoint: str, *args: str, env: dict | None = None):
    os.makedirs(mountpoint, exist_ok=True)
    proc = run_imgkit("mount", image, mountpoint, *args, env={**ENV, **(env or {})}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        assert mounted_here(mountpoint)
        yield proc
    finally:
        run_imgkit("umount", mountpoint, timeout=120)
        deadline = time.monotonic() + 10
        while mounted_here(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        force_unmount(mountpoint)
