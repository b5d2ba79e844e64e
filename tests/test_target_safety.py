"""Never the wrong target (issue #12): real loop devices and real mounts. Every refusal asserts that
the target's bytes are unchanged and that the message names the device and the reason.

The mounted filesystems are ext4s the tests make themselves (never an image's filesystem)."""
import contextlib
import hashlib
import json
import os
import subprocess

import pytest

from conftest import assert_one_line_error, loop_device, needs_root, pattern_bytes, run_imgkit

pytestmark = [needs_root, pytest.mark.root]
MiB = 1 << 20


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@contextlib.contextmanager
def mounted(dev, where):
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-o", "rw", str(dev), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def ext4_file(path, size=8 * MiB, offset=0):
    """A file with an ext4 of `size` at byte `offset` (the rest pattern bytes)."""
    with open(path, "wb") as f:
        f.write(pattern_bytes(offset + size + 2 * MiB, seed=7))
    fs = str(path) + ".fs"
    with open(fs, "wb") as f:
        f.truncate(size)
    # No lazy init: a mounted ext4 would otherwise keep writing its inode tables in the background,
    # and the tests compare the backing file's bytes before and after a refusal.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", fs], check=True)
    with open(fs, "rb") as src, open(path, "r+b") as dst:
        dst.seek(offset)
        dst.write(src.read())
    os.unlink(fs)
    return path


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    raw = d / "src.raw"
    raw.write_bytes(pattern_bytes(3 * MiB, seed=3))
    img = d / "small.imgk"
    run_imgkit("capture", raw, img, "--sector-by-sector", "--progress", "none", check=True)
    return d, raw, img


def refused(img, dev, backing, *needles, extra=()):
    """restore (and its dry run: same checks, same exit code) refused; `backing` unchanged."""
    os.sync()
    before = sha(backing)
    for args in (("--yes",), ("--dry-run",)):
        assert_one_line_error(run_imgkit("restore", img, dev, *args, *extra), 3, dev, *needles)
    assert sha(backing) == before


def test_alias_loop_over_a_mounted_file_is_refused(small_image, tmp_path):
    """(a) two loop devices over one file, one mounted: the other is the same disk."""
    _, _, img = small_image
    f = ext4_file(tmp_path / "alias.raw")
    with loop_device(f) as first, loop_device(f) as alias, mounted(first, tmp_path / "m"):
        refused(img, alias, f, "mounted", first, "alias")


def test_loop_stacked_on_the_target_and_target_stacked_on_a_mounted_loop(small_image, tmp_path):
    """(b) loop-over-loop, both ways: the stack's top mounted, or its bottom mounted."""
    _, _, img = small_image
    f = ext4_file(tmp_path / "stack.raw")
    with loop_device(f) as bottom, loop_device(bottom) as top:
        with mounted(top, tmp_path / "m1"):
            refused(img, bottom, f, "mounted", top, "built on it")
        with mounted(bottom, tmp_path / "m2"):
            refused(img, top, f, "mounted", bottom, "lies on")


def test_offset_loop_over_a_range_of_the_target_is_refused(small_image, tmp_path):
    """(c) a 'partition' attached with losetup -o/--sizelimit and mounted refuses the whole disk;
    a partition restore to a range that does not overlap it is allowed."""
    d, raw, img = small_image
    f = ext4_file(tmp_path / "parted.raw", size=8 * MiB, offset=4 * MiB)
    with loop_device(f) as disk, loop_device(f, "-o", str(4 * MiB), "--sizelimit", str(8 * MiB)) as part:
        with mounted(part, tmp_path / "m"):
            refused(img, disk, f, "mounted", part)
            # The mounted range is refused through a loop over the disk loop too (any depth).
            with loop_device(disk) as above:
                refused(img, above, f, "mounted", part)


def test_image_read_from_a_filesystem_on_the_target_is_refused(small_image, tmp_path):
    """The first case of the issue: the filesystem holding the image, reached through an alias."""
    _, _, img = small_image
    f = ext4_file(tmp_path / "holder.raw")
    with loop_device(f) as first, mounted(first, tmp_path / "m") as m:
        inside = m / "inside.imgk"
        inside.write_bytes(img.read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(m)], check=True)  # no journal commit later
        with loop_device(f) as alias:
            refused(inside, alias, f, "holds the image being read")


def test_loop_backed_by_the_image_itself_is_refused(small_image, tmp_path):
    _, _, img = small_image
    copy = tmp_path / "self.imgk"
    copy.write_bytes(img.read_bytes())  # stored at least as large as the 3 MiB logical size
    with loop_device(copy) as dev:
        refused(copy, dev, copy, "image being read")


def test_read_only_device_refused_up_front(small_image, tmp_path):
    _, _, img = small_image
    f = tmp_path / "ro.raw"
    f.write_bytes(pattern_bytes(6 * MiB, seed=9))
    with loop_device(f, "-r") as dev:
        refused(img, dev, f, "read-only")
        p = run_imgkit("restore", img, dev, "--partition", "1", "--dry-run")
        assert p.returncode == 3


