"""imgkit/writeback.py: a hint that must never fail the operation that gives it."""
from __future__ import annotations

import os

from imgkit.writeback import WritebackNudger, start_writeback


def test_start_writeback_ignores_what_it_cannot_do(tmp_path):
    start_writeback(-1)  # a bad descriptor: ignored
    r, w = os.pipe()  # fadvise on a pipe fails with ESPIPE: ignored
    try:
        start_writeback(w)
    finally:
        os.close(r)
        os.close(w)


def test_nudger_waits_for_the_file_and_keeps_data_intact(tmp_path):
    path = tmp_path / "out.bin"
    n = WritebackNudger(str(path), interval=0)
    n.poll()  # the file does not exist yet: nothing happens
    assert n._fd is None
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    n.poll()
    assert n._fd is not None
    n.poll()
    n.close()
    assert n._fd is None
    assert path.read_bytes() == data  # dropped pages are written back, never lost


def test_replace_small_file_is_whole_or_old_and_leaves_no_temp(tmp_path):
    from imgkit.writeback import replace_small_file
    path = tmp_path / "report.xml"
    path.write_text("old")
    replace_small_file(str(path), "new text", mode=0o600)
    assert path.read_text() == "new text" and (path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.xml"]

    try:  # a write that fails half way (here: not text): the old file stays, the temp goes
        replace_small_file(str(path), 12345)
    except TypeError:
        pass
    else:
        raise AssertionError("the write should have failed")
    assert path.read_text() == "new text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.xml"]
