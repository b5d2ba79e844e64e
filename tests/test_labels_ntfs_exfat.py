"""NTFS and exFAT volume labels (issue #12): read from $Volume and the exFAT root directory, shown by
info, usable in --partitions and as mount aliases. Real mkntfs / mkfs.exfat; nothing is mounted by
the host kernel."""
import json
import os
import subprocess

import pytest

from conftest import needs_root, run_imgkit

MiB = 1 << 20


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    disk = d / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(40 * MiB)
    subprocess.run(["sgdisk", "-n", "1:2048:+16M", "-t", "1:0700", "-n", "2:0:+16M", "-t", "2:0700", str(disk)],
                   check=True, capture_output=True)
    for number, cmd, start in ((1, ["mkntfs", "-q", "-F", "-Q", "-L", "WinData"], 1 * MiB),
                               (2, ["mkfs.exfat", "-L", "Stick"], 17 * MiB)):
        part = d / f"p{number}.raw"
        with open(part, "wb") as f:
            f.truncate(16 * MiB)
        subprocess.run([*cmd, str(part)], check=True, capture_output=True)
        with open(disk, "r+b") as f:
            f.seek(start)
            f.write(part.read_bytes())
    img = d / "disk.imgk"
    run_imgkit("capture", disk, img, "--progress", "none", check=True)
    return d, disk, img


def test_info_shows_ntfs_and_exfat_labels(labelled):
    _, _, img = labelled
    doc = json.loads(run_imgkit("info", img, "--json", check=True).stdout)
    parts = {p["number"]: p for p in doc["partition_table"]["partitions"]}
    assert (parts[1]["filesystem"], parts[1]["label"]) == ("ntfs", "WinData")
    assert (parts[2]["filesystem"], parts[2]["label"]) == ("exfat", "Stick")
    text = run_imgkit("info", img, check=True).stdout
    assert "WinData" in text and "Stick" in text


def test_labels_select_partitions(labelled):
    d, disk, _ = labelled
    out = d / "sel.imgk"
    doc = json.loads(run_imgkit("capture", disk, out, "--partitions", "Stick", "--json", "--progress", "none",
                                check=True).stdout)
    info = json.loads(run_imgkit("info", out, "--json", check=True).stdout)
    modes = {p["number"]: p.get("capture_mode") for p in info["partition_table"]["partitions"]}
    assert modes[1] == "not selected" and modes[2] != "not selected", (doc, modes)


@needs_root
def test_labels_are_mount_aliases(labelled, tmp_path):
    _, _, img = labelled
    mnt = tmp_path / "m"
    mnt.mkdir()
    run_imgkit("mount", img, mnt, check=True)
    try:
        parts = os.listdir(mnt / "partitions")
        assert "WinData.raw" in parts and "Stick.raw" in parts, parts
        assert os.readlink(mnt / "partitions" / "WinData.raw") == "p1.raw"
    finally:
        run_imgkit("umount", mnt, check=True)
