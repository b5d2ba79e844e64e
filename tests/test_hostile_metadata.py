"""Metadata of the wrong types, ranges or lengths is a bad image (issue 13, case 3): exit 3 and one
line from every command that reads it (info, info --json, verify, mount, restore, restore
--partition), never a traceback. Before, `{"partition_table": "x"}`, partitions given as [1, 2],
`source: 5`, `compression: "zstd"`, nulls and huge numbers crashed info, mount and restore
--partition. The images are real captures whose METADATA section a forger replaced (every checksum
right)."""
from __future__ import annotations

import json
import struct

import pytest

import imgkit
from conftest import pattern_bytes
from imgk_forge import replace_section, run_measured
from imgkit.errors import BadImage
from imgkit.formats import imgk_layout as L

MiB = 1 << 20


@pytest.fixture(scope="module")
def mbr_image(tmp_path_factory):
    """An 8 MiB disk with one MBR partition (1 MiB..5 MiB), captured sector by sector."""
    d = tmp_path_factory.mktemp("meta")
    disk = bytearray(pattern_bytes(8 * MiB, seed=9))
    disk[446:512] = bytes(66)
    disk[446:462] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 8192)
    disk[510:512] = b"\x55\xaa"
    src = d / "disk.raw"
    src.write_bytes(bytes(disk))
    img = d / "disk.imgk"
    imgkit.capture(str(src), str(img), chunk_size=64 << 10, sector_by_sector=True)
    return img


HOSTILE = {
    "table-is-text": {"partition_table": "x"},
    "partition-lacks-size": {"partition_table": {"type": "mbr", "partitions": [{"number": 1, "start": 0,
                                                                                 "type": "0x83", "type_name": "x"}]}},
    "type-name-null": {"partition_table": {"type": "mbr", "partitions": [{"number": 1, "start": 0, "size": 1,
                                                                           "type": "0x83", "type_name": None}]}},
    "partitions-are-numbers": {"partition_table": {"type": "mbr", "partitions": [1, 2]}},
    "partitions-null": {"partition_table": {"type": "mbr", "partitions": None}},
    "source-is-number": {"source": 5},
    "compression-is-text": {"compression": "zstd"},
    "capture-partitions-text": {"capture": {"mode": "partitions", "partitions": ["1"]}},
    "negative-size": {"partition_table": {"type": "mbr", "partitions": [{"number": 1, "start": 0, "size": -1}]}},
    "huge-number": {"partition_table": {"type": "mbr", "partitions": [{"number": 1, "start": 10 ** 30,
                                                                        "size": 1}]}},
    "float-size": {"source": {"size": 1.5}},
    "bool-as-number": {"partition_table": {"type": "mbr", "partitions": [{"number": True}]}},
    "long-label": {"partition_table": {"type": "mbr", "label": "x" * 100000, "partitions": []}},
    "table-lacks-partitions": {"partition_table": {"type": "mbr"}},
    "table-type-unknown": {"partition_table": {"type": "apm", "partitions": []}},
    "many-warnings": {"capture": {"mode": "full", "warnings": ["w"] * 100000}},
    "os-is-list": {"os": ["linux"]},
    "top-level-list": [1, 2],
}


def _forge(img, tmp_path, name, meta):
    raw = json.dumps(meta).encode()
    return replace_section(img, tmp_path / f"{name}.imgk", L.SECTION_METADATA, raw)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_metadata_is_a_bad_image_for_every_command(mbr_image, tmp_path, name):
    path = _forge(mbr_image, tmp_path, name, HOSTILE[name])
    (tmp_path / "mnt").mkdir()
    commands = [("info",), ("info", "--json"), ("verify",), ("restore", "-y", "--partition", "1"),
                ("restore", "-y"), ("mount",)]
    for cmd in commands:
        extra = [tmp_path / "out.raw"] if cmd[0] == "restore" else [tmp_path / "mnt"] if cmd[0] == "mount" else []
        code, out, err, _, _ = run_measured(*cmd, path, *extra)
        assert code == (1 if cmd == ("verify",) else 3), (cmd, code, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (cmd, err)
        assert "metadata" in err, (cmd, err)
        assert not (tmp_path / "out.raw").exists()


NULLS = {"partition_table": None, "source": None, "compression": None, "capture": None, "os": None,
         "optical": None}


@pytest.mark.parametrize("meta", [NULLS, {}, {"partition_table": {"type": "mbr", "partitions": [
    {"number": 1, "start": MiB, "size": 4 * MiB, "type": None, "type_name": "Linux", "filesystem": None,
     "label": None, "bootable": None, "uuid": None}]}}], ids=["nulls", "empty", "null-fields"])
def test_allowed_nulls_and_missing_keys_work(mbr_image, tmp_path, meta):
    """What the schema lets through, every command handles (the data itself is intact)."""
    path = _forge(mbr_image, tmp_path, "ok", meta)
    for cmd in (("info",), ("info", "--json"), ("verify",)):
        code, out, err, _, _ = run_measured(*cmd, path)
        assert code == 0 and "Traceback" not in err, (cmd, err)
    code, out, err, _, _ = run_measured("restore", "-y", "--partition", "1", path, tmp_path / "p1.raw")
    assert code == 0, err
    assert (tmp_path / "p1.raw").read_bytes() == _disk_bytes(mbr_image)[MiB:5 * MiB]


def _disk_bytes(img):
    with imgkit.open_image(str(img)) as r:
        return r.read(0, r.size)


def test_schema_accepts_what_capture_writes(mbr_image):
    with imgkit.open_image(str(mbr_image)) as r:
        assert L.check_metadata(r.metadata)["partition_table"]["type"] == "mbr"
    with pytest.raises(BadImage, match="partition_table.partitions\\[0\\].size"):
        L.check_metadata({"partition_table": {"type": "gpt", "partitions": [
            {"number": 1, "start": 0, "size": "big", "type": "x", "type_name": "y"}]}})
