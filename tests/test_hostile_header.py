"""Reserved header bytes are checked (issue 13, case 7): the header checksum is unkeyed, so a
changed reserved byte with a recomputed checksum verified OK on an encrypted image. Now every
reserved byte of a plain and an encrypted image, changed and re-checksummed, is refused."""
from __future__ import annotations

import pytest

import imgkit
from conftest import pattern_bytes
from imgkit.errors import BadImage
from imgkit.formats import imgk_layout as L
from imgkit.formats.imgk_reader import ImageReader

PASSWORD = b"correct horse"


@pytest.fixture(scope="module", params=["plain", "encrypted"])
def image(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("hdr")
    src = d / "src.raw"
    src.write_bytes(pattern_bytes(256 << 10, seed=3))
    img = d / f"{request.param}.imgk"
    imgkit.capture(str(src), str(img), chunk_size=64 << 10,
                   password=PASSWORD if request.param == "encrypted" else None)
    return img, request.param == "encrypted"


def _reserved_offsets(encrypted):
    offs = [o for lo, hi in L._RESERVED_RANGES for o in range(lo, hi)]
    offs += [L.KEY_SLOT_OFFSET + 1, L.KEY_SLOT_OFFSET + 3]
    if not encrypted:
        offs += list(range(L.KEY_SLOT_OFFSET, L.KEY_SLOT_OFFSET + L.KEY_SLOT_USED))
    return offs


def test_every_reserved_byte_changed_with_a_fixed_checksum_is_refused(image, tmp_path):
    img, encrypted = image
    raw = bytearray(img.read_bytes())
    with ImageReader(str(img), (lambda: PASSWORD) if encrypted else None):
        pass  # the untouched image opens
    offsets = _reserved_offsets(encrypted)
    assert len(offsets) > 3500
    target = tmp_path / "t.imgk"
    refused = 0
    for off in offsets[::7] + offsets[-3:]:  # a spread over every range (all of them: ~4 s)
        buf = bytearray(raw)
        buf[off] ^= 0xFF
        buf[L.HEADER_CHECKSUM_OFFSET:L.HEADER_SIZE] = L.digest(bytes(buf[:L.HEADER_CHECKSUM_OFFSET]))
        target.write_bytes(bytes(buf))
        with pytest.raises(BadImage, match="reserved header byte"):
            ImageReader(str(target), lambda: PASSWORD)
        refused += 1
    assert refused > 500
