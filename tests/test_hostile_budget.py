"""Decoded sections have a budget known before decompression (issue 13, case 2; FORMAT.md,
*Section budgets*): a 13 KB image whose directory points many USED_MAP entries at one zstd frame
that decodes to 256 MiB made `verify` peak at 1.8 GiB for 6 entries and end in a MemoryError
traceback for 1024. Now refused, in one line, within 100 MiB of an ordinary `info`."""
from __future__ import annotations

import pytest
import zstandard

import imgkit
from conftest import pattern_bytes
from imgk_forge import reseal, run_measured
from imgkit.errors import BadImage
from imgkit.formats import imgk_layout as L

MiB = 1 << 20
RSS_MARGIN = 100 * MiB


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    src = d / "src.raw"
    src.write_bytes(pattern_bytes(4 * MiB, seed=5))
    img = d / "plain.imgk"
    imgkit.capture(str(src), str(img), chunk_size=64 << 10)
    return img


@pytest.fixture(scope="module")
def bomb_frame():
    """One zstd frame of a USED_MAP that decodes to 256 MiB (a few KB stored)."""
    length = L.MAX_SECTION_LENGTH
    head = L.UsedMap(1, 512, 0, (length - L.USED_MAP_HEAD_SIZE) * 8, b"").encode()
    cctx = zstandard.ZstdCompressor(level=3)
    frame = cctx.compress(head + bytes(length - len(head)))
    assert len(frame) < 64 << 10
    return frame, length


def _flood(img, out, frame, length, n):
    def mutate(sections, end):
        entry = L.SectionEntry(L.SECTION_USED_MAP, 0, end, len(frame), length, L.digest(frame))
        return sections + [entry] * n, frame
    return reseal(img, out, mutate)


@pytest.mark.parametrize("n", [1, 6, 1024])
def test_used_map_bomb_refused_in_bounded_memory(plain, bomb_frame, tmp_path, n):
    frame, length = bomb_frame
    bomb = _flood(plain, tmp_path / f"bomb{n}.imgk", frame, length, n)
    assert bomb.stat().st_size < plain.stat().st_size + (100 << 10)  # a few KB of forgery
    base_code, _, _, base_rss, _ = run_measured("info", plain)
    assert base_code == 0
    for command, want in ((["verify"], 1), (["info"], 3), (["info", "--json"], 3)):  # verify: "DAMAGED", 1
        code, out, err, rss, seconds = run_measured(*command, bomb)
        assert code == want, (command, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "used-block map" in err and "more than" in err, err
        assert rss <= base_rss + RSS_MARGIN, (command, rss >> 20, base_rss >> 20)
        assert seconds < 30


def test_budgets_follow_the_declared_geometry():
    h = L.Header(image_id=bytes(16), logical_size=1 << 30, chunk_size=1 << 20)
    b = L.section_budgets(h)
    assert b[L.SECTION_INDEX].exact_length == 1024 * L.INDEX_ENTRY_SIZE
    # one bit per 512-byte sector of a 1 GiB disk: 256 KiB, plus each map's 24-byte head
    assert b[L.SECTION_USED_MAP].max_total == L.MAX_USED_MAPS * 25 + (256 << 10)

    def entry(t, length):
        return L.SectionEntry(t, 1, L.HEADER_SIZE, 10, length, bytes(32))
    ok = [entry(L.SECTION_INDEX, 1024 * 56), entry(L.SECTION_METADATA, 100), entry(L.SECTION_VOLUMES, 8),
          entry(L.SECTION_USED_MAP, 24 + (128 << 10)), entry(L.SECTION_USED_MAP, 24 + (128 << 10))]
    L.check_section_budgets(ok, h)
    with pytest.raises(BadImage, match="more than"):
        L.check_section_budgets(ok + [entry(L.SECTION_USED_MAP, 200 << 10)], h)
    with pytest.raises(BadImage, match="index"):
        L.check_section_budgets(ok + [entry(L.SECTION_INDEX, 1024 * 56)], h)
    with pytest.raises(BadImage, match="expected 57344"):
        L.check_section_budgets([entry(L.SECTION_INDEX, 56)] + ok[1:], h)
    # an unknown optional type is not decoded, so it has no budget to exceed
    L.check_section_budgets(ok + [entry(99, 200 << 20)], h)


def test_used_map_beyond_the_disk_refused(plain, tmp_path):
    disk = 4 * MiB
    beyond = L.UsedMap(1, 4096, disk - 4096, 2, b"\x03").encode()
    with pytest.raises(BadImage, match="beyond the disk"):
        L.UsedMap.decode(beyond, disk)
    assert L.UsedMap.decode(L.UsedMap(1, 4096, disk - 8192, 2, b"\x03").encode(), disk).block_count == 2
    frame = zstandard.ZstdCompressor().compress(beyond)

    def mutate(sections, end):
        return sections + [L.SectionEntry(L.SECTION_USED_MAP, 0, end, len(frame), len(beyond), L.digest(frame))], frame
    path = reseal(plain, tmp_path / "beyond.imgk", mutate)
    code, _, err, _, _ = run_measured("info", path)
    assert code == 3 and "beyond the disk" in err and "Traceback" not in err
