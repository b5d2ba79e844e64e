"""imgkit passwd: the same data key wrapped under a new password; only the key slot and the header
checksum of every volume change."""
from __future__ import annotations

import hashlib
import os

import pytest

from imgkit.formats import imgk_layout as L

from conftest import assert_one_line_error, run_imgkit
from crypto_volumes_support import (OTHER_PASSWORD, PASSWORD, capture_in_process, copy_image, make_source,
                                     read_all, run_on_tty)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("passwd")
    src = d / "disk.raw"
    expected = make_source(str(src), chunks=12)
    encs = capture_in_process(str(src), str(d / "encs.imgk"), split_size=200 << 10)
    plain = capture_in_process(str(src), str(d / "plain.imgk"), password=None)
    (d / "old").write_bytes(PASSWORD + b"\n")
    (d / "new").write_bytes(OTHER_PASSWORD + b"\n")
    return {"dir": d, "expected": expected, "encs": encs, "plain": plain, "old": d / "old", "new": d / "new"}


def _digests(paths):
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_passwd_rewrites_only_key_slots(base, tmp_path):
    vols = copy_image(base["encs"], str(tmp_path / "e.imgk"))
    assert len(vols) >= 2
    before = [open(v, "rb").read() for v in vols]
    proc = run_imgkit("passwd", vols[0], "--password-file", base["old"], "--new-password-file", base["new"])
    assert proc.returncode == 0, proc.stderr
    assert f"({len(vols)} volumes)" in proc.stdout
    slot_range = range(L.KEY_SLOT_OFFSET, L.KEY_SLOT_OFFSET + L.KEY_SLOT_SIZE)
    check_range = range(L.HEADER_CHECKSUM_OFFSET, L.HEADER_SIZE)
    slots = set()
    for old, v in zip(before, vols):
        new = open(v, "rb").read()
        assert len(new) == len(old)
        changed = [i for i in range(len(old)) if old[i] != new[i]] if len(old) < 1 << 20 else None
        assert changed and all(i in slot_range or i in check_range for i in changed)
        slots.add(new[slot_range.start:slot_range.stop])
    assert len(slots) == 1  # every volume carries the same new slot
    with pytest.raises(Exception, match="wrong password"):
        read_all(vols[0], PASSWORD)
    assert read_all(vols[0], OTHER_PASSWORD) == base["expected"]
    out = tmp_path / "r.raw"
    run_imgkit("restore", vols[0], out, "--yes", "--password-file", base["new"], check=True)
    assert out.read_bytes() == base["expected"]


def test_passwd_wrong_old_password_changes_nothing(base, tmp_path):
    vols = copy_image(base["encs"], str(tmp_path / "e.imgk"))
    before = _digests(vols)
    proc = run_imgkit("passwd", vols[0], "--password-file", base["new"], "--new-password-file", base["old"])
    assert_one_line_error(proc, 3, "wrong password")
    assert _digests(vols) == before


def test_passwd_refuses_damaged_or_incomplete_image(base, tmp_path):
    vols = copy_image(base["encs"], str(tmp_path / "e.imgk"))
    os.unlink(vols[-1])
    before = _digests(vols[:-1])
    proc = run_imgkit("passwd", vols[0], "--password-file", base["old"], "--new-password-file", base["new"])
    assert_one_line_error(proc, 3, f"volume {len(vols)}")
    assert _digests(vols[:-1]) == before


def test_passwd_plain_image_refused(base):
    proc = run_imgkit("passwd", base["plain"][0], "--password-file", base["old"],
                      "--new-password-file", base["new"])
    assert_one_line_error(proc, 3, "not encrypted")


def test_passwd_from_environment(base, tmp_path):
    vols = copy_image(base["encs"], str(tmp_path / "e.imgk"))
    proc = run_imgkit("passwd", vols[0], env={"IMGKIT_PASSWORD": PASSWORD.decode(),
                                               "IMGKIT_NEW_PASSWORD": "from-env"})
    assert proc.returncode == 0, proc.stderr
    assert read_all(vols[0], b"from-env") == base["expected"]


def test_passwd_without_new_password_and_terminal_refused(base, tmp_path):
    vols = copy_image(base["encs"], str(tmp_path / "e.imgk"))
    before = _digests(vols)
    proc = run_imgkit("passwd", vols[0], "--password-file", base["old"], input="")
    assert_one_line_error(proc, 3, "new password")
    assert _digests(vols) == before


def test_passwd_prompts_old_once_new_twice(base, tmp_path):
    vols = copy_image(base["encs"], str(tmp_path / "e.imgk"))
    code, shown = run_on_tty(["passwd", vols[0]], [PASSWORD.decode(), "typed-new", "typed-new"])
    assert code == 0, shown
    assert shown.count("Password:") == 1 and "New password:" in shown and "Repeat the password:" in shown
    assert read_all(vols[0], b"typed-new") == base["expected"]
