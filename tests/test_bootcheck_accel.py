"""--accel auto: KVM only when a probe guest really runs under it, decided within seconds (here
/dev/kvm exists but hangs), cached per host boot; IMGKIT_ACCEL forces a choice."""
from __future__ import annotations

import json
import os
import time

import pytest

from imgkit.platform import accel
from tests.bootcheck_helpers import boot_check_json

pytestmark = [pytest.mark.qemu]


def test_env_forces_tcg(monkeypatch):
    monkeypatch.setenv("IMGKIT_ACCEL", "tcg")
    assert accel.choose_accel("auto")[0] == "tcg"
    monkeypatch.setenv("IMGKIT_ACCEL", "warp")
    with pytest.raises(Exception, match="IMGKIT_ACCEL"):
        accel.choose_accel("auto")


def test_probe_guest_runs_under_tcg():
    """The probe itself is sound: under TCG it prints its byte and powers off at once."""
    works, seconds = accel.probe_kvm(accel_name="tcg")
    assert works and seconds < accel.PROBE_SECONDS


def test_auto_decides_quickly_and_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("IMGKIT_ACCEL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    t0 = time.monotonic()
    first = accel.choose_accel("auto")
    assert time.monotonic() - t0 < accel.PROBE_SECONDS + 3  # a hanging KVM never blocks us
    if not os.path.exists("/dev/kvm"):
        assert first == ("tcg", "no /dev/kvm")
        return
    with open(tmp_path / "imgkit" / "kvm-probe.json") as f:
        cached = json.load(f)
    assert cached["kvm_works"] == (first[0] == "kvm") and cached["kernel"] == os.uname().release
    t0 = time.monotonic()
    second = accel.choose_accel("auto")
    assert time.monotonic() - t0 < 0.5 and second[0] == first[0] and "cached" in second[1]


def test_boot_check_with_auto_accel(tiny_bios_image, tmp_path):
    code, doc, err = boot_check_json(tiny_bios_image, "--accel", "auto",
                                     env={"IMGKIT_ACCEL": "", "XDG_CACHE_HOME": str(tmp_path)})
    assert code == 0, (doc, err)
    assert doc["accel"] in ("kvm", "tcg") and doc["total_seconds"] < accel.PROBE_SECONDS + 10


@pytest.mark.parametrize("kvm, tcg, expected", [
    ((False, 3.0), None, "tcg"),           # the probe guest never ran
    ((True, 0.12), None, "kvm"),           # a working KVM: fast, no TCG run needed
    ((True, 2.7), (True, 0.08), "tcg"),    # these machines: finishes, but 30x slower than TCG
    ((True, 1.4), (True, 0.9), "kvm"),     # a loaded host slows both alike
])
def test_decide(kvm, tcg, expected):
    name, why = accel.decide(*kvm, tcg)
    assert name == expected and why


def test_an_older_probe_verdict_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    os.makedirs(tmp_path / "imgkit")
    with open(tmp_path / "imgkit" / "kvm-probe.json", "w") as f:  # what the first probe rule stored
        json.dump({**accel._host_key(), "kvm_works": True, "probe_seconds": 2.7}, f)
    assert accel._cached_verdict() is None
    accel._store_verdict(False, 2.7)
    assert accel._cached_verdict() is False


def test_probe_node_is_the_one_format_node_would_build(tmp_path):
    """The probe's hand-written node (platform/ may not import formats/) stays what the one node
    builder makes for an imgkit-made writable raw file: explicit drivers, nothing probed."""
    from imgkit.formats.qemu_image import format_node
    disk = str(tmp_path / "probe.img")
    argv = accel.probe_argv(disk, "tcg")
    node = json.loads(argv[argv.index("-blockdev") + 1])
    assert node == format_node(disk, "raw", node_name="d", writable=True)
    assert "-drive" not in argv and argv[argv.index("-accel") + 1] == "tcg"


# -- QEMU saying KVM failed it (platform/accel.kvm_failure: one rule for boot-check and run) --------

@pytest.mark.parametrize("line", [
    "Could not access KVM kernel module: No such file or directory",
    "qemu-system-x86_64: failed to initialize kvm: Permission denied",
    "qemu-system-x86_64: failed to initialize KVM: Device or resource busy",
    "error: kvm run failed Bad address",
    "KVM: entry failed, hardware error 0x80000021",
])
def test_kvm_failures_are_the_environments_fault(line):
    from imgkit.errors import EnvironmentProblem
    from imgkit.platform.accel import kvm_failure
    problem = kvm_failure(line + "\n")
    assert isinstance(problem, EnvironmentProblem)
    assert str(problem).startswith("qemu: ") and line in str(problem) and "tcg" in problem.hint


@pytest.mark.parametrize("line", [None, "", "qemu-system-x86_64: -blockdev x: Could not open 'x'",
                                  "qemu-system-x86_64: -m 99999999: Parameter 'size' expects a size"])
def test_other_qemu_errors_are_not_kvm_failures(line):
    from imgkit.platform.accel import kvm_failure
    assert kvm_failure(line) is None


def test_last_line_reads_only_the_tail_of_a_large_log(tmp_path):
    from imgkit.platform.qemu_tools import STDERR_TAIL, last_line
    log = tmp_path / "qemu.stderr"
    log.write_bytes(b"x" * (3 * STDERR_TAIL) + b"\nqemu: the real error\n\n  \n")
    assert last_line(str(log)) == "qemu: the real error"
    (tmp_path / "empty").write_bytes(b"")
    assert last_line(str(tmp_path / "empty")) is None and last_line(str(tmp_path / "missing")) is None
