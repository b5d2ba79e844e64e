"""In-place rewrites are crash-safe (issue 13, case 4): the real CLI is killed (SIGKILL, injected by
strace at the N-th rename or fsync system call, for every N the command makes) during an in-place
re-split, split, join and passwd; after every kill the image at its path opens, verifies and reads
back the original bytes (old layout, new layout, or, for a re-split of a multi-volume image, the
joined intermediate), and with passwd the old or the new password opens it. Before, a kill after
the second rename of a re-split left "volume 2 says the image has 7 volumes, volume 1 says 5"."""
from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
import sys

import pytest

import imgkit
from imgkit.formats.imgk_reader import ImageReader
from imgkit.operations.verify import verify_image

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is in scripts/setup.sh")
OLD_PW, NEW_PW = b"old password", b"new password"
RENAMES = ("rename", "renameat", "renameat2")
SYNCS = ("fsync", "fdatasync")


def _strace_run(args, inject: str | None, env=None, log=None):
    cmd = ["strace", "-f", "-qq", "-o", log or os.devnull, "-e", "trace=" + ",".join(RENAMES + SYNCS + ("pwrite64",))]
    if inject:
        cmd += ["-e", inject]
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("IMGKIT_PASSWORD", None)
    full_env.update(env or {})
    return subprocess.run(cmd + [sys.executable, "-m", "imgkit", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=120)


def _count_calls(args, restore, tmp_path, env=None):
    restore()
    log = tmp_path / "strace.log"
    p = _strace_run(args, None, env, str(log))
    assert p.returncode == 0, p.stderr
    counts = {}
    for line in log.read_text().splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            name = parts[1].split("(", 1)[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


def _state(img, original, passwords=(None,)):
    """The image's volume count, after checking it opens, verifies and reads the original bytes."""
    errors = []
    for pw in passwords:
        try:
            with ImageReader(str(img), (lambda pw=pw: pw) if pw else None) as r:
                assert verify_image(r, workers=1).ok
                assert r.read(0, r.size) == original
                return r.header.volume_count, pw
        except Exception as e:  # noqa: BLE001 - the next password, or the failure below
            errors.append(f"{type(e).__name__}: {e}")
    raise AssertionError(f"no readable image after the kill: {errors}")


def _kill_everywhere(args, img, original, snapshot, tmp_path, *, names, passwords=(None,), env=None):
    def restore():
        for f in glob.glob(str(img) + "*") + glob.glob(os.path.join(os.path.dirname(img), ".*imgkit-partial*")):
            os.unlink(f)
        for f in os.listdir(snapshot):
            shutil.copy2(os.path.join(snapshot, f), os.path.join(os.path.dirname(img), f))
    counts = _count_calls(args, restore, tmp_path, env)
    seen, kills = set(), 0
    for name in names:
        for k in range(1, counts.get(name, 0) + 1):
            restore()
            p = _strace_run(args, f"inject={name}:signal=KILL:when={k}", env)
            assert "Traceback" not in p.stderr, p.stderr
            kills += p.returncode != 0
            seen.add(_state(img, original, passwords))
    restore()
    return seen, kills, counts


@pytest.fixture
def split_image(tmp_path):
    data = random.Random(17).randbytes(640 << 10)  # incompressible: several volumes
    (tmp_path / "src.raw").write_bytes(data)
    work = tmp_path / "work"
    work.mkdir()
    img = work / "disk.imgk"
    imgkit.capture(str(tmp_path / "src.raw"), str(img), chunk_size=64 << 10, split_size=300 << 10)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in os.listdir(work):
        shutil.copy2(work / f, snapshot / f)
    return img, data, snapshot


def test_resplit_in_place_killed_at_every_rename_and_fsync(split_image, tmp_path):
    img, data, snapshot = split_image
    with ImageReader(str(img)) as r:
        old_count = r.header.volume_count
    assert old_count >= 3
    seen, kills, counts = _kill_everywhere(["split", "--split-size", "160K", img], img, data, snapshot, tmp_path,
                                           names=RENAMES + SYNCS)
    counts_seen = {c for c, _ in seen}
    assert kills >= 8, counts
    assert old_count in counts_seen and 1 in counts_seen and max(counts_seen) > old_count, counts_seen


def test_join_in_place_killed_at_every_step(split_image, tmp_path):
    img, data, snapshot = split_image
    seen, kills, counts = _kill_everywhere(["join", img], img, data, snapshot, tmp_path, names=RENAMES + SYNCS)
    assert kills >= 2 and {c for c, _ in seen} >= {1}, (seen, counts)


def test_passwd_killed_at_every_header_write(tmp_path):
    data = random.Random(18).randbytes(640 << 10)
    (tmp_path / "src.raw").write_bytes(data)
    work = tmp_path / "work"
    work.mkdir()
    img = work / "enc.imgk"
    imgkit.capture(str(tmp_path / "src.raw"), str(img), chunk_size=64 << 10, split_size=300 << 10,
                   password=OLD_PW)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in os.listdir(work):
        shutil.copy2(work / f, snapshot / f)
    env = {"IMGKIT_PASSWORD": OLD_PW.decode(), "IMGKIT_NEW_PASSWORD": NEW_PW.decode()}
    seen, kills, counts = _kill_everywhere(["passwd", img], img, data, snapshot, tmp_path,
                                           names=("pwrite64",) + SYNCS, passwords=(OLD_PW, NEW_PW), env=env)
    assert kills >= 4, counts
    assert {pw for _, pw in seen} == {OLD_PW, NEW_PW}, seen
