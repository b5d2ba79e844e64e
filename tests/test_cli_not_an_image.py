"""Every command that reads an image, given a directory or a FIFO where the image goes: one clear line
and exit 3 (formats/sources.open_for_reading refuses both). Before, a directory opened read-only
without error and failed at the first pread with a bare "Is a directory" (verify, passwd,
consolidate, split, join), and a FIFO blocked the command forever waiting for a writer."""
from __future__ import annotations

import os

import pytest

from tests.conftest import assert_one_line_error, run_imgkit

COMMANDS = [["info"], ["verify"], ["passwd"], ["split", "--split-size", "1M"], ["join"],
            ["restore", "{out}"], ["convert", "--to", "raw", "{out}"], ["capture", "{out}"]]


@pytest.fixture(params=["directory", "fifo"])
def not_an_image(request, tmp_path):
    path = tmp_path / "image.imgk"
    if request.param == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    return request.param, path


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_directory_or_fifo_as_the_image_is_one_line(command, not_an_image, tmp_path):
    kind, path = not_an_image
    out = tmp_path / "out.raw"
    args = [command[0], *[a for a in command[1:] if a != "{out}"], path]
    args += [out] if "{out}" in command else []
    proc = run_imgkit(*args, timeout=60)  # a FIFO used to block here
    assert_one_line_error(proc, 3, str(path))
    if kind == "directory":
        assert "is a directory" in proc.stderr
    # a FIFO: refused when opened ("not a block device or regular file"), or before, by a check of
    # its own (restore of an .imgk name: "not an imgk image"; passwd/split/join, which replace the
    # image in place: "writes ... only to regular files"); never a wait for a writer
    assert not out.exists()
