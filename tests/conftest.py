"""Shared test helpers. Area-specific fixtures live in tests/<area>/conftest.py."""
from __future__ import annotations

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
