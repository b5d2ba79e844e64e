"""imgkit.accel: the KVM probe's tiny guest really boots (under TCG here, where /dev/kvm hangs), and
IMGKIT_ACCEL overrides the probe."""
from __future__ import annotations

import subprocess

import pytest

from imgkit import accel


@pytest.mark.qemu
def test_probe_guest_boots_and_exits_under_tcg(tmp_path):
    disk = tmp_path / "probe.img"
    disk.write_bytes(accel._boot_sector())
    proc = subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-nodefaults",
                           "-no-user-config", "-m", "16", "-serial", "stdio", "-monitor", "none",
                           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-drive", f"file={disk},format=raw,if=floppy,readonly=on", "-boot", "a"],
                          capture_output=True, timeout=30)
    assert proc.stdout == b"K"
    assert proc.returncode == 1  # isa-debug-exit: (0 << 1) | 1


def test_env_overrides_the_probe(monkeypatch):
    monkeypatch.setattr(accel, "kvm_works", lambda *a, **k: pytest.fail("probed despite IMGKIT_ACCEL"))
    monkeypatch.setenv("IMGKIT_ACCEL", "tcg")
    assert accel.choose_accel() == "tcg"
    monkeypatch.setenv("IMGKIT_ACCEL", "kvm")
    assert accel.choose_accel() == "kvm"
