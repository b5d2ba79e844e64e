"""imgkit mount, the disk views: disk.raw and partitions byte-exact, info.json, options, errors.
Real FUSE mounts through the CLI (root, /dev/fuse)."""
from __future__ import annotations

import errno
import json
import os
import random

import pytest

from tests.conftest import assert_one_line_error, needs_root, run_imgkit
from tests.mount.helpers import ENV, captured, mounted, mounted_here, sha256_file, built_disk

pytestmark = [needs_root, pytest.mark.root, pytest.mark.fuse]


@pytest.fixture(scope="module")
def plain_mount(tmp_path_factory):
    mp = str(tmp_path_factory.mktemp("mnt") / "m")
    with mounted(captured(), mp, "--cache-size", "8M"):
        yield mp


def test_disk_raw_is_byte_exact(plain_mount):
    assert sha256_file(os.path.join(plain_mount, "disk.raw")) == sha256_file(built_disk()["disk"])
    assert os.path.getsize(os.path.join(plain_mount, "disk.raw")) == os.path.getsize(built_disk()["disk"])


def test_each_partition_is_byte_exact_with_label_aliases(plain_mount):
    disk = built_disk()
    parts = os.path.join(plain_mount, "partitions")
    with open(disk["disk"], "rb") as src:
        for n, (start, size) in disk["partitions"].items():
            src.seek(start)
            import hashlib
            want = hashlib.sha256(src.read(size)).hexdigest()
            assert sha256_file(os.path.join(parts, f"p{n}.raw")) == want, n
    # Filesystem labels (ext4 'rootfs', FAT 'ESP', NTFS 'WINDATA' from $Volume since #12), before GPT names.
    assert os.readlink(os.path.join(parts, "rootfs.raw")) == "p1.raw"
    assert os.readlink(os.path.join(parts, "ESP.raw")) == "p2.raw"
    assert os.readlink(os.path.join(parts, "WINDATA.raw")) == "p3.raw"
    assert sorted(os.listdir(parts)) == ["ESP.raw", "WINDATA.raw", "dirty.raw", "old.raw", "p1.raw", "p2.raw",
                                         "p3.raw", "p4.raw", "p5.raw", "rootfs.raw"]


def test_random_reads_match_the_source(plain_mount):
    rng = random.Random(5)
    size = os.path.getsize(built_disk()["disk"])
    fd = os.open(os.path.join(plain_mount, "disk.raw"), os.O_RDONLY)
    try:
        with open(built_disk()["disk"], "rb") as src:
            for _ in range(200):
                off, n = rng.randrange(size), rng.choice([1, 512, 4096, 70_000, 1 << 20, 3 << 20])
                src.seek(off)
                assert os.pread(fd, n, off) == src.read(n), (off, n)
        assert os.pread(fd, 4096, size) == b""  # at the end
    finally:
        os.close(fd)


def test_info_json_is_what_info_prints(plain_mount):
    shown = run_imgkit("info", "--json", captured(), check=True).stdout
    with open(os.path.join(plain_mount, "info.json")) as f:
        mounted_doc = f.read()
    assert mounted_doc == shown
    assert json.loads(mounted_doc)["partition_table"]["type"] == "gpt"


def test_read_only_nosuid_nodev(plain_mount):
    with open("/proc/self/mountinfo") as f:
        line = next(l for l in f if l.split()[4] == plain_mount)
    opts = line.split()[5].split(",")
    assert {"ro", "nosuid", "nodev"} <= set(opts), line
    assert " - fuse.imgkit imgkit " in line
    with pytest.raises(OSError) as e:
        open(os.path.join(plain_mount, "disk.raw"), "r+b")
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        os.mkdir(os.path.join(plain_mount, "new"))
    st = os.stat(os.path.join(plain_mount, "disk.raw"))
    assert st.st_mode & 0o777 == 0o444


def test_encrypted_image_asks_the_password_once_before_mounting(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    image = captured("--encrypt", "--password-file", str(pw))
    mp = str(tmp_path / "m")
    with mounted(image, mp, "--password-file", str(pw)):
        assert sha256_file(os.path.join(mp, "disk.raw")) == sha256_file(built_disk()["disk"])
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    proc = run_imgkit("mount", image, mp, "--password-file", str(wrong), env=ENV)
    assert_one_line_error(proc, 3, "password")
    assert not mounted_here(mp)
    proc = run_imgkit("mount", image, mp, env=ENV)  # no terminal, no password: refused, not hung
    assert_one_line_error(proc, 3, "password")


def test_split_image(tmp_path):
    image = captured("--split-size", "2M", "--chunk-size", "256K")
    assert os.path.exists(image + ".002")
    mp = str(tmp_path / "m")
    with mounted(image, mp):
        assert sha256_file(os.path.join(mp, "disk.raw")) == sha256_file(built_disk()["disk"])
        assert sha256_file(os.path.join(mp, "partitions", "p2.raw")) == sha256_file(
            os.path.join(mp, "partitions", "ESP.raw"))


def test_raw_disk_file(tmp_path):
    mp = str(tmp_path / "m")
    with mounted(built_disk()["disk"], mp):
        assert sha256_file(os.path.join(mp, "disk.raw")) == sha256_file(built_disk()["disk"])
        assert sorted(os.listdir(os.path.join(mp, "files"))) == ["p1", "p2", "p3", "p4", "p5"]


def test_clear_errors(tmp_path):
    image = captured()
    proc = run_imgkit("mount", image, tmp_path / "missing", env=ENV)
    assert_one_line_error(proc, 3, "no such directory")
    afile = tmp_path / "file"
    afile.write_text("x")
    assert_one_line_error(run_imgkit("mount", image, afile, env=ENV), 3, "not a directory")
    assert_one_line_error(run_imgkit("mount", tmp_path / "nope.imgk", tmp_path, env=ENV), 3, "no such file")
    bad = tmp_path / "bad.imgk"
    with open(image, "rb") as f:
        bad.write_bytes(f.read()[:8192])  # an imgk header without its trailer
    assert_one_line_error(run_imgkit("mount", bad, tmp_path, env=ENV), 3)
    mp = str(tmp_path / "m")
    with mounted(image, mp):
        proc = run_imgkit("mount", image, mp, env=ENV)
        assert_one_line_error(proc, 3, "already a mount point")
    assert_one_line_error(run_imgkit("umount", mp), 3, "not mounted")


def test_missing_dev_fuse_is_an_environment_problem(monkeypatch):
    # A mock, because /dev/fuse cannot be removed from under the other tests: only the check is faked.
    from imgkit.operations import mount as m
    from imgkit.errors import EnvironmentProblem
    real_exists = os.path.exists
    monkeypatch.setattr(m.os.path, "exists", lambda p: False if p == "/dev/fuse" else real_exists(p))
    with pytest.raises(EnvironmentProblem) as e:
        m.check_fuse()
    assert e.value.exit_code == 4 and "/dev/fuse" in str(e.value)


def test_allow_other_adds_default_permissions(tmp_path):
    mp = str(tmp_path / "m")
    with mounted(captured(), mp, "--allow-other"):
        with open("/proc/self/mountinfo") as f:
            line = next(l for l in f if l.split()[4] == mp)
        assert "allow_other" in line and "default_permissions" in line, line
