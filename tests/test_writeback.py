"""imgkit/platform/writeback.py: a hint that must never fail the operation that gives it; the
OutputWriter writes every byte where it was given, directly or not, and reports a full disk."""
from __future__ import annotations

import errno
import os
import random
import subprocess
import threading

import pytest

from imgkit.platform.writeback import DIRECT_ALIGN, OutputWriter, WritebackNudger, start_writeback


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


# -- OutputWriter: a large output written on writer threads, directly to the disk where it can be ----

def _scattered_writes(rng, size):
    """(offset, bytes) pieces of every alignment: runs of consecutive pieces (joined by the writer),
    gaps (holes), pieces crossing the staging buffers' ends, unaligned heads and tails."""
    pos, writes = 0, []
    while pos < size:
        n = rng.choice([1, 511, 4096, 5000, 65536, 300_000, 1 << 20])
        n = min(n, size - pos)
        writes.append((pos, rng.randbytes(n)))
        pos += n + rng.choice([0, 0, 0, 1, 4096, 12345])
    return writes


@pytest.mark.parametrize("direct", [True, False])
def test_output_writer_writes_every_byte_where_it_was_given(tmp_path, direct):
    rng = random.Random(7)
    size = 24 << 20
    writes = _scattered_writes(rng, size)
    rng.shuffle(writes[len(writes) // 2:])  # and some out of order
    expected = bytearray(size)
    path = tmp_path / "out.bin"
    with OutputWriter(str(path), stage=1 << 20, direct=direct) as out:
        for off, data in writes:
            out.write(off, memoryview(data))
            expected[off:off + len(data)] = data
        out.truncate(size)
    assert path.read_bytes() == bytes(expected)
    total = sum(len(d) for _, d in writes)
    assert out.direct_bytes + out.buffered_bytes == total
    if direct:  # tmp_path is on ext4 here: O_DIRECT is taken; only unaligned heads and tails are buffered
        assert out.direct and out.direct_bytes > total * 0.8 and out.direct_bytes % DIRECT_ALIGN == 0
    else:
        assert out.direct_bytes == 0


def test_output_writer_falls_back_when_a_direct_write_is_refused(tmp_path, monkeypatch):
    # A mock, because no filesystem on this machine takes O_DIRECT at open and then refuses the write
    # (some FUSE filesystems do): the direct descriptor's pwrite fails with EINVAL.
    real = os.pwrite
    out = OutputWriter(str(tmp_path / "out.bin"), stage=1 << 20)
    assert out.direct
    direct_fd = out._dfd

    def pwrite(fd, data, offset):
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom(3 << 20)
    out.write(8192, data)
    out.close()
    assert not out.direct and out.direct_bytes == 0 and out.buffered_bytes == len(data)
    assert (tmp_path / "out.bin").read_bytes() == bytes(8192) + data


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts a small tmpfs)")
@pytest.mark.parametrize("direct", [True, False])
def test_output_writer_full_disk_raises_and_stops(tmp_path, direct):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full)], check=True)
    try:
        out = OutputWriter(str(full / "out.bin"), stage=1 << 20, direct=direct)
        with pytest.raises(OSError) as e:
            for i in range(8):  # 8 MiB into 2 MiB: a write or the close reports the writer's error
                out.write(i << 20, os.urandom(1 << 20))
            out.close()
        assert e.value.errno == errno.ENOSPC
        out.close()  # after an error: closes quietly, no thread left behind
        assert not any(t.name == "imgkit-writer" and t.is_alive() for t in threading.enumerate())
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_preallocate_then_discard_keeps_the_bytes_and_the_holes(tmp_path):
    path = tmp_path / "out.bin"
    data = os.urandom(4 << 20)
    with OutputWriter(str(path)) as out:
        out.preallocate(0, 12 << 20)  # three 4 MiB pieces; the middle one turns out not to be written
        assert os.stat(path).st_blocks * 512 >= 12 << 20  # allocated now (ext4 takes fallocate)
        out.write(0, data)
        out.discard(4 << 20, 4 << 20)
        out.write(8 << 20, data)
        out.truncate(12 << 20)
    assert path.read_bytes() == data + bytes(4 << 20) + data
    assert os.stat(path).st_blocks * 512 <= 8 << 20 + 65536  # the discarded piece is a hole again
    with open(path, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 4 << 20


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts a small tmpfs)")
def test_preallocate_leaves_a_nearly_full_filesystem_alone(tmp_path):
    # A failed fallocate may keep what it allocated: never try one that could take the space the
    # writes themselves need (a sparse output that fits would otherwise fail).
    full = tmp_path / "small"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(full)], check=True)
    try:
        with OutputWriter(str(full / "out.bin")) as out:
            out.preallocate(0, 60 << 20)  # fits, but not with the spare room left to others
            assert os.stat(full / "out.bin").st_blocks == 0
            out.write(0, b"x" * 4096)
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_publish_file_keeps_a_name_that_appeared_unless_told_to_replace(tmp_path):
    import pytest

    from imgkit.platform.writeback import publish_file
    final, tmp = tmp_path / "out.iso", tmp_path / "tmp.iso"
    tmp.write_bytes(b"new")
    publish_file(str(tmp), str(final))
    assert final.read_bytes() == b"new" and not tmp.exists()
    tmp.write_bytes(b"newer")
    with pytest.raises(FileExistsError) as e:
        publish_file(str(tmp), str(final))
    assert e.value.filename == str(final)
    assert final.read_bytes() == b"new" and tmp.read_bytes() == b"newer"  # nothing lost either way
    publish_file(str(tmp), str(final), replace=True)
    assert final.read_bytes() == b"newer" and not tmp.exists()
    os.mkdir(tmp_path / "dir")
    tmp.write_bytes(b"x")
    with pytest.raises(FileExistsError):  # --force replaces a file, never a directory
        publish_file(str(tmp), str(tmp_path / "dir"), replace=True)


