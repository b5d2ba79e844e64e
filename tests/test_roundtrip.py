"""Capture -> verify -> restore round trips through the real CLI, byte-identical."""
import hashlib
import os

import pytest

from conftest import assert_one_line_error, pattern_bytes, run_imgkit

import imgkit
from imgkit.formats.imgk_settings import DEFAULT_CHUNK_SIZE


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_ranges(path):
    from imgkit.formats.sources import RawSource
    with RawSource(str(path)) as s:
        return [(r.offset, r.length) for r in s.runs() if r.kind == "data"]


def sparse_equal(a, b):
    """Compare two (sparse) files by reading only where either has data: holes read as zeros."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off, n in sorted(set(data_ranges(a)) | set(data_ranges(b))):
            for pos in range(off, off + n, 1 << 20):
                m = min(1 << 20, off + n - pos)
                if os.pread(fa.fileno(), m, pos) != os.pread(fb.fileno(), m, pos):
                    return False
    return True


def roundtrip(tmp_path, src, *capture_args):
    img = tmp_path / "img.imgk"
    out = tmp_path / "out.raw"
    run_imgkit("capture", src, img, "--progress", "none", *capture_args, check=True)
    run_imgkit("verify", img, check=True)
    run_imgkit("restore", img, out, "--yes", "--progress", "none", check=True)
    assert sparse_equal(out, src)
    return img, out


@pytest.mark.parametrize("size", [0, 512, 3 * (64 << 10) + 1234, (1 << 20) * 2 + 7])
def test_roundtrip_sizes(tmp_path, size):
    src = tmp_path / "src.raw"
    src.write_bytes(pattern_bytes(size))
    img, out = roundtrip(tmp_path, src, "--chunk-size", "64K")
    assert os.path.getsize(out) == size
    assert imgkit.api.image_info(imgkit.open_image(str(img)))["virtual_size"] == size


@pytest.mark.parametrize("level_args", [["--no-compress"], ["--fast"], ["--high"], ["--level", "7"]])
def test_levels(tmp_path, level_args):
    src = tmp_path / "src.raw"
    src.write_bytes(pattern_bytes(3 << 20, seed=5))
    img, _ = roundtrip(tmp_path, src, *level_args)
    info = imgkit.api.image_info(imgkit.open_image(str(img)))
    level = {"--no-compress": 0, "--fast": 1, "--high": 19, "--level": 7}[level_args[0]]
    assert info["compression"]["level"] == level
    if level == 0:
        assert info["stored_size"] > 3 << 20
    else:
        assert info["stored_size"] < (3 << 20) * 0.95


def test_sparse_file_over_4gib(tmp_path):
    """A 5 GiB sparse file with data at both ends: holes are never read, restore stays sparse."""
    src = tmp_path / "sparse.raw"
    with open(src, "wb") as f:
        f.truncate(5 << 30)
        f.write(b"start" * 1000)
        f.seek((4 << 30) + 12345)
        f.write(pattern_bytes(3 << 20, seed=9))
        f.seek((5 << 30) - 10)
        f.write(b"end!!end!!")
    img, out = roundtrip(tmp_path, src)
    assert os.path.getsize(img) < 4 << 20
    assert os.stat(out).st_blocks * 512 < 64 << 20  # still sparse
    with imgkit.open_image(str(img)) as im:
        assert im.read((5 << 30) - 10, 100) == b"end!!end!!"
        assert im.read((4 << 30) + 12345, 16) == pattern_bytes(16, seed=9)


def test_identical_chunks_stored_once(tmp_path):
    src = tmp_path / "dup.raw"
    block = pattern_bytes(DEFAULT_CHUNK_SIZE, seed=3)  # one chunk, repeated
    src.write_bytes(block * 6)
    img, _ = roundtrip(tmp_path, src)
    info = imgkit.api.image_info(imgkit.open_image(str(img)))
    assert info["chunks"]["data"] == 6
    assert info["stored_size"] < len(block)  # one stored copy, compressed


def test_read_any_offset(tmp_path):
    data = pattern_bytes((5 << 20) + 333, seed=11)
    src = tmp_path / "a.raw"
    src.write_bytes(data)
    img = tmp_path / "a.imgk"
    imgkit.capture(str(src), str(img), chunk_size=64 << 10)
    import random
    rng = random.Random(4)
    with imgkit.open_image(str(img)) as im:
        for _ in range(200):
            off = rng.randrange(0, len(data) + 100)
            n = rng.randrange(0, 300000)
            assert im.read(off, n) == data[off:off + n]
        runs = list(im.runs())
        assert runs[0].offset == 0 and runs[-1].end == len(data)


def test_json_outputs_and_progress(tmp_path):
    import json
    src = tmp_path / "s.raw"
    src.write_bytes(pattern_bytes(4 << 20))
    img = tmp_path / "s.imgk"
    p = run_imgkit("capture", src, img, "--json", "--progress", "json", check=True)
    doc = json.loads(p.stdout)
    assert doc["logical_size"] == 4 << 20 and doc["stored_size"] == os.path.getsize(img)
    events = [json.loads(line) for line in p.stderr.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["done"] == 4 << 20
    info = json.loads(run_imgkit("info", img, "--json", check=True).stdout)
    assert info["virtual_size"] == 4 << 20 and info["chunks"]["data"] == (4 << 20) // DEFAULT_CHUNK_SIZE
    v = json.loads(run_imgkit("verify", img, "--json", check=True).stdout)
    assert v["ok"] is True and v["bad_chunks"] == 0


def test_existing_image_not_overwritten(tmp_path):
    src = tmp_path / "s.raw"
    src.write_bytes(pattern_bytes(1 << 20))
    img = tmp_path / "s.imgk"
    img.write_bytes(b"precious")
    assert_one_line_error(run_imgkit("capture", src, img), 3, "already exists")
    assert img.read_bytes() == b"precious"
    run_imgkit("capture", src, img, "--force", check=True)
    run_imgkit("verify", img, check=True)


def test_bad_inputs_one_line_errors(tmp_path):
    assert_one_line_error(run_imgkit("capture", tmp_path / "missing", tmp_path / "x.imgk"), 3, "no such")
    notimg = tmp_path / "not.imgk"
    notimg.write_bytes(b"hello world" * 1000)
    assert_one_line_error(run_imgkit("restore", notimg, tmp_path / "o.raw", "--yes"), 3)
    p = run_imgkit("verify", notimg)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert_one_line_error(run_imgkit("restore", tmp_path / "nope.imgk", tmp_path / "o.raw", "--yes"), 3, "no such")
    src = tmp_path / "s.raw"
    src.write_bytes(pattern_bytes(1 << 20))
    assert_one_line_error(run_imgkit("capture", src, tmp_path / "nodir" / "x.imgk"), 3, "no such directory")
    p = run_imgkit("capture", src, tmp_path / "x.imgk", "--chunk-size", "1000")
    assert p.returncode == 3 and "power of two" in p.stderr
    p = run_imgkit("capture", src, tmp_path / "x.imgk", "--chunk-size", "12Q")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert_one_line_error(run_imgkit("capture", src, src, "--force"), 3, "source itself")
    assert src.read_bytes() == pattern_bytes(1 << 20)


@pytest.mark.parametrize("algo", ["sha256", "blake3"])
def test_both_chunk_hash_algorithms_read_and_detect_damage(tmp_path, algo):
    """hash_algo 1 (SHA-256) images stay readable now that BLAKE3 (2) is the default."""
    from imgkit.formats import imgk_layout as L
    from imgkit.formats.imgk_reader import ImageReader
    from imgkit.formats.imgk_writer import ChunkEncoder, ImageWriter
    from imgkit.operations.verify import verify_image
    code = {"sha256": L.HASH_SHA256, "blake3": L.HASH_BLAKE3}[algo]
    data = pattern_bytes(4 * (64 << 10) + 77, seed=12)
    path = tmp_path / "h.imgk"
    w = ImageWriter(str(path), len(data), 64 << 10)
    w.header.hash_algo = code  # plain images: the header is rewritten at commit
    enc = ChunkEncoder(3, None, code)
    for i in range(w.header.chunk_count):
        piece = data[i * (64 << 10):(i + 1) * (64 << 10)]
        w.put(enc.prepare(i, piece, len(piece)))
    w.commit({})
    with ImageReader(str(path)) as r:
        assert r.header.hash_algo == code and r.read(0, len(data)) == data
        entry = r.index[1]
    buf = bytearray(path.read_bytes())
    buf[entry.offset + 5] ^= 0x01
    path.write_bytes(buf)
    with ImageReader(str(path)) as r:
        report = verify_image(r)
    assert report.bad_count == 1 and report.first_bad_offset == 64 << 10


def test_restore_pieces_of_a_partition_slice_follow_the_image_chunks(tmp_path):
    # A partition starts mid-chunk: a piece cut from the slice's own byte 0 would span two image
    # chunks and make both decode for one write.
    from imgkit.views.caching_reader import CachingReader
    from imgkit.operations.restore import _pieces
    from imgkit.formats.sources import RawSource
    from imgkit.stream import DATA, SliceStream
    src = tmp_path / "d.raw"
    src.write_bytes(pattern_bytes(8 << 20))
    cs, start = 1 << 20, (1 << 20) + 3 * 512

    class Chunked(RawSource):  # a disk stored in 1 MiB units, as an imgk image is
        unit_size = cs
    with Chunked(str(src)) as disk:
        part = SliceStream(disk, start, 5 << 20)
        assert part.unit_size == cs and part.unit_phase == start % cs  # declared, not set from outside
        pieces = list(_pieces(CachingReader(part, 0), {DATA}))
    assert sum(n for _, n in pieces) == 5 << 20 and pieces[0] == (0, cs - 3 * 512)
    assert all((start + off) // cs == (start + off + n - 1) // cs for off, n in pieces)
    assert all(a + n == b for (a, n), (b, _) in zip(pieces, pieces[1:]))
