"""restore --grow of XFS/btrfs when the libguestfs appliance is not available: the restore stands, the
partition is grown, and a warning says the filesystem keeps its size (as for FAT without fatresize).
The appliance itself is exercised for real in test_fsaware_restore.py; here its absence is simulated,
which this machine cannot produce otherwise."""
from __future__ import annotations

import imgkit.filesystems.guestfs_session as gs
from imgkit.operations import grow
from imgkit.errors import EnvironmentProblem


def test_no_appliance_is_a_warning_not_a_failure(monkeypatch):
    def missing():
        raise EnvironmentProblem("the libguestfs Python binding is missing")
    monkeypatch.setattr(gs, "new_handle", missing)
    report = grow.GrowReport(grown_partition=3)
    grow._grow_in_appliance("/nonexistent", 3, "xfs", report)
    assert not report.filesystem_grown
    assert any(n.startswith("warning: growing xfs needs the libguestfs appliance") for n in report.notes)


def test_first_line_of_an_empty_error():
    assert gs.first_line(RuntimeError("")) == "RuntimeError"
    assert gs.first_line(RuntimeError("a\nb")) == "a"


def test_a_resizer_past_its_time_is_one_operation_failed_line(monkeypatch):
    """grow's tools (sgdisk, resize2fs, ntfsresize) run with a deadline: past it, one line naming the
    tool, not subprocess.TimeoutExpired (the CLI's 'internal error')."""
    import pytest
    from imgkit.errors import OperationFailed
    monkeypatch.setattr(grow, "TOOL_TIMEOUT", 0.2)
    with pytest.raises(OperationFailed, match=r"^sleep did not finish within 0.2 s \(to grow the ext filesystem\)"):
        grow._run(["sleep", "10"], "grow the ext filesystem")
