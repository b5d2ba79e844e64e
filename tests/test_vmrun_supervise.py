"""`imgkit run`'s supervision loop (operations/vmrun._supervise) against a stand-in process that answers
QMP the way QEMU does (tests/test_bootcheck_runner.MONITOR), for what real QEMU will not do on
demand: ignore `quit`. Real QEMU runs are in tests/test_vmrun.py."""
from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from imgkit.errors import EnvironmentProblem, OperationFailed
from imgkit.operations import vmrun
from imgkit.operations.bootcheck.plan import BootPlan
from tests.test_bootcheck_runner import MONITOR


class _Export:
    errors: list = []

    def close(self):
        pass


def supervise(tmp_path, script: str):
    work = tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, "-c", MONITOR + textwrap.dedent(script), str(work)]
    said = []
    result = vmrun._supervise(argv, str(work), 1 << 30, BootPlan("raw", "disk", "bios", "test", 1 << 20), "tcg",
                              "disk.raw", None, None, False, 1 << 20, _Export(), lambda m, progress=False: said.append(m))
    return result, said, work


def test_a_qemu_that_ignores_quit_is_stopped_and_the_run_ends_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(vmrun, "QUIT_SECONDS", 0.5)
    started = time.monotonic()
    result, said, work = supervise(tmp_path, r"""
        monitor()
        with open(os.path.join(work, "pid"), "w") as f:
            f.write(str(os.getpid()))
        event("SHUTDOWN")   # the guest powered off; the stand-in then ignores "quit"
        time.sleep(60)
        """)
    assert time.monotonic() - started < 20
    assert result.exit_status is None and not result.mirror_completed
    assert any("did not exit within 0.5 s" in m for m in said), said
    pid = int((work / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)   # reaped by kill_group: not even a zombie


def test_a_qemu_that_quits_reports_its_exit_status(tmp_path):
    result, said, _ = supervise(tmp_path, r"""
        monitor()
        event("SHUTDOWN")
        time.sleep(0.5)   # "quit" answered by the monitor thread; then exit as QEMU does
        sys.exit(0)
        """)
    assert result.exit_status == 0 and said == []


def test_qemu_failing_to_start_kvm_is_the_environments_fault(tmp_path):
    with pytest.raises(EnvironmentProblem, match="Could not access KVM"):
        supervise(tmp_path, r"""
            sys.stderr.write("Could not access KVM kernel module: No such file or directory\n")
            sys.exit(1)
            """)


def test_qemu_failing_otherwise_is_an_operation_failure_with_its_last_line(tmp_path):
    with pytest.raises(OperationFailed, match="Could not open 'x'"):
        supervise(tmp_path, r"""
            sys.stderr.write("qemu-system-x86_64: -blockdev x: Could not open 'x'\n")
            sys.exit(1)
            """)
