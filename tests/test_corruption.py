"""Damage detection: every single-bit flip in a small image's header, sections, directory and
trailer, and a sample across the chunk data, is detected; truncation at every boundary is refused.
Flips are done by XOR (a fixed value would be a no-op 1 time in 256) and checked in-process through
the same code paths as verify and restore; a few go through the CLI to check exit codes and messages."""
import os
import random

import pytest

from conftest import assert_one_line_error, pattern_bytes, run_imgkit
from imgk_forge import reseal

import imgkit
from imgkit.errors import BadImage, ImgkitError
from imgkit.formats import imgk_layout as L
from imgkit.formats.imgk_reader import ImageReader
from imgkit.operations.verify import verify_image


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrupt")
    src = d / "src.raw"
    data = bytearray(pattern_bytes(5 * (64 << 10) + 1000, seed=21))
    data[64 << 10:128 << 10] = bytes(64 << 10)  # one zero chunk
    src.write_bytes(bytes(data))
    img = d / "small.imgk"
    imgkit.capture(str(src), str(img), chunk_size=64 << 10)
    return img, bytes(data)


def detected(path, original: bytes) -> bool:
    """True if opening + verifying + reading everything raises or reports damage; False if the image
    silently yields the original bytes (an undetected flip). Any other outcome is a test failure."""
    try:
        with ImageReader(str(path)) as img:
            report = verify_image(img, workers=1)
            if not report.ok:
                return True
            content = img.read(0, img.size)
    except ImgkitError:
        return True
    assert content == original, "a flip changed the data without being detected"
    return False


def structure_ranges(img_path):
    """(name, start, end) of every byte range that is not chunk data."""
    size = os.path.getsize(img_path)
    with ImageReader(str(img_path)) as img:
        sections = [(f"section {e.type}", e.offset, e.offset + e.stored_length) for e in img.sections]
        first_section = min(s for _, s, _ in sections)
    return [("header", 0, L.HEADER_SIZE), *sections, ("directory+trailer", max(e for _, _, e in sections), size)], first_section


def test_every_bit_flip_in_structures_detected(small_image, tmp_path):
    img, original = small_image
    raw = img.read_bytes()
    ranges, _ = structure_ranges(img)
    target = tmp_path / "flip.imgk"
    tried = caught = 0
    silent = []
    for name, start, end in ranges:
        # Every bit of the header's used part, every section, the directory and trailer. The header's
        # reserved zero bytes are covered by its checksum; sample them to keep the run short.
        positions = range(start, end)
        if name == "header":
            positions = list(range(0, 80)) + list(range(L.HEADER_CHECKSUM_OFFSET, L.HEADER_SIZE)) + \
                random.Random(1).sample(range(80, L.HEADER_CHECKSUM_OFFSET), 200)
        for pos in positions:
            for bit in range(8):
                buf = bytearray(raw)
                buf[pos] ^= 1 << bit
                target.write_bytes(buf)
                tried += 1
                if detected(target, original):
                    caught += 1
                else:
                    silent.append((name, pos, bit))
    print(f"\nstructure bit flips: {tried} tried, {caught} detected, {len(silent)} silent")
    assert not silent, silent[:10]
    assert tried > 5000


def test_bit_flips_across_chunk_data_detected(small_image, tmp_path):
    img, original = small_image
    raw = img.read_bytes()
    _, data_end = structure_ranges(img)
    rng = random.Random(7)
    target = tmp_path / "flip.imgk"
    positions = rng.sample(range(L.HEADER_SIZE, data_end), 400)
    silent = []
    for pos in positions:
        buf = bytearray(raw)
        buf[pos] ^= 1 << rng.randrange(8)
        target.write_bytes(buf)
        if not detected(target, original):
            silent.append(pos)
    print(f"\nchunk-data bit flips: {len(positions)} tried, {len(positions) - len(silent)} detected, "
          f"{len(silent)} silent")
    assert not silent


