"""--split-size: sizes and the fat32 / dvd presets."""
from __future__ import annotations

import pytest

from imgkit.errors import InputError
from imgkit.formats import imgk_layout as L
from imgkit.units import SPLIT_PRESETS, parse_split_size

from conftest import run_imgkit
from crypto_volumes_support import make_source


@pytest.mark.parametrize("text,value", [
    ("fat32", (4 << 30) - 1), ("FAT32", (4 << 30) - 1), ("dvd", 4_700_372_992 - (8 << 20)),
    ("650M", 650 << 20), ("4G", 4 << 30), ("1.5G", 3 << 29), ("4000M", 4000 << 20), ("700000000", 700_000_000),
])
def test_split_sizes(text, value):
    assert parse_split_size(text) == value


def test_presets_fit_their_media():
    assert SPLIT_PRESETS["fat32"] < 1 << 32  # FAT32 stores a file's size in 32 bits
    assert parse_split_size("4G") > SPLIT_PRESETS["fat32"]  # why the preset exists
    assert SPLIT_PRESETS["dvd"] < 4_700_372_992 < 4_707_319_808  # DVD+R and DVD-R capacities


@pytest.mark.parametrize("text", ["abc", "0", "-1", "4X", "", "fat"])
def test_bad_split_sizes(text):
    with pytest.raises(InputError):
        parse_split_size(text)


def test_cli_split_size_preset_and_error(tmp_path):
    src = tmp_path / "d.raw"
    make_source(str(src), chunks=6)
    bad = run_imgkit("capture", src, tmp_path / "x.imgk", "--split-size", "floppy")
    assert bad.returncode == 2 and "fat32" in bad.stderr and "dvd" in bad.stderr
    assert not (tmp_path / "x.imgk").exists()
    run_imgkit("capture", src, tmp_path / "f.imgk", "--split-size", "fat32", "--chunk-size", "64K", check=True)
    assert not (tmp_path / "f.imgk.002").exists()
    h = L.Header.decode((tmp_path / "f.imgk").read_bytes()[:L.HEADER_SIZE])
    assert h.volume_count == 1 and not h.required_features & L.FEATURE_MULTI_VOLUME
    help_text = run_imgkit("split", "--help").stdout
    assert "fat32" in help_text and "dvd" in help_text and "Example" in help_text
