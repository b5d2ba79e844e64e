"""The Linux fixtures, each booted as few times as possible (a Debian kernel takes ~10-20 s under TCG):
linux-bios from an encrypted, split imgk; linux-uefi from imgk converted to qcow2 (firmware picked
automatically); the ISO from imgk, as a CD-ROM; linux-panic named as a kernel panic."""
from __future__ import annotations

import glob

import pytest

from tests.bootcheck_helpers import PASSWORD, boot_check_json, capture, convert, file_state

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def test_linux_bios_from_encrypted_split_imgk(linux_bios_image, tmp_path):
    image = capture(linux_bios_image, tmp_path / "lb.imgk", "--split-size", "4M", encrypt=True)
    assert len(glob.glob(str(tmp_path / "lb.imgk*"))) >= 2  # really several volumes
    before = file_state(image)
    code, doc, err = boot_check_json(image, "--timeout", "240", env={"IMGKIT_PASSWORD": PASSWORD})
    assert code == 0, (doc, err)
    assert doc["passed"] and doc["streamed"] and doc["format"] == "imgk"
    assert doc["firmware"] == "bios" and doc["media"] == "disk"
    assert doc["matched"].startswith("IMGKIT-BOOT-OK linux-bios ")
    assert any("Linux version" in ln or "Run /init" in ln or "IMGKIT-BOOT-OK" in ln for ln in doc["console_tail"])
    assert file_state(image) == before


def test_linux_uefi_from_qcow2_picks_uefi(linux_uefi_image, tmp_path):
    imgk = capture(linux_uefi_image, tmp_path / "lu.imgk")
    qcow2 = convert(imgk, tmp_path / "lu.qcow2")
    code, doc, err = boot_check_json(qcow2, "--timeout", "240", "--screenshot", tmp_path / "uefi.png")
    assert code == 0, (doc, err)
    assert doc["firmware"] == "uefi" and "EFI system partition" in doc["firmware_why"]
    assert doc["format"] == "qcow2" and not doc["streamed"]
    assert doc["matched"].startswith("IMGKIT-BOOT-OK linux-uefi ")
    with open(tmp_path / "uefi.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_iso_from_imgk_boots_as_cdrom(iso_image, tmp_path):
    imgk = capture(iso_image, tmp_path / "iso.imgk")
    code, doc, err = boot_check_json(imgk, "--timeout", "240")
    assert code == 0, (doc, err)
    assert doc["media"] == "cdrom" and doc["firmware"] == "bios" and doc["streamed"]
    assert doc["matched"].startswith("IMGKIT-BOOT-OK iso ")


def test_kernel_panic_is_named(vm_fixture, tmp_path):
    image = vm_fixture("linux-panic")
    junit = tmp_path / "panic.xml"
    code, doc, err = boot_check_json(image, "--timeout", "240", "--junit", junit)
    assert code == 1, (doc, err)
    assert doc["passed"] is False and doc["reason"] == "kernel panic"
    assert doc["detail"].startswith("Kernel panic - not syncing: VFS: Unable to mount root fs")
    assert any("Kernel panic" in ln for ln in doc["console_tail"])
    text = junit.read_text()
    assert 'failures="1"' in text and 'type="kernel panic"' in text


def test_uefi_disk_without_a_boot_loader_is_no_bootable_device(linux_uefi_image, tmp_path):
    """OVMF finds no \\EFI\\BOOT\\BOOTX64.EFI, falls to its shell: named, not left to time out."""
    import os
    import shutil
    import subprocess
    disk = tmp_path / "no-loader.img"
    shutil.copyfile(linux_uefi_image, disk)
    subprocess.run(["mdel", "-i", f"{disk}@@1M", "::/EFI/BOOT/BOOTX64.EFI"], check=True,
                   env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    code, doc, err = boot_check_json(disk, "--timeout", "120")
    assert code == 1, (doc, err)
    assert doc["firmware"] == "uefi" and doc["reason"] == "no bootable device"
    assert doc["seconds_to_result"] < 100
