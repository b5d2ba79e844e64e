"""boot-check's result as a JUnit XML report (--junit), for CI systems: rendering for the command
line, so it lives with the CLI and not in the boot checker."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from ..operations.bootcheck import BootResult


def junit_xml(result: BootResult, suite: str = "imgkit.boot-check") -> str:
    secs = f"{result.seconds_to_result or 0:.3f}"
    ts = ET.Element("testsuite", name=suite, tests="1", failures="0" if result.passed else "1",
                    errors="0", skipped="0", time=secs)
    case = ET.SubElement(ts, "testcase", classname=suite, name=os.path.basename(result.image), time=secs)
    props = ET.SubElement(case, "properties")
    for key in ("format", "media", "firmware", "accel", "expect", "reason"):
        value = result.to_json()[key]
        if value is not None:  # a pass has no reason: no reason="None" property
            ET.SubElement(props, "property", name=key, value=str(value))
    if not result.passed:
        fail = ET.SubElement(case, "failure", message=f"{result.reason}: {result.detail or ''}".strip(": "),
                             type=result.reason or "failure")
        fail.text = "\n".join(result.console_tail or
                              ["(no console output; firmware log:)"] + result.firmware_log_tail)
    out = ET.SubElement(case, "system-out")
    out.text = "\n".join(result.console_tail)
    ET.indent(ts)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(ts, encoding="unicode") + "\n"
