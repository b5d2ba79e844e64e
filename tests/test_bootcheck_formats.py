"""The format matrix on the tiny fixture (boots in well under a second): every format imgkit reads
boots and passes, imgk images stream over NBD, and the image file is never written."""
from __future__ import annotations

import pytest

from tests.bootcheck_helpers import PASSWORD, boot_check_json, capture, convert, file_state

pytestmark = [pytest.mark.qemu]


@pytest.fixture(scope="module")
def tiny_images(tiny_bios_image, tmp_path_factory):
    """tiny-bios as raw, imgk (plain, encrypted) and converted to qcow2/vhd/vhdx/vmdk."""
    d = tmp_path_factory.mktemp("tiny")
    imgk = capture(tiny_bios_image, d / "tiny.imgk")
    enc = capture(tiny_bios_image, d / "tiny-enc.imgk", encrypt=True)
    out = {"raw": (tiny_bios_image, None), "imgk": (imgk, None), "imgk-encrypted": (enc, PASSWORD)}
    for fmt in ("qcow2", "vhd", "vhdx", "vmdk"):
        out[fmt] = (convert(imgk, d / f"tiny.{fmt}"), None)
    out["vmdk-from-encrypted"] = (convert(enc, d / "tiny-enc.vmdk", "--decrypt", password=True), None)
    return out


@pytest.mark.parametrize("kind", ["raw", "imgk", "imgk-encrypted", "qcow2", "vhd", "vhdx",
                                  "vmdk", "vmdk-from-encrypted"])
def test_tiny_boots_from_every_format(tiny_images, kind):
    path, password = tiny_images[kind]
    before = file_state(path)
    env = {"IMGKIT_PASSWORD": password} if password else None
    code, doc, err = boot_check_json(path, "--timeout", "30", env=env)
    assert code == 0, (doc, err)
    assert doc["passed"] is True and doc["reason"] is None
    assert doc["matched"] == "IMGKIT-BOOT-OK tiny-bios"
    assert doc["firmware"] == "bios" and doc["media"] == "disk"
    expected_format = "imgk" if kind.startswith("imgk") else kind.split("-")[0]
    assert doc["format"] == expected_format
    assert doc["streamed"] is kind.startswith("imgk")  # imgk is served by imgkit, not unpacked
    assert doc["seconds_to_result"] < 30
    assert file_state(path) == before  # booting never writes the image


def test_encrypted_without_password_is_refused(tiny_images):
    path, _ = tiny_images["imgk-encrypted"]
    code, doc, err = boot_check_json(path)
    assert code == 3 and doc is None
    assert err.startswith("imgkit: error:") and "password" in err and "Traceback" not in err


def test_wrong_password_is_refused(tiny_images):
    path, _ = tiny_images["imgk-encrypted"]
    code, doc, err = boot_check_json(path, env={"IMGKIT_PASSWORD": "wrong"})
    assert code == 3 and "Traceback" not in err
