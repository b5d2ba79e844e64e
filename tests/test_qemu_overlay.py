"""formats/qemu_image.create_overlay: imgkit's one `qemu-img create` (boot-check, run's overlay, cache
and --mirror-to target, shrink's overlay), with real qemu-img."""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess

import pytest

from imgkit.errors import OperationFailed
from imgkit.formats.qemu_image import create_overlay
from imgkit.operations.vmrun import read_overlay_backing

pytestmark = pytest.mark.qemu
ROOT = pathlib.Path(__file__).resolve().parent.parent / "imgkit"


def _info(path) -> dict:
    # the overlay's own header only (backing null): its recorded backing is a name, never a file
    spec = "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}})
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", spec], check=True,
                                     capture_output=True, text=True).stdout)


def test_an_overlay_records_its_backing_name_with_an_explicit_raw_format(tmp_path):
    ov = tmp_path / "ov.qcow2"
    create_overlay(str(ov), 3 << 20, cluster=1 << 20, backing="imgkit-image:raw-123-abc")
    assert read_overlay_backing(str(ov)) == ("imgkit-image:raw-123-abc", 3 << 20)
    info = _info(ov)
    assert info["format"] == "qcow2" and info["cluster-size"] == 1 << 20
    assert info["backing-filename"] == "imgkit-image:raw-123-abc" and info["backing-filename-format"] == "raw"


def test_an_overlay_without_backing_has_none_in_its_header(tmp_path):
    ov = tmp_path / "cache.qcow2"
    create_overlay(str(ov), 1 << 20)
    assert read_overlay_backing(str(ov)) == (None, 1 << 20)


def test_a_failure_is_one_operation_failed_line(tmp_path):
    with pytest.raises(OperationFailed, match=r"^qemu-img create \(the overlay\) failed: .*No such file") as e:
        create_overlay(str(tmp_path / "missing" / "ov.qcow2"), 1 << 20)
    assert "\n" not in str(e.value)


def _spawns_qemu_img_create(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.List):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if any(a == "qemu-img" and b == "create" for a, b in zip(words, words[1:])):
                return True
    return False


def test_nothing_else_in_imgkit_runs_qemu_img_create():
    """Explicit formats and qemu_tools' limits in one place: every overlay goes through create_overlay."""
    assert _spawns_qemu_img_create(ast.parse('x = ["qemu-img", "create", "-f", "qcow2"]'))
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                   if _spawns_qemu_img_create(ast.parse(p.read_text())))
    assert users == ["formats/qemu_image.py"]
