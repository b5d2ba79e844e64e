"""Real loop devices: capture from a block device, restore to one, and every restore refusal."""
import os
import subprocess

import pytest

from conftest import assert_one_line_error, loop_device, needs_root, pattern_bytes, run_imgkit

pytestmark = [needs_root, pytest.mark.root]


@pytest.fixture(scope="module")
def disk_and_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("dev")
    src = d / "disk.raw"
    data = bytearray(pattern_bytes(12 << 20, seed=31))
    data[3 << 20:6 << 20] = bytes(3 << 20)  # zero chunks: restore must zero them on a device
    src.write_bytes(bytes(data))
    img = d / "disk.imgk"
    with loop_device(src, "--read-only") as dev:
        p = run_imgkit("capture", dev, img, "--json", check=True)
    import json
    doc = json.loads(p.stdout)
    assert doc["logical_size"] == 12 << 20
    return d, src, img


def test_capture_from_loop_device_records_device_facts(disk_and_image):
    import json
    _, _, img = disk_and_image
    info = json.loads(run_imgkit("info", img, "--json", check=True).stdout)
    assert info["source"]["kind"] == "block"
    assert info["source"]["logical_sector_size"] == 512
    assert info["source"]["path"].startswith("/dev/loop")


def test_restore_to_loop_device_with_verify(disk_and_image):
    d, src, img = disk_and_image
    target = d / "target.raw"
    target.write_bytes(os.urandom(1 << 20) * 16)  # bigger than the image, full of junk
    with loop_device(target) as dev:
        run_imgkit("restore", img, dev, "--yes", "--verify", check=True)
    got = target.read_bytes()
    assert got[:12 << 20] == src.read_bytes()


def test_restore_with_discard_zeroes_zero_chunks(disk_and_image):
    d, src, img = disk_and_image
    target = d / "discard.raw"
    target.write_bytes(b"\xa5" * (16 << 20))
    with loop_device(target) as dev:
        run_imgkit("restore", img, dev, "--yes", "--discard", "--verify", check=True)
    assert target.read_bytes()[:12 << 20] == src.read_bytes()


def test_restore_refuses_smaller_device(disk_and_image):
    d, _, img = disk_and_image
    small = d / "small.raw"
    small.write_bytes(bytes(8 << 20))
    with loop_device(small) as dev:
        assert_one_line_error(run_imgkit("restore", img, dev, "--yes"), 3, "smaller", str(8 << 20), str(12 << 20))
    assert small.read_bytes() == bytes(8 << 20)


def test_restore_refuses_without_yes_when_not_interactive(disk_and_image):
    d, _, img = disk_and_image
    t = d / "t.raw"
    t.write_bytes(b"keep" * (4 << 20))
    with loop_device(t) as dev:
        assert_one_line_error(run_imgkit("restore", img, dev), 3, "--yes")
    assert t.read_bytes() == b"keep" * (4 << 20)
    existing = d / "existing.raw"
    existing.write_bytes(b"old")
    assert_one_line_error(run_imgkit("restore", img, existing), 3, "--yes")
    assert existing.read_bytes() == b"old"


def test_restore_refuses_device_in_use(disk_and_image):
    d, _, img = disk_and_image
    t = d / "busy.raw"
    t.write_bytes(bytes(16 << 20))
    with loop_device(t) as dev:
        holder = os.open(dev, os.O_RDONLY | os.O_EXCL)  # another program holds it exclusively
        try:
            assert_one_line_error(run_imgkit("restore", img, dev, "--yes"), 3, "in use")
        finally:
            os.close(holder)


def test_restore_refuses_mounted_device_and_device_holding_image(disk_and_image, tmp_path):
    """A test-made ext4 (never an image's filesystem) is mounted to play the user's mounted disk."""
    d, _, img = disk_and_image
    fs = d / "fs.raw"
    fs.write_bytes(bytes(32 << 20))
    subprocess.run(["mkfs.ext4", "-q", str(fs)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(fs) as dev:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            inside = mnt / "inside.imgk"
            inside.write_bytes(img.read_bytes())
            assert_one_line_error(run_imgkit("restore", inside, dev, "--yes"), 3, "holds the image")
            assert_one_line_error(run_imgkit("restore", img, dev, "--yes"), 3, "mounted")
            # Capturing the device onto itself is refused too.
            assert_one_line_error(run_imgkit("capture", dev, mnt / "self.imgk"), 3, "device being captured")
            assert not (mnt / "self.imgk").exists()
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def test_interrupted_capture_leaves_nothing(tmp_path):
    """SIGINT during a capture: exit 130, no image and no temporary file left behind."""
    import signal
    import sys
    import time
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        for i in range(256):
            f.write(os.urandom(1 << 20))
    img = tmp_path / "big.imgk"
    proc = subprocess.Popen([sys.executable, "-m", "imgkit", "capture", str(src), str(img), "--high",
                             "--progress", "none"], stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert sorted(os.listdir(tmp_path)) == ["big.raw"]


def test_kill_9_during_capture_never_leaves_a_complete_looking_image(tmp_path):
    """kill -9 at several points: the image name never appears; only a hidden partial file may stay."""
    import signal
    import sys
    import time
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        for _ in range(128):
            f.write(os.urandom(1 << 20))
    for delay in (0.3, 0.8, 1.5):
        img = tmp_path / "k.imgk"
        proc = subprocess.Popen([sys.executable, "-m", "imgkit", "capture", str(src), str(img), "--high",
                                 "--force", "--progress", "none"], stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if img.exists():  # it finished before the kill: then it must verify
            assert run_imgkit("verify", img).returncode == 0
            img.unlink()
        leftovers = [p for p in os.listdir(tmp_path) if p not in ("big.raw",)]
        assert all(p.startswith(".k.imgk.imgkit-partial-") for p in leftovers), leftovers
        for p in leftovers:
            os.unlink(tmp_path / p)
