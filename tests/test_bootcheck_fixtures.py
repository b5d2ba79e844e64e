"""vm-fixtures: cached builds keyed by their inputs, the multifs manifest tells the truth, the pytest
plugin is registered, and the firmware each fixture needs is what `--firmware auto` picks."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from imgkit import api
from imgkit.operations.bootcheck import plan_boot
from imgkit.testing import fixtures


def test_build_is_cached_by_input_hash(tiny_bios_image):
    st = os.stat(tiny_bios_image)
    again = fixtures.build_fixture("tiny-bios")
    assert again == tiny_bios_image and os.stat(again).st_mtime_ns == st.st_mtime_ns  # not rebuilt
    assert fixtures.input_hash("tiny-bios")[:16] in tiny_bios_image


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGKIT_FIXTURE_CACHE", str(tmp_path / "cache"))
    path = fixtures.build_fixture("tiny-bios")
    assert path.startswith(str(tmp_path / "cache"))
    with open(path, "rb") as f:
        mbr = f.read(512)
    assert mbr[510:] == b"\x55\xaa" and b"IMGKIT-BOOT-OK tiny-bios" in mbr


def test_a_new_kernel_changes_the_key(tmp_path, monkeypatch):
    from_recipe = fixtures.input_hash("linux-bios")
    kernel = tmp_path / "vmlinuz-test"
    shutil.copyfile(fixtures._load_recipe("linux-bios")[0].debian_kernel(), kernel)
    assert fixtures.input_hash("linux-bios") == from_recipe
    with open(kernel, "ab") as f:
        f.write(b"\0")
    monkeypatch.setenv("IMGKIT_FIXTURE_KERNEL", str(kernel))
    assert fixtures.input_hash("linux-bios") != from_recipe
    assert fixtures.input_hash("tiny-bios") == fixtures.input_hash("tiny-bios")  # no kernel in it


def test_unknown_fixture():
    with pytest.raises(fixtures.FixtureError, match="no fixture"):
        fixtures.build_fixture("nope")


def test_pytest_plugin_is_registered():
    from importlib.metadata import entry_points
    names = {ep.value for ep in entry_points(group="pytest11")}
    assert "imgkit.testing.pytest_plugin" in names


def _partition_bytes(disk: str, start: int, size: int, dest) -> str:
    with open(disk, "rb") as fi, open(dest, "wb") as fo:
        fi.seek(start)
        fo.write(fi.read(size))
    return str(dest)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_multifs_manifest_matches_the_disk(multifs_image, multifs_manifest, tmp_path):
    """Every file the manifest lists is read back with each filesystem's own tool and hashed."""
    table = api.image_info(api.open_image(multifs_image))["partition_table"]
    assert table["type"] == "gpt"
    assert [p["filesystem"] for p in table["partitions"]] == ["ext4", "vfat", "ntfs"]
    checked = 0
    for part in multifs_manifest["partitions"]:
        files = [e for e in part["files"] if e["type"] == "file"]
        assert files
        if part["filesystem"] == "vfat":
            for e in files:
                data = subprocess.run(["mtype", "-i", f"{multifs_image}@@{part['start']}", "::" + e["path"]],
                                      capture_output=True, check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
                assert _sha(data) == e["sha256"], e["path"]
                checked += 1
            continue
        fs = _partition_bytes(multifs_image, part["start"], part["size"], tmp_path / f"p{part['number']}")
        for e in files:
            if part["filesystem"] == "ext4":
                cmd = ["debugfs", "-R", f"cat \"{e['path']}\"", fs]
            else:
                cmd = ["ntfscat", fs, e["path"]]
            data = subprocess.run(cmd, capture_output=True, check=True).stdout
            assert _sha(data) == e["sha256"], e["path"]
            checked += 1
        if part["filesystem"] == "ext4":
            links = {e["path"]: e["target"] for e in part["files"] if e["type"] == "symlink"}
            assert links["/link-escape"].startswith("../../")
            out = subprocess.run(["debugfs", "-R", "stat /link-to-hello", fs], capture_output=True, text=True).stdout
            assert 'Fast link dest: "hello.txt"' in out
            out = subprocess.run(["debugfs", "-R", "stat /bin/setuid-tool", fs], capture_output=True, text=True).stdout
            assert "Mode:  04755" in out
            modes = {e["path"]: e.get("mode") for e in part["files"]}
            assert modes["/bin/setuid-tool"] == "4755" and modes["/private.key"] == "0600"
    assert checked >= 15


@pytest.mark.parametrize("name, firmware, media", [
    ("tiny-bios", "bios", "disk"), ("linux-bios", "bios", "disk"), ("linux-uefi", "uefi", "disk"),
    ("iso", "bios", "cdrom"), ("multifs", "bios", "disk")])
def test_auto_firmware_fits_each_fixture(vm_fixture, vm_fixture_info, name, firmware, media):
    with api.open_image(vm_fixture(name)) as s:
        plan = plan_boot(s, "iso" if name == "iso" else "raw")
    assert (plan.firmware, plan.media) == (firmware, media)
    info = vm_fixture_info(name)
    if info.boots:
        assert (info.firmware, info.media) == (firmware, media)  # the manifest agrees


def test_gpt_with_esp_and_bios_boot_code_boots_bios(linux_uefi_image, tmp_path):
    disk = tmp_path / "hybrid.img"
    shutil.copyfile(linux_uefi_image, disk)
    with open("/usr/lib/grub/i386-pc/boot.img", "rb") as f:
        code = f.read(440)
    with open(disk, "r+b") as f:
        f.write(code)
    with api.open_image(str(disk)) as s:
        plan = plan_boot(s, "raw")
    assert plan.firmware == "bios" and "BIOS boot code" in plan.firmware_why


@pytest.mark.qemu
def test_plugin_boot_check_fixture(imgkit_boot_check, tiny_bios_image, tmp_path):
    """What another project's CI writes: the plugin's boot checker on a plugin-built image."""
    result = imgkit_boot_check(tiny_bios_image, accel="tcg", timeout=30, console_log=str(tmp_path / "com1.log"))
    assert result.passed, result.summary()
    assert result.summary().startswith("PASS ")
    assert b"IMGKIT-BOOT-OK tiny-bios" in (tmp_path / "com1.log").read_bytes()
