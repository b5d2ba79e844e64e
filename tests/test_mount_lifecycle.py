"""imgkit mount/umount life cycle and damage: a corrupt chunk fails only its own range (EIO, logged
with the offset), umount leaves nothing behind, SIGTERM/SIGINT unmount cleanly, a stale mount after
kill -9 of the daemon is cleaned by umount, a foreign (qcow2) image mounts too. Real FUSE, root."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import assert_one_line_error, needs_root, run_imgkit
from tests.mount.helpers import ENV, built_disk, captured, force_unmount, mounted, mounted_here, sha256_file

pytestmark = [needs_root, pytest.mark.root, pytest.mark.fuse]


def _daemon_pid(mp: str) -> int:
    from imgkit.operations.mount import _runtime_file
    with open(_runtime_file(mp)) as f:
        return json.load(f)["pid"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _wait(cond, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_corrupt_chunk_gives_eio_on_exactly_its_range(tmp_path):
    from imgkit.formats import imgk_layout as L
    from imgkit.formats.imgk_reader import ImageReader
    image = str(tmp_path / "c.imgk")
    shutil.copy(captured("--chunk-size", "64K"), image)
    with ImageReader(image) as r:
        data = [i for i, e in enumerate(r.index) if e.kind == L.KIND_DATA]
        bad = next(i for i in data if i - 1 in data and i + 1 in data)
        e, cs = r.index[bad], r.chunk_size
    with open(image, "r+b") as f:  # XOR (never a fixed value) a byte in the middle of the stored chunk
        f.seek(e.offset + e.stored_length // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    log = tmp_path / "daemon.log"
    mp = str(tmp_path / "m")
    with mounted(image, mp, "--log-file", str(log)):
        fd = os.open(os.path.join(mp, "disk.raw"), os.O_RDONLY)
        try:
            with open(built_disk()["disk"], "rb") as src:
                def good(off, n):
                    src.seek(off)
                    assert os.pread(fd, n, off) == src.read(n), (off, n)
                for off, n in ((bad * cs, 1), (bad * cs + 5000, 4096), (bad * cs + cs - 4096, 8192)):
                    with pytest.raises(OSError) as err:
                        os.pread(fd, n, off)
                    assert err.value.errno == errno.EIO
                # A read that starts before the bad chunk returns the good bytes and stops where the
                # damage starts (a short read, as read(2) does), or fails outright: never bad bytes.
                for off, n in (((bad - 1) * cs + cs - 1, 2), ((bad - 1) * cs, 3 * cs)):
                    try:
                        got = os.pread(fd, n, off)
                    except OSError as err:
                        assert err.errno == errno.EIO
                    else:
                        src.seek(off)
                        assert got == src.read(bad * cs - off), (off, n, len(got))
                good((bad - 1) * cs, cs)  # the chunk before, up to its last byte
                good((bad + 1) * cs, cs)  # the chunk after
                good(0, 1 << 20)
                good((bad + 2) * cs, 1 << 20)
            # still serving after the errors
            assert os.path.getsize(os.path.join(mp, "disk.raw")) == os.path.getsize(built_disk()["disk"])
        finally:
            os.close(fd)
        assert _wait(lambda: f"corrupt chunk at disk offset {bad * cs}" in log.read_text(), 5), log.read_text()


def test_umount_leaves_no_mount_and_no_daemon(tmp_path):
    mp = str(tmp_path / "m")
    os.makedirs(mp)
    proc = run_imgkit("mount", captured(), mp, env=ENV)
    assert proc.returncode == 0, proc.stderr
    try:
        pid = _daemon_pid(mp)
        assert _alive(pid)
        assert os.path.getsize(os.path.join(mp, "disk.raw")) > 0
        out = run_imgkit("umount", mp)
        assert out.returncode == 0, out.stderr
        assert not mounted_here(mp)
        assert _wait(lambda: not _alive(pid))
        assert os.listdir(mp) == []
    finally:
        force_unmount(mp)


def test_sigterm_unmounts_cleanly(tmp_path):
    mp = str(tmp_path / "m")
    with mounted(captured(), mp):
        pid = _daemon_pid(mp)
        os.kill(pid, signal.SIGTERM)
        assert _wait(lambda: not mounted_here(mp))
        assert _wait(lambda: not _alive(pid))


def test_foreground_stops_on_sigint(tmp_path):
    mp = tmp_path / "m"
    mp.mkdir()
    env = {**os.environ, **ENV}
    proc = subprocess.Popen([sys.executable, "-m", "imgkit", "mount", "--foreground", captured(), str(mp)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert _wait(lambda: mounted_here(str(mp)), 20)
        assert (mp / "info.json").stat().st_size > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, proc.stderr.read()
        assert not mounted_here(str(mp))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(str(mp))


def test_stale_mount_after_kill_9_is_cleaned_by_umount(tmp_path):
    mp = str(tmp_path / "m")
    os.makedirs(mp)
    proc = run_imgkit("mount", captured(), mp, env=ENV)
    assert proc.returncode == 0, proc.stderr
    try:
        pid = _daemon_pid(mp)
        os.kill(pid, signal.SIGKILL)
        assert _wait(lambda: not _alive(pid))
        with pytest.raises(OSError) as e:
            os.stat(os.path.join(mp, "disk.raw"))
        assert e.value.errno == errno.ENOTCONN
        again = run_imgkit("mount", captured(), mp, env=ENV)
        assert_one_line_error(again, 3, "stale", "imgkit umount")
        out = run_imgkit("umount", mp)
        assert out.returncode == 0, out.stderr
        assert "stale" in out.stdout
        assert not mounted_here(mp)
        with mounted(captured(), mp):  # the directory is usable again
            assert os.path.getsize(os.path.join(mp, "disk.raw")) == os.path.getsize(built_disk()["disk"])
    finally:
        force_unmount(mp)


@pytest.mark.qemu
def test_foreign_qcow2_image(tmp_path):
    qcow = str(tmp_path / "d.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
                    built_disk()["disk"], qcow], check=True)
    mp = str(tmp_path / "m")
    with mounted(qcow, mp):
        assert sha256_file(os.path.join(mp, "disk.raw")) == sha256_file(built_disk()["disk"])
        assert os.readlink(os.path.join(mp, "partitions", "rootfs.raw")) == "p1.raw"
