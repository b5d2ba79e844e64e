"""rescue/vm.run_iso's handling of the QEMU process, with a stand-in for QEMU (what real QEMU will
not do on demand: print megabytes to stderr, fail on KVM). Real rescue ISO boots are in
tests/test_rescue_iso.py."""
from __future__ import annotations

import sys

import pytest

from imgkit.errors import EnvironmentProblem
from imgkit.rescue import vm


def _stand_in(monkeypatch, script: str):
    monkeypatch.setenv("IMGKIT_ACCEL", "tcg")

    def argv(qemu, iso, disks, work, log, **_):
        return [sys.executable, "-c", script, log]
    monkeypatch.setattr(vm, "vm_argv", argv)


def test_a_chatty_qemu_does_not_block_on_its_stderr(monkeypatch, tmp_path):
    # 4 MiB of warnings, then the guest's console and power-off: with stderr on an unread pipe the
    # stand-in blocks after 64 KiB and is killed at the timeout instead
    _stand_in(monkeypatch, r"""
import sys
for _ in range(4096):
    sys.stderr.write("qemu-system-x86_64: warning: " + "x" * 1000 + "\n")
sys.stderr.flush()
with open(sys.argv[1], "w") as f:
    f.write("rescue: job done\n")
""")
    run = vm.run_iso("rescue.iso", [], timeout=20)
    assert run.powered_off and run.seconds < 20
    assert run.console == "rescue: job done\n"


def test_a_kvm_failure_is_the_environments_fault_with_qemus_line(monkeypatch):
    _stand_in(monkeypatch, r"""
import sys
sys.stderr.write("noise\nCould not access KVM kernel module: No such file or directory\n")
sys.exit(1)
""")
    with pytest.raises(EnvironmentProblem, match="^qemu: Could not access KVM"):
        vm.run_iso("rescue.iso", [], timeout=20)


def test_another_qemu_failure_names_its_last_line(monkeypatch):
    _stand_in(monkeypatch, r"""
import sys
sys.stderr.write("qemu-system-x86_64: -blockdev x: Could not open 'rescue.iso'\n")
sys.exit(1)
""")
    with pytest.raises(EnvironmentProblem, match=r"exit 1\): qemu-system-x86_64: -blockdev x: Could not open"):
        vm.run_iso("rescue.iso", [], timeout=20)
