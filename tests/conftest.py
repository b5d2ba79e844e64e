"""Shared test helpers. Area-specific fixtures live in tests/<area>/conftest.py."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_imgkit(*args, input=None, env=None, check=False, timeout=600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (as a user would), returning the completed process."""
    full_env = dict(os.environ)
    full_env.pop("IMGKIT_PASSWORD", None)
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, "-m", "imgkit", *map(str, args)], input=input,
                          capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"imgkit {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """The CLI contract for bad input: the exit code, `imgkit: error:` and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("imgkit: error:"), proc.stderr
    for n in needles:
        assert n.lower() in proc.stderr.lower(), (n, proc.stderr)


@pytest.fixture
def imgkit_cli():
    return run_imgkit


def pattern_bytes(size: int, seed: int = 1) -> bytes:
    """Deterministic, partly compressible content: MiB i starts with its number (golden-image style)."""
    import random
    rng = random.Random(seed)
    out = bytearray()
    mib = 0
    while len(out) < size:
        block = bytearray(f"MiB {mib:08d} ".encode() * 4096)[: 1 << 20]
        block[512 * 1024:] = rng.randbytes(512 * 1024)
        out += block
        mib += 1
    return bytes(out[:size])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@contextlib.contextmanager
def loop_device(path, *extra):
    """A loop device over `path` (losetup options in `extra`, e.g. "--read-only"), detached after."""
    dev = subprocess.run(["losetup", "--find", "--show", *extra, str(path)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture(scope="session")
def fsaware_gpt_disk(tmp_path_factory):
    """tests/fsaware_disks.py's GPT disk (ESP, BIOS boot, NTFS, FAT, ext4 root; stale free space),
    captured once filesystem-aware ("aware") and once --sector-by-sector ("full") for every test that
    reads it. Tests write their outputs elsewhere: the disk and images stay as built."""
    import fsaware_disks as D
    work = tmp_path_factory.mktemp("fsaware-disk")
    path = os.path.join(work, "disk.img")
    facts = D.build_gpt_disk(path, str(work))
    aware = os.path.join(work, "aware.imgk")
    full = os.path.join(work, "full.imgk")
    run_imgkit("capture", "--progress", "none", path, aware, check=True)
    run_imgkit("capture", "--progress", "none", "--sector-by-sector", path, full, check=True)
    return {"path": path, "facts": facts, "aware": aware, "full": full}
