"""restore --keep-going (issue 13): a damaged chunk does not stop the restore; its range is written
as zeros, the report names the range, its partition and the ext4 file(s) whose blocks it held
(debugfs icheck/ncheck on the restored target), and the exit status is 1. The disk is made here:
an MBR partition holding an ext4 built by mkfs.ext4 -d (no mount)."""
from __future__ import annotations

import json
import random
import re
import struct
import subprocess

import pytest

import imgkit
from imgk_forge import run_measured
from imgkit.formats.imgk_reader import ImageReader

MiB = 1 << 20
CHUNK = 64 << 10
PART_START = MiB


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    d = tmp_path_factory.mktemp("keepgoing")
    files = d / "files"
    files.mkdir()
    rng = random.Random(13)
    for name in ("alpha.bin", "beta.bin", "gamma.bin"):
        (files / name).write_bytes(rng.randbytes(300 << 10))
    fs = d / "fs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(files), "-L", "kg", str(fs), "15M"], check=True)
    disk = bytearray(16 * MiB)
    disk[PART_START:PART_START + 15 * MiB] = fs.read_bytes()
    disk[446:462] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", PART_START // 512, 15 * MiB // 512)
    disk[510:512] = b"\x55\xaa"
    raw = d / "disk.raw"
    raw.write_bytes(bytes(disk))
    # where the middle of beta.bin lies on the disk (its 64 KiB chunk then holds nothing else)
    out = subprocess.run(["debugfs", "-R", "blocks /beta.bin", str(fs)], capture_output=True, text=True, check=True).stdout
    blocks = [int(b) for b in out.split()]
    block = blocks[len(blocks) // 2]
    assert blocks == list(range(blocks[0], blocks[0] + len(blocks)))  # contiguous, as mkfs -d writes it
    at = PART_START + block * 4096
    img = d / "disk.imgk"
    imgkit.capture(str(raw), str(img), chunk_size=CHUNK, sector_by_sector=True)
    chunk = at // CHUNK
    with ImageReader(str(img)) as r:
        entry = r.index[chunk]
    buf = bytearray(img.read_bytes())
    buf[entry.offset + entry.stored_length // 2] ^= 0xFF
    img.write_bytes(bytes(buf))
    return {"img": img, "disk": bytes(disk), "chunk": chunk, "dir": d}


def test_keep_going_zeroes_the_damaged_chunk_and_names_the_file(damaged, tmp_path):
    target = tmp_path / "out.raw"
    code, out, err, _, _ = run_measured("restore", "-y", "--keep-going", damaged["img"], target)
    assert code == 1, err
    assert "Traceback" not in err
    lo = damaged["chunk"] * CHUNK
    assert f"bytes {lo}..{lo + CHUNK - 1} (partition 1, ext4)" in err, err
    assert "/beta.bin" in err and "/alpha.bin" not in err, err
    restored = target.read_bytes()
    want = bytearray(damaged["disk"])
    want[lo:lo + CHUNK] = bytes(CHUNK)
    assert restored == bytes(want)


def test_keep_going_json_report(damaged, tmp_path):
    target = tmp_path / "out.raw"
    code, out, err, _, _ = run_measured("restore", "-y", "--keep-going", "--json", damaged["img"], target)
    assert code == 1
    doc = json.loads(out)
    [r] = doc["damaged"]
    assert r["offset"] == damaged["chunk"] * CHUNK and r["length"] == CHUNK and r["partition"] == 1
    assert r["files"] == ["/beta.bin"]


def test_without_keep_going_the_restore_stops_and_leaves_no_target(damaged, tmp_path):
    target = tmp_path / "out.raw"
    code, out, err, _, _ = run_measured("restore", "-y", damaged["img"], target)
    assert code == 3 and "Traceback" not in err and re.search(r"chunk at offset \d+", err), err
    assert not target.exists()


def test_keep_going_on_an_intact_image_exits_0(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(1).randbytes(MiB))
    img = tmp_path / "ok.imgk"
    imgkit.capture(str(src), str(img), chunk_size=CHUNK)
    code, out, err, _, _ = run_measured("restore", "-y", "--keep-going", img, tmp_path / "t.raw")
    assert code == 0 and "DAMAGED" not in err, err
    assert (tmp_path / "t.raw").read_bytes() == src.read_bytes()