def test_output_writer_closes_its_files_when_a_buffer_cannot_be_had(tmp_path, monkeypatch):
    """The staging buffers are allocated after both descriptors are open: running out of memory there
    must not leak the descriptors (or the buffers made so far), since no object exists to close."""
    import imgkit.platform.writeback as wb
    made = []

    def second_fails(size):
        if made:
            raise MemoryError
        made.append(wb.mmap.mmap(-1, size))
        return made[-1]
    monkeypatch.setattr(wb, "_stage_buffer", second_fails)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(MemoryError):
        OutputWriter(str(tmp_path / "out.raw"), direct=True)
    assert set(os.listdir("/proc/self/fd")) <= before
    assert made and made[0].closed
    assert not [t for t in threading.enumerate() if t.name == "imgkit-writer"]


def test_output_writer_not_durable_leaves_everything_to_the_page_cache(tmp_path, monkeypatch):
    # convert --no-sync: no O_DIRECT, no writeback hints (the kernel writes back when it likes), one
    # writer thread (buffered writes serialize on the inode lock), and still every byte in place.
    import imgkit.platform.writeback as wb
    hints = []
    monkeypatch.setattr(wb, "start_writeback", lambda *a: hints.append(a))
    rng = random.Random(8)
    size = 80 << 20  # more than WRITEBACK_STEP buffered bytes: a durable writer would have hinted
    writes = _scattered_writes(rng, size)
    expected = bytearray(size)
    path = tmp_path / "out.bin"
    with OutputWriter(str(path), stage=1 << 20, durable=False) as out:
        assert not out.direct and len(out._threads) == 1
        for off, data in writes:
            out.write(off, data)
            expected[off:off + len(data)] = data
        out.truncate(size)
    assert path.read_bytes() == bytes(expected)
    assert out.direct_bytes == 0 and out.buffered_bytes == sum(len(d) for _, d in writes) > wb.WRITEBACK_STEP
    assert hints == []
    with OutputWriter(str(tmp_path / "durable.bin"), stage=1 << 20, direct=False) as out:  # the control
        out.write(0, bytes(wb.WRITEBACK_STEP + (1 << 20)))
    assert hints


def test_publish_file_without_sync_renames_and_never_fsyncs(tmp_path, monkeypatch):
    from imgkit.platform import writeback as wb
    final, tmp = tmp_path / "out.raw", tmp_path / "tmp.raw"
    tmp.write_bytes(b"scratch")

    def no_fsync(fd):
        raise AssertionError("fsync called")
    monkeypatch.setattr(wb.os, "fsync", no_fsync)
    wb.publish_file(str(tmp), str(final), sync=False)
    assert final.read_bytes() == b"scratch" and not tmp.exists()
    tmp.write_bytes(b"again")
    with pytest.raises(FileExistsError):  # the rename keeps its rules: nothing replaced unasked
        wb.publish_file(str(tmp), str(final), sync=False)
    with pytest.raises(AssertionError, match="fsync called"):  # the control: a durable publish fsyncs
        wb.publish_file(str(tmp), str(final), replace=True)
