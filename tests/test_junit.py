"""imgkit.cli.junit: boot-check results as JUnit XML, rendered without booting anything."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from imgkit.operations.bootcheck import BootResult
from imgkit.cli.junit import junit_xml


def _result(passed: bool, **kw) -> BootResult:
    base = dict(image="/x/disk.imgk", passed=passed, reason=None if passed else "kernel panic",
                detail=None if passed else "Kernel panic - not syncing", seconds_to_result=4.25,
                total_seconds=5.0, expect="login:", matched="login:" if passed else None, matched_on=None,
                format="imgk", media="disk", firmware="bios", firmware_why="", accel="tcg", accel_why="",
                streamed=True, timeout=60.0, memory=512 << 20, console_tail=["a", "b"])
    base.update(kw)
    return BootResult(**base)


def test_a_pass_is_one_test_without_failure():
    ts = ET.fromstring(junit_xml(_result(True)))
    assert ts.get("tests") == "1" and ts.get("failures") == "0" and ts.get("time") == "4.250"
    case = ts.find("testcase")
    assert case.get("name") == "disk.imgk" and case.find("failure") is None
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["firmware"] == "bios" and "reason" not in props


def test_a_failure_says_why_and_carries_the_console():
    case = ET.fromstring(junit_xml(_result(False))).find("testcase")
    fail = case.find("failure")
    assert fail.get("type") == "kernel panic" and "Kernel panic" in fail.get("message")
    assert fail.text == "a\nb" and case.find("system-out").text == "a\nb"
    empty = ET.fromstring(junit_xml(_result(False, console_tail=[], firmware_log_tail=["fw"]))).find("testcase")
    assert empty.find("failure").text == "(no console output; firmware log:)\nfw"
