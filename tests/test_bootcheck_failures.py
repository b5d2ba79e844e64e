"""Failures are named: no bootable device, timeout, guest stopped; and bad input is refused before
QEMU starts. All on one-sector disks, so each boot takes well under a second."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.bootcheck_helpers import boot_check_json, capture, file_state
from tests.conftest import assert_one_line_error, run_imgkit

pytestmark = [pytest.mark.qemu]


def one_sector_disk(path, code: bytes, size=1 << 20) -> str:
    sector = bytearray(512)
    sector[:len(code)] = code
    sector[510:] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(sector)
    return str(path)


@pytest.fixture
def zeroed(tiny_bios_image, tmp_path):
    """tiny-bios with its boot sector zeroed."""
    path = tmp_path / "zeroed.img"
    shutil.copyfile(tiny_bios_image, path)
    with open(path, "r+b") as f:
        f.write(bytes(512))
    return str(path)


def test_zeroed_boot_sector_is_no_bootable_device(zeroed, tmp_path):
    junit = tmp_path / "r.xml"
    code, doc, err = boot_check_json(zeroed, "--timeout", "30", "--junit", junit, "--screenshot", tmp_path / "s.png")
    assert code == 1, (doc, err)
    assert doc["reason"] == "no bootable device"
    assert doc["seconds_to_result"] < 10  # named at once, not after the timeout
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert 'type="no bootable device"' in junit.read_text()


def test_zeroed_boot_sector_from_imgk_too(zeroed, tmp_path):
    image = capture(zeroed, tmp_path / "z.imgk")
    code, doc, _ = boot_check_json(image, "--timeout", "30")
    assert code == 1 and doc["reason"] == "no bootable device" and doc["streamed"]


def test_hanging_guest_is_a_timeout(tmp_path):
    disk = one_sector_disk(tmp_path / "hang.img", bytes.fromhex("FAF4EBFD"))  # cli; hlt; jmp hlt
    code, doc, err = boot_check_json(disk, "--timeout", "2")
    assert code == 1, (doc, err)
    assert doc["reason"] == "timeout"
    assert 1.9 <= doc["seconds_to_result"] < 10


def test_guest_that_powers_off_without_the_marker(tiny_bios_image):
    code, doc, _ = boot_check_json(tiny_bios_image, "--expect", "this never appears", "--timeout", "30")
    assert code == 1
    assert doc["reason"] == "guest stopped"  # it powered off: no need to wait for the timeout
    assert doc["seconds_to_result"] < 10
    assert "IMGKIT-BOOT-OK tiny-bios" in doc["console_tail"]


def test_custom_expect_matches(tiny_bios_image):
    code, doc, _ = boot_check_json(tiny_bios_image, "--expect", r"BOOT-OK \w+-bios")
    assert code == 0 and doc["matched"] == "IMGKIT-BOOT-OK tiny-bios"


def test_text_report(tiny_bios_image):
    proc = run_imgkit("boot-check", tiny_bios_image, env={"IMGKIT_ACCEL": "tcg"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASS ") and "firmware: bios" in proc.stdout and "IMGKIT-BOOT-OK" in proc.stdout


def test_missing_image_is_bad_input(tmp_path):
    assert_one_line_error(run_imgkit("boot-check", tmp_path / "nope.img"), 3, "no such file")


def test_bad_regex_is_a_usage_error(tiny_bios_image):
    proc = run_imgkit("boot-check", tiny_bios_image, "--expect", "(")
    assert proc.returncode == 2 and "regular expression" in proc.stderr


def test_qcow2_with_backing_file_is_refused_before_qemu(tmp_path):
    """A hostile qcow2 naming a host file as its backing file never reaches qemu-system."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    evil = tmp_path / "evil.qcow2"
    os.system(f"qemu-img create -q -f qcow2 -F raw -b {base} {evil} 1M")
    proc = run_imgkit("boot-check", evil, env={"IMGKIT_ACCEL": "tcg"})
    assert_one_line_error(proc, 3, "backing")


def test_raw_file_with_a_qcow2_header_is_booted_as_raw_when_asked(tmp_path):
    """--format raw takes the bytes as they are: qemu never interprets the qcow2 header inside."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    evil = tmp_path / "evil.img"
    os.system(f"qemu-img create -q -f qcow2 -F raw -b {base} {evil} 1M")
    before = file_state(evil)
    code, doc, err = boot_check_json(evil, "--format", "raw", "--timeout", "20")
    assert code == 1 and doc["format"] == "raw" and doc["reason"] == "no bootable device", (doc, err)
    assert file_state(evil) == before


def test_firmware_can_be_forced(tiny_bios_image):
    code, doc, _ = boot_check_json(tiny_bios_image, "--firmware", "bios")
    assert code == 0 and doc["firmware_why"] == "forced by --firmware"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a loop device")
def test_boots_a_block_device_read_only(tiny_bios_image, tmp_path):
    """A real block device (a read-only loop device) boots through qemu's host_device driver."""
    import subprocess
    copy = tmp_path / "disk.img"
    shutil.copyfile(tiny_bios_image, copy)
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", str(copy)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        code, doc, err = boot_check_json(dev, "--timeout", "30")
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert code == 0, (doc, err)
    assert doc["format"] == "raw" and doc["matched"] == "IMGKIT-BOOT-OK tiny-bios"


def test_text_screen_is_matched_too(tmp_path):
    """A BIOS guest that prints nothing on the serial port is judged by its VGA text screen."""
    disk = one_sector_disk(tmp_path / "silent.img", bytes.fromhex("FAF4EBFD"))
    code, doc, err = boot_check_json(disk, "--expect", r"Booting from Hard Disk", "--timeout", "20")
    assert code == 0, (doc, err)
    assert doc["matched_on"] == "screen" and doc["matched"].startswith("Booting from Hard Disk")
    assert doc["console_tail"] == []  # the serial port really stayed silent


def test_mbr_message_on_screen_is_named(tmp_path):
    """Boot code that says "Missing operating system" through int 10h (the screen only, as MBR code
    does) fails as no bootable device at once, not by timeout."""
    msg_at = 0x7C00 + 23
    code = (bytes.fromhex("FB31C08ED8FC") + b"\xBE" + msg_at.to_bytes(2, "little")  # sti; ds=0; si=msg
            + bytes.fromhex("AC84C07406B40ECD10EBF5F4EBFD")  # lodsb; teletype each byte; then hlt forever
            + b"Missing operating system\0")
    disk = one_sector_disk(tmp_path / "mbr-msg.img", code)
    code_, doc, err = boot_check_json(disk, "--timeout", "30")
    assert code_ == 1, (doc, err)
    assert doc["reason"] == "no bootable device" and doc["detail"] == "Missing operating system"
    assert doc["seconds_to_result"] < 10


@pytest.mark.parametrize("option", ["--junit", "--screenshot", "--console-log"])
def test_an_output_in_a_missing_directory_is_refused_before_the_boot(tiny_bios_image, tmp_path, option):
    """Before: --junit failed after the whole boot with a temp file's name, --screenshot and
    --console-log were lost (a note in the report, or an error mid-boot)."""
    out = tmp_path / "missing" / "out.file"
    proc = run_imgkit("boot-check", tiny_bios_image, option, out, timeout=120)
    assert_one_line_error(proc, 3, f"{option} {out}", "is not a directory")
    assert "IMGKIT-BOOT-OK" not in proc.stdout + proc.stderr  # refused before QEMU started