def test_missing_device_path_is_an_error_and_nothing_appears_under_dev(small_image):
    _, _, img = small_image
    for args in (("--yes",), ("--dry-run",)):
        assert_one_line_error(run_imgkit("restore", img, "/dev/imgkit-no-such-disk", *args), 3,
                              "/dev/imgkit-no-such-disk", "no such device")
    assert not os.path.exists("/dev/imgkit-no-such-disk")


def test_file_target_attached_as_loop_device_is_refused(small_image, tmp_path):
    _, _, img = small_image
    f = tmp_path / "attached.raw"
    f.write_bytes(pattern_bytes(6 * MiB, seed=11))
    with loop_device(f) as dev:
        before = sha(f)
        assert_one_line_error(run_imgkit("restore", img, f, "--yes"), 3, str(f), dev)
        assert sha(f) == before


def test_larger_file_target_keeps_its_size(small_image, tmp_path):
    _, raw, img = small_image
    f = tmp_path / "vmdisk.raw"
    f.write_bytes(b"\xee" * (8 * MiB))
    plan = run_imgkit("restore", img, f, "--dry-run", "--json", check=True)
    doc = json.loads(plan.stdout)
    assert doc["plan"]["final_size"] == 8 * MiB and "keeps its size (8.0 MiB)" in doc["plan"]["text"]
    run_imgkit("restore", img, f, "--yes", check=True)
    data = f.read_bytes()
    assert len(data) == 8 * MiB
    assert data[:3 * MiB] == raw.read_bytes() and data[3 * MiB:] == bytes(5 * MiB)


def test_restore_to_a_free_loop_still_works_and_says_done(small_image, tmp_path):
    """The checks refuse what they must and nothing else: a free loop device is restored, with a
    real total and a final done event in --progress json."""
    _, raw, img = small_image
    f = tmp_path / "free.raw"
    f.write_bytes(b"\x11" * (6 * MiB))
    with loop_device(f) as dev:
        p = run_imgkit("restore", img, dev, "--yes", "--progress", "json", check=True)
    events = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("{")]
    assert events and events[-1]["event"] == "done" and events[-1]["total"] == 3 * MiB
    assert f.read_bytes()[:3 * MiB] == raw.read_bytes()


# -- image paths: never a device, never under /dev -----------------------------------------------------
def test_capture_onto_a_device_node_is_refused_even_with_force(small_image, tmp_path):
    _, raw, img = small_image
    f = tmp_path / "victim.raw"
    f.write_bytes(pattern_bytes(6 * MiB, seed=13))
    before = sha(f)
    with loop_device(f) as dev:
        assert_one_line_error(run_imgkit("capture", dev, dev, "--force"), 3, dev, "device node")
        # Arguments swapped (meant restore): said so.
        p = run_imgkit("capture", img, dev, "--force")
        assert_one_line_error(p, 3, dev, "device node")
        assert "did you mean `imgkit restore" in p.stderr
        assert_one_line_error(run_imgkit("convert", img, dev, "--to", "raw", "--force"), 3, dev)
        assert os.path.exists(dev) and os.path.isfile(dev) is False
    assert sha(f) == before
    assert_one_line_error(run_imgkit("capture", raw, "/dev/imgkit-typo.imgk"), 3, "under /dev")
    assert not os.path.exists("/dev/imgkit-typo.imgk")


def test_split_volume_names_are_checked_against_force_and_the_source(small_image, tmp_path):
    _, raw, img = small_image
    big = tmp_path / "big.raw"
    big.write_bytes(pattern_bytes(20 * MiB, seed=5))
    out = tmp_path / "x.imgk"
    run_imgkit("capture", big, out, "--split-size", "8M", "--no-compress", "--sector-by-sector",
               "--progress", "none", check=True)
    vol2 = tmp_path / "x.imgk.002"
    assert vol2.exists()
    # A stale x.imgk.003 (or any volume name) is not replaced without --force.
    (tmp_path / "y.imgk.003").write_bytes(b"keep me")
    assert_one_line_error(run_imgkit("capture", raw, tmp_path / "y.imgk"), 3, "y.imgk.003", "already exists")
    assert (tmp_path / "y.imgk.003").read_bytes() == b"keep me"
    # Capturing a volume into its own image name with --force would destroy the source: refused.
    before = sha(vol2)
    assert_one_line_error(run_imgkit("capture", vol2, out, "--split-size", "8M", "--force"), 3,
                          "x.imgk.002", "source")
    assert sha(vol2) == before


def test_a_destination_that_appears_meanwhile_is_not_replaced(tmp_path):
    """publish() (renameat2 RENAME_NOREPLACE): the second writer fails, the first one's file stays."""
    from imgkit.platform.writeback import publish
    a, b, final = tmp_path / "a", tmp_path / "b", tmp_path / "final"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    publish(str(a), str(final))
    with pytest.raises(FileExistsError) as e:
        publish(str(b), str(final))
    assert e.value.filename == str(final)
    assert final.read_bytes() == b"first" and b.exists()
    publish(str(b), str(final), replace=True)
    assert final.read_bytes() == b"second"