def test_cli_reports_first_bad_chunk(small_image, tmp_path):
    img, _ = small_image
    with ImageReader(str(img)) as r:
        entry = r.index[2]
    buf = bytearray(img.read_bytes())
    buf[entry.offset + 10] ^= 0xFF
    bad = tmp_path / "bad.imgk"
    bad.write_bytes(buf)
    p = run_imgkit("verify", bad)
    assert p.returncode == 1 and f"offset {2 * (64 << 10)}" in p.stderr and "Traceback" not in p.stderr
    import json
    doc = json.loads(run_imgkit("verify", bad, "--json").stdout)
    assert doc["ok"] is False and doc["first_bad_offset"] == 2 * (64 << 10) and doc["bad_chunks"] == 1
    out = tmp_path / "out.raw"
    assert_one_line_error(run_imgkit("restore", bad, out, "--yes"), 3, f"offset {2 * (64 << 10)}")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_truncation_at_every_chunk_boundary_refused(small_image, tmp_path):
    img, _ = small_image
    raw = img.read_bytes()
    with ImageReader(str(img)) as r:
        cuts = sorted({e.offset for e in r.index if e.kind == L.KIND_DATA} |
                      {e.offset + e.stored_length for e in r.index if e.kind == L.KIND_DATA} |
                      {s.offset for s in r.sections} | {len(raw) - 1, len(raw) - L.TRAILER_SIZE, 0, 7, 100})
    target = tmp_path / "trunc.imgk"
    for cut in cuts:
        target.write_bytes(raw[:cut])
        with pytest.raises(BadImage):
            ImageReader(str(target))
    print(f"\ntruncations: {len(cuts)} tried, {len(cuts)} refused")
    target.write_bytes(raw[:len(raw) // 2])
    assert_one_line_error(run_imgkit("info", target), 3, "truncated")
    p = run_imgkit("verify", target)
    assert p.returncode == 1 and "Traceback" not in p.stderr


def test_newer_required_feature_refused(small_image, tmp_path):
    img, _ = small_image
    buf = bytearray(img.read_bytes())
    header = L.Header.decode(bytes(buf[:L.HEADER_SIZE]))
    header.required_features |= 1 << 40
    buf[:L.HEADER_SIZE] = header.encode()
    newer = tmp_path / "newer.imgk"
    newer.write_bytes(buf)
    assert_one_line_error(run_imgkit("info", newer), 3, "newer imgkit")


def _rewrite_with(img_path, tmp_path, name, mutate):
    """Re-seal a small plain image's sections after mutate(sections) changed them (a forger's
    image: every checksum is right, only the content is hostile)."""
    return reseal(img_path, tmp_path / name, mutate)


def test_forged_frame_size_and_section_floods_refused_without_allocation(small_image, tmp_path):
    import zstandard
    img, _ = small_image

    def flood(sections, end):  # 4000 used-map entries all pointing at one frame
        frame = zstandard.ZstdCompressor().compress(bytes(100))
        entry = L.SectionEntry(L.SECTION_USED_MAP, 0, end, len(frame), 100, L.digest(frame))
        return sections + [entry] * 4000, frame
    with pytest.raises(BadImage, match="used-block map"):
        ImageReader(str(_rewrite_with(img, tmp_path, "flood.imgk", flood)))

    def big_meta(sections, end):  # metadata claiming 200 MiB
        frame = zstandard.ZstdCompressor().compress(b"{}")
        out = [s for s in sections if s.type != L.SECTION_METADATA]
        out.append(L.SectionEntry(L.SECTION_METADATA, 1, end, len(frame), 200 << 20, L.digest(frame)))
        return out, frame
    with pytest.raises(BadImage, match="metadata sections? declare"):
        ImageReader(str(_rewrite_with(img, tmp_path, "meta.imgk", big_meta)))


def test_chunk_frame_declaring_a_huge_size_is_corrupt_not_allocated(tmp_path):
    """python-zstandard trusts a frame's declared size: the reader must check it against the chunk."""
    from imgkit.formats.imgk_reader import bounded_decompress
    import zstandard
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 1000))
    with pytest.raises(zstandard.ZstdError):
        bounded_decompress(zstandard.ZstdDecompressor(), bytes(frame), 10)
    assert bounded_decompress(zstandard.ZstdDecompressor(), bytes(frame), 1000) == b"x" * 1000


def test_deeply_nested_metadata_is_a_clean_error(small_image, tmp_path):
    import zstandard
    img, _ = small_image

    def nested(sections, end):
        raw = b"[" * 100000
        frame = zstandard.ZstdCompressor().compress(raw)
        out = [s for s in sections if s.type != L.SECTION_METADATA]
        out.append(L.SectionEntry(L.SECTION_METADATA, 1, end, len(frame), len(raw), L.digest(frame)))
        return out, frame
    path = _rewrite_with(img, tmp_path, "nested.imgk", nested)
    p = run_imgkit("info", path)
    assert p.returncode == 3 and "Traceback" not in p.stderr
