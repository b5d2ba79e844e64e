"""Helpers shared by the boot-check tests (tests/test_bootcheck_*.py)."""
from __future__ import annotations

import json
import os

from tests.conftest import run_imgkit

PASSWORD = "boot-check test password"
TCG = {"IMGKIT_ACCEL": "tcg"}  # these machines' KVM hangs; the accel test exercises `auto` itself


def boot_check_json(image, *args, env=None, timeout=300):
    """Run `imgkit boot-check --json` as a user would; (exit code, report dict or None, stderr)."""
    full_env = dict(TCG)
    if env:
        full_env.update(env)
    proc = run_imgkit("boot-check", image, "--json", *args, env=full_env, timeout=timeout)
    doc = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, doc, proc.stderr


def capture(src, dest, *args, encrypt=False):
    env = {"IMGKIT_PASSWORD": PASSWORD} if encrypt else None
    extra = ("--encrypt",) if encrypt else ()
    run_imgkit("capture", src, dest, *extra, *args, env=env, check=True)
    return str(dest)


def convert(src, dest, *args, password=False):
    env = {"IMGKIT_PASSWORD": PASSWORD} if password else None
    run_imgkit("convert", src, dest, *args, env=env, check=True)
    return str(dest)


def file_state(path) -> tuple:
    """Size, mtime and a digest: what must not change when an image is only booted."""
    import hashlib
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return st.st_size, st.st_mtime_ns, h.hexdigest()
