"""Bounded input before any work (issue 13, cases 5 and 6): capture refuses a disk its index cannot
describe before reading it, naming the --chunk-size that can; a password is one bounded line."""
from __future__ import annotations

import os

import pytest

from imgk_forge import run_measured
from imgkit.formats import imgk_layout as L

TiB = 1 << 40


def test_capture_of_a_disk_too_large_for_the_index_fails_at_once(tmp_path):
    huge = tmp_path / "huge.raw"
    with open(huge, "wb") as f:
        f.truncate(15 * TiB)  # sparse: 112 s and 871 MiB before the error, before this check
    code, out, err, rss, seconds = run_measured("capture", huge, tmp_path / "huge.imgk")
    assert code == 3 and "Traceback" not in err, err
    assert "use --chunk-size 4M" in err and seconds < 10, (err, seconds)
    assert not os.path.exists(tmp_path / "huge.imgk")
    # the chunk size it names does fit
    assert 15 * TiB <= L.max_logical_size(4 << 20) and 15 * TiB > L.max_logical_size(2 << 20)
    assert L.chunk_size_for(15 * TiB) == 4 << 20
    assert L.chunk_size_for(1 << 60) is None


@pytest.mark.parametrize("command", ["capture", "info"])
def test_password_file_dev_zero_fails_fast(tmp_path, command):
    src = tmp_path / "src.raw"
    src.write_bytes(b"x" * 65536)
    args = (["capture", "--encrypt", "--password-file", "/dev/zero", src, tmp_path / "o.imgk"]
            if command == "capture" else ["info", "--password-file", "/dev/zero", src])
    code, out, err, rss, seconds = run_measured(*args, timeout=30)
    if command == "info":  # a raw file never asks for the password: nothing is read
        assert code == 0, err
        return
    assert code == 3 and "longer than 4096 bytes" in err and "Traceback" not in err, err
    assert seconds < 10 and rss < 200 << 20


def test_password_is_the_first_line_within_the_bound(tmp_path):
    from imgkit.cli.options import MAX_PASSWORD_BYTES, password_from_env_or_file
    from imgkit.errors import InputError
    f = tmp_path / "pw"
    f.write_bytes(b"secret\r\nsecond line\n")
    assert password_from_env_or_file(str(f)) == b"secret"
    f.write_bytes(b"p" * MAX_PASSWORD_BYTES + b"\r\n" + b"rest" * 100000)
    assert password_from_env_or_file(str(f)) == b"p" * MAX_PASSWORD_BYTES
    f.write_bytes(b"p" * (MAX_PASSWORD_BYTES + 1))
    with pytest.raises(InputError, match="longer than"):
        password_from_env_or_file(str(f))
    f.write_bytes(b"p" * MAX_PASSWORD_BYTES)  # no line end at all
    assert password_from_env_or_file(str(f)) == b"p" * MAX_PASSWORD_BYTES
