"""QEMU's command line for a boot check, without booting (imgkit/operations/bootcheck/qemu_cmdline.py):
the argv for BIOS and UEFI, raw / qcow2 / imgk over NBD / ISO, TCG and KVM, every block node
read-only where it is the image, no network. The overlay is made by the real qemu-img; booting these
command lines is what tests/test_bootcheck_*.py do."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from imgkit.operations.bootcheck import qemu_cmdline as Q
from imgkit.operations.bootcheck.plan import BootPlan

QEMU = "qemu-system-x86_64"
SIZE = 64 << 20


def nodes(argv: list[str]) -> dict[str, dict]:
    found = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    return {n["node-name"]: n for n in found}


def values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def qcow2_info(path) -> dict:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.fixture
def work(tmp_path):
    d = tmp_path / "work,dir"   # a comma: qemu option values must double it
    d.mkdir()
    return str(d)


def test_bios_raw_disk_under_tcg(tmp_path, work):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 4096)
    plan = BootPlan("raw", "disk", "bios", "test", 4096)
    argv = Q.boot_check_argv(QEMU, plan, Q.file_source(str(image), "raw"), work, 256 << 20, "tcg", False)
    assert argv[0] == QEMU and "-nodefaults" in argv and "-no-user-config" in argv
    assert values(argv, "-accel") == [f"tcg,tb-size={Q.TCG_TB_MIB}"]
    assert values(argv, "-m") == ["256M"] and values(argv, "-smp") == ["1"]
    assert values(argv, "-machine") == ["pc"]
    assert {"-no-reboot", "-no-shutdown"} <= set(argv)
    # no network at all, no display, the serial console on stdout
    assert values(argv, "-nic") == ["none"] and "-netdev" not in argv and "-net" not in argv
    assert values(argv, "-display") == ["none"] and "chardev:com1" in values(argv, "-serial")
    chardevs = values(argv, "-chardev")
    assert f"file,id=fwlog,path={work.replace(',', ',,')}/firmware.log" in chardevs
    assert f"socket,id=qmp,path={work.replace(',', ',,')}/qmp.sock,server=on,wait=off" in chardevs
    n = nodes(argv)
    assert set(n) == {"src", "disk"}
    assert n["src"] == {"driver": "raw", "read-only": True, "node-name": "src",
                        "file": {"driver": "file", "filename": str(image), "read-only": True}}
    overlay = os.path.join(work, "overlay.qcow2")
    assert n["disk"]["backing"] == "src" and n["disk"]["read-only"] is False
    assert n["disk"]["file"]["filename"] == overlay
    info = qcow2_info(overlay)
    assert info["virtual-size"] == 4096 and "backing-filename" not in info  # backing given at run time
    assert info["cluster-size"] == 65536
    assert values(argv, "-device")[-1] == "ide-hd,drive=disk,bootindex=0"
    assert values(argv, "-sandbox") in ([], [Q.SANDBOX])


def test_kvm_is_asked_for_by_name():
    argv = Q.machine_args(QEMU, "x", "kvm", 512 << 20, 2)
    assert values(argv, "-accel") == ["kvm"] and values(argv, "-smp") == ["2"]


def test_a_foreign_image_reaches_qemu_only_through_its_descriptor(tmp_path, work):
    image = tmp_path / "disk.qcow2"
    with pytest.raises(ValueError):
        Q.file_source(str(image), "qcow2")           # by path: refused
    image.write_bytes(b"")
    src = Q.file_source(str(image), "qcow2", fd=9)
    assert src["file"]["filename"] == "/proc/self/fd/9" and src["file"]["read-only"] is True
    assert src["read-only"] is True and src["backing"] is None and src["driver"] == "qcow2"
    vhd = Q.file_source(str(image), "vhd", fd=9)
    assert vhd["driver"] == "vpc" and "backing" not in vhd
    argv = Q.boot_check_argv(QEMU, BootPlan("qcow2", "disk", "bios", "t", SIZE), src, work, 256 << 20, "tcg", False)
    assert nodes(argv)["src"] == src


def test_a_block_device_is_opened_with_host_device():
    assert Q.file_source("/dev/null", "raw")["file"]["driver"] == "host_device"


def test_imgk_is_streamed_over_nbd_with_copy_on_read(work):
    src = Q.nbd_source("/run/x/nbd.sock")
    assert src == {"driver": "raw", "read-only": True, "node-name": "src",
                   "file": {"driver": "nbd", "server": {"type": "unix", "path": "/run/x/nbd.sock"},
                            "read-only": True}}
    argv = Q.boot_check_argv(QEMU, BootPlan("imgk", "disk", "bios", "t", SIZE), src, work, 256 << 20, "tcg", True)
    n = nodes(argv)
    assert n["cor"] == {"driver": "copy-on-read", "node-name": "cor", "file": "disk"}
    assert n["disk"]["backing"] == "src"
    assert values(argv, "-device")[-1] == "ide-hd,drive=cor,bootindex=0"
    # one overlay cluster per default imgk chunk: firmware's sector reads fetch whole chunks
    assert qcow2_info(os.path.join(work, "overlay.qcow2"))["cluster-size"] == Q.STREAM_CLUSTER


def test_an_iso_is_a_cdrom_on_the_image_itself(tmp_path, work):
    image = tmp_path / "x.iso"
    image.write_bytes(b"\0" * 2048)
    argv = Q.boot_check_argv(QEMU, BootPlan("iso", "cdrom", "bios", "t", 2048), Q.file_source(str(image), "iso"),
                             work, 256 << 20, "tcg", False)
    assert set(nodes(argv)) == {"src"}
    assert values(argv, "-device")[-1] == "ide-cd,drive=src,bootindex=0"
    assert not os.path.exists(os.path.join(work, "overlay.qcow2"))
    # streamed, an ISO still gets the overlay and copy-on-read (NBD round trips)
    argv = Q.boot_check_argv(QEMU, BootPlan("imgk", "cdrom", "bios", "t", 2048), Q.nbd_source("/s"),
                             work, 256 << 20, "tcg", True)
    assert values(argv, "-device")[-1] == "ide-cd,drive=cor,bootindex=0"


def test_uefi_gets_read_only_code_and_a_private_copy_of_the_variables(tmp_path, work, monkeypatch):
    code, template = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"C" * 4096)
    template.write_bytes(b"V" * 4096)
    monkeypatch.setenv("IMGKIT_OVMF_CODE", str(code))
    monkeypatch.setenv("IMGKIT_OVMF_VARS", str(template))
    argv = Q.boot_check_argv(QEMU, BootPlan("raw", "disk", "uefi", "t", SIZE), Q.nbd_source("/s"), work,
                             512 << 20, "kvm", True)
    assert values(argv, "-accel") == ["kvm"]
    assert values(argv, "-machine") == ["pc,pflash0=ovmf-code,pflash1=ovmf-vars"]
    n = nodes(argv)
    assert n["ovmf-code"]["read-only"] is True and n["ovmf-code"]["file"]["filename"] == str(code)
    vars_copy = n["ovmf-vars"]["file"]["filename"]
    assert os.path.dirname(vars_copy) == work and n["ovmf-vars"]["read-only"] is False
    assert open(vars_copy, "rb").read() == template.read_bytes()


def test_imgkit_run_builds_its_graph_from_the_same_nodes(tmp_path, work):
    from imgkit.operations.vmrun import _qemu_argv

    class Export:
        socket_path = "/run/x/nbd.sock"
    overlay = tmp_path / "kept.qcow2"
    argv = _qemu_argv(QEMU, BootPlan("imgk", "disk", "bios", "t", SIZE), work, Export, str(overlay),
                      1 << 30, 2, "tcg", "none", None, "none", False)
    n = nodes(argv)
    assert n["src"] == Q.nbd_source("/run/x/nbd.sock")
    assert n["cache"]["backing"] == "src" and n["cor"]["file"] == "cache" and n["disk"]["backing"] == "cor"
    assert n["disk"]["file"]["filename"] == str(overlay)
    assert values(argv, "-nic") == ["none"] and values(argv, "-accel") == [f"tcg,tb-size={Q.TCG_TB_MIB}"]
    assert values(argv, "-device")[-1] == "ide-hd,drive=disk,bootindex=0"
