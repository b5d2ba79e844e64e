"""imgkit/platform/writeback.py: a hint that must never fail the operation that gives it."""
from __future__ import annotations

import os

from imgkit.platform.writeback import WritebackNudger, start_writeback


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
    from imgkit.platform.writeback import replace_small_file
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


def test_keep_freed_buffers_stops_refaulting_chunk_buffers():
    # Fresh interpreters: six 2 MiB buffers in flight (a capture's chunks), freed, 20 rounds. With
    # glibc's defaults the freed heap top is trimmed back to the kernel and faulted in again each
    # round; after keep_freed_buffers() the same memory is reused.
    import subprocess
    import sys
    code = ("import resource, sys\n"
            "from imgkit.platform.parallel import keep_freed_buffers\n"
            "kept = keep_freed_buffers() if sys.argv[1] == 'keep' else None\n"
            "def faults():\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for _ in range(20):\n"
            "        bufs = [bytearray(2 << 20) for _ in range(6)]\n"
            "        for b in bufs:\n"
            "            b[::4096] = b'x' * len(b[::4096])\n"
            "        del bufs\n"
            "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
            "faults()\n"  # the first rounds grow the heap either way
            "print(kept, faults())\n")

    def run(mode):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])
    (_, plain), (kept, after) = run("default"), run("keep")
    assert kept == "True" and plain > 1000 and after < plain / 10, (plain, after)
