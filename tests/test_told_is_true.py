"""What the user is told is true (issue #12): errors name the path (ENOSPC on a real small tmpfs),
option conflicts are usage errors, a passing boot check's JUnit has no reason="None", progress has a
real total and a final done event."""
import contextlib
import json
import os
import subprocess

import pytest

from conftest import needs_root, pattern_bytes, run_imgkit

MiB = 1 << 20


@contextlib.contextmanager
def small_tmpfs(where, size="2m"):
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@needs_root
def test_enospc_names_the_path_and_leaves_nothing(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(6 * MiB))
    with small_tmpfs(tmp_path / "full") as full:
        for args, name in ((("capture", src, full / "x.imgk", "--sector-by-sector", "--no-compress"), "x.imgk"),
                           (("convert", src, full / "x.qcow2"), "x.qcow2"),
                           (("convert", src, full / "x.raw"), "x.raw")):
            p = run_imgkit(*args, "--progress", "none")
            assert p.returncode != 0 and "Traceback" not in p.stderr
            assert str(full / name).split("/")[-1] in p.stderr and "No space left on device" in p.stderr, p.stderr
            assert os.listdir(full) == []  # no half-written image, no temporary file


def test_fast_and_high_together_is_a_usage_error(tmp_path):
    src = tmp_path / "s.raw"
    src.write_bytes(pattern_bytes(MiB))
    p = run_imgkit("capture", src, tmp_path / "s.imgk", "--fast", "--high")
    assert p.returncode == 2 and "exclude each other" in p.stderr
    assert not (tmp_path / "s.imgk").exists()


def test_junit_of_a_pass_has_no_reason_none():
    from imgkit.operations.bootcheck import BootResult
    from imgkit.cli.junit import junit_xml
    r = BootResult(image="x.imgk", passed=True, reason=None, detail=None, seconds_to_result=1.0,
                   total_seconds=2.0, expect="ok", matched="ok", matched_on="serial", format="imgk",
                   media="disk", firmware="bios", firmware_why="", accel="tcg", accel_why="", streamed=True,
                   timeout=10, memory=256)
    xml = junit_xml(r)
    assert "None" not in xml and 'name="reason"' not in xml and 'name="firmware" value="bios"' in xml
    r.passed, r.reason, r.detail = False, "timeout", "no match"
    assert 'name="reason" value="timeout"' in junit_xml(r)


@pytest.mark.parametrize("op", ["capture", "convert", "verify", "restore"])
def test_progress_json_has_a_total_and_one_done_event(tmp_path, op):
    src = tmp_path / "s.raw"
    src.write_bytes(pattern_bytes(4 * MiB, seed=2))
    img = tmp_path / "s.imgk"
    run_imgkit("capture", src, img, "--progress", "none", check=True)
    args = {"capture": ("capture", src, tmp_path / "c.imgk"),
            "convert": ("convert", img, tmp_path / "c.qcow2"),
            "verify": ("verify", img),
            "restore": ("restore", img, tmp_path / "r.raw")}[op]
    p = run_imgkit(*args, "--progress", "json", check=True)
    events = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("{")]
    done = [e for e in events if e.get("event") == "done"]
    assert len(done) == 1 and events[-1] is done[0], p.stderr
    assert done[0]["total"] == 4 * MiB and done[0]["done"] == 4 * MiB, done


