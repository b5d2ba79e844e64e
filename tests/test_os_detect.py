"""`info` names the operating system from /etc/os-release, read by imgkit's own ext reader."""
import json
import os
import subprocess

from conftest import run_imgkit


def make_fs(tmp_path, files, links):
    root = tmp_path / "root"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    for path, target in links.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / path)
    fs = tmp_path / "fs.ext4"
    with open(fs, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(root), str(fs)], check=True)
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(40 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\nstart=2048, size=65536\n", text=True, check=True)
    subprocess.run(["dd", f"if={fs}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc", "status=none"], check=True)
    return disk


def test_os_release_through_a_relative_symlink_survives_capture(tmp_path):
    disk = make_fs(tmp_path, {"usr/lib/os-release": 'PRETTY_NAME="Testix 7 (blue)"\nID=testix\nVERSION_ID="7"\n'},
                   {"etc/os-release": "../usr/lib/os-release"})
    img = tmp_path / "d.imgk"
    run_imgkit("capture", disk, img, check=True)
    doc = json.loads(run_imgkit("info", img, "--json", check=True).stdout)
    assert doc["os"] == {"name": "Testix 7 (blue)", "id": "testix", "version_id": "7", "partition": 1}
    assert "os:           Testix 7 (blue) (partition 1)" in run_imgkit("info", img, check=True).stdout


def test_symlink_loops_and_absent_files_are_bounded(tmp_path):
    disk = make_fs(tmp_path, {"hello": "x"}, {"etc/os-release": "/etc/loop", "etc/loop": "/etc/os-release"})
    doc = json.loads(run_imgkit("info", disk, "--json", check=True).stdout)
    assert doc["os"] is None