@needs_root
def test_capturing_a_read_write_mounted_filesystem_warns(tmp_path):
    """A test-made ext4 on a loop device, mounted read-write: capture warns (text and --json) and says
    how to get a consistent image; the file under the loop device (a VM disk) warns the same."""
    from conftest import loop_device
    fs = tmp_path / "fs.raw"
    with open(fs, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True)
    mnt = tmp_path / "m"
    mnt.mkdir()
    with loop_device(fs) as dev:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            p = run_imgkit("capture", dev, tmp_path / "a.imgk", "--progress", "none", check=True)
            assert "warning" in p.stderr and "mounted read-write" in p.stderr and "fsfreeze" in p.stderr
            doc = json.loads(run_imgkit("capture", fs, tmp_path / "b.imgk", "--json", "--progress", "none",
                                        check=True).stdout)
            assert any("mounted read-write" in w and dev in w for w in doc["warnings"])
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            p = run_imgkit("capture", dev, tmp_path / "c.imgk", "--progress", "none", check=True)
            assert "mounted read-write" not in p.stderr
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def test_partial_files_of_a_killed_capture_are_mentioned_and_cleaned_with_consent(tmp_path):
    import signal
    import sys
    import time
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
    img = tmp_path / "x.imgk"
    proc = subprocess.Popen([sys.executable, "-m", "imgkit", "capture", str(src), str(img), "--high",
                             "--sector-by-sector", "--progress", "none"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not any(".imgkit-partial-" in n for n in os.listdir(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = [n for n in os.listdir(tmp_path) if ".imgkit-partial-" in n]
    assert partial and not img.exists()
    small = tmp_path / "small.raw"
    small.write_bytes(pattern_bytes(MiB))
    p = run_imgkit("capture", small, img, "--progress", "none", check=True)  # no terminal: mention only
    assert "interrupted capture" in p.stderr and partial[0] in p.stderr and "--yes" in p.stderr
    assert all((tmp_path / n).exists() for n in partial)
    p = run_imgkit("capture", small, img, "--force", "--yes", "--progress", "none", check=True)
    assert "removed" in p.stderr
    assert not any(".imgkit-partial-" in n for n in os.listdir(tmp_path))


@needs_root
def test_mount_on_a_non_empty_directory_warns(tmp_path):
    src = tmp_path / "s.raw"
    src.write_bytes(pattern_bytes(MiB))
    img = tmp_path / "s.imgk"
    run_imgkit("capture", src, img, "--progress", "none", check=True)
    mnt = tmp_path / "m"
    mnt.mkdir()
    (mnt / "mine.txt").write_text("kept")
    p = run_imgkit("mount", img, mnt, check=True)
    try:
        assert "not empty" in p.stderr and "1 entry is hidden" in p.stderr
        assert (mnt / "disk.raw").exists()
    finally:
        run_imgkit("umount", mnt, check=True)
    assert (mnt / "mine.txt").read_text() == "kept"


def test_convert_of_an_encrypted_imgk_stays_encrypted_unless_decrypt(tmp_path):
    from imgkit.formats.imgk_reader import ImageReader
    src = tmp_path / "s.raw"
    data = pattern_bytes(4 * MiB, seed=21)
    src.write_bytes(data)
    enc = tmp_path / "enc.imgk"
    env = {"IMGKIT_PASSWORD": "old-pass", "IMGKIT_NEW_PASSWORD": "new-pass"}
    run_imgkit("capture", src, enc, "--encrypt", "--progress", "none", env=env, check=True)

    def header(path):
        with open(path, "rb") as f:
            from imgkit.formats import imgk_layout as L
            return L.Header.decode(f.read(L.HEADER_SIZE), where=str(path))
    same = tmp_path / "same.imgk"
    run_imgkit("convert", enc, same, "--progress", "none", env=env, check=True)
    assert header(same).encrypted
    with ImageReader(str(same), lambda: b"old-pass") as r:
        assert r.read(0, r.size) == data
    new = tmp_path / "new.imgk"
    run_imgkit("convert", enc, new, "--encrypt", "--progress", "none", env=env, check=True)
    with ImageReader(str(new), lambda: b"new-pass") as r:
        assert header(new).encrypted and r.read(0, r.size) == data
    for dest in ("clear.imgk", "clear.raw", "clear.qcow2"):
        p = run_imgkit("convert", enc, tmp_path / dest, "--progress", "none", env=env)
        if dest == "clear.imgk":
            assert p.returncode == 0 and header(tmp_path / dest).encrypted  # kept encrypted
            continue
        assert p.returncode == 3 and "--decrypt" in p.stderr and not (tmp_path / dest).exists()
    clear = tmp_path / "clear2.imgk"
    run_imgkit("convert", enc, clear, "--decrypt", "--progress", "none", env=env, check=True)
    assert not header(clear).encrypted
    raw = tmp_path / "clear2.raw"
    run_imgkit("convert", enc, raw, "--decrypt", "--progress", "none", env=env, check=True)
    assert raw.read_bytes() == data


def test_convert_to_imgk_is_filesystem_aware(tmp_path):
    """An ext4 whose free blocks hold old junk: convert stores only the used blocks, like capture."""
    disk = tmp_path / "fs.raw"
    disk.write_bytes(os.urandom(32 * MiB))  # junk in what will be free space
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(disk)], check=True)
    out = tmp_path / "fs.imgk"
    doc = json.loads(run_imgkit("convert", disk, out, "--json", "--progress", "none", check=True).stdout)
    cap = json.loads(run_imgkit("capture", disk, tmp_path / "cap.imgk", "--json", "--progress", "none",
                                check=True).stdout)
    assert doc["file_size"] < 8 * MiB  # 32 MiB of random bytes would not compress
    assert abs(doc["file_size"] - cap["stored_size"]) < MiB


def test_convert_to_imgk_sector_by_sector_keeps_every_byte(tmp_path):
    """--sector-by-sector keeps the junk in free space too, so the image restores byte for byte;
    it is refused for a destination that is not imgk (every other format keeps every byte)."""
    disk = tmp_path / "fs.raw"
    disk.write_bytes(os.urandom(16 * MiB))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(disk)], check=True)
    out = tmp_path / "fs.imgk"
    doc = json.loads(run_imgkit("convert", disk, out, "--sector-by-sector", "--json", "--progress", "none",
                                check=True).stdout)
    assert doc["file_size"] > 12 * MiB  # the random free space is stored
    back = tmp_path / "back.raw"
    run_imgkit("convert", out, back, "--progress", "none", check=True)
    assert back.read_bytes() == disk.read_bytes()
    refused = run_imgkit("convert", disk, tmp_path / "x.qcow2", "--sector-by-sector")
    assert refused.returncode == 2 and "imgk DEST only" in refused.stderr
