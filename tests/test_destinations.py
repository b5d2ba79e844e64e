"""The destination declarations (imgkit/formats/destinations.py): one entry per output format, and
what each declares is what qemu-img and convert really accept."""
from __future__ import annotations

import ast
import pathlib
import subprocess

import click
import pytest

from imgkit.cli.cmd_convert import convert as convert_command
from imgkit.errors import InputError
from imgkit.formats import destinations as D
from imgkit.formats import detect
from imgkit.operations import convert as conversion


def _to_choices() -> list[str]:
    (opt,) = [p for p in convert_command.params if p.name == "dest_format"]
    assert isinstance(opt.type, click.Choice)
    return list(opt.type.choices)


def test_every_format_the_cli_accepts_has_one_entry_in_the_same_order():
    assert list(D.DESTINATIONS) == _to_choices() == list(detect.FORMATS)
    for ext, fmt in detect.EXTENSIONS.items():
        assert fmt in D.DESTINATIONS, ext


def test_entries_are_consistent():
    for d in D.DESTINATIONS.values():
        assert d.route in (D.CAPTURE, D.COPY, D.QEMU_IMG), d.name
        if d.route == D.QEMU_IMG:
            assert d.qemu_name == detect.QEMU_DRIVER[d.name]
        if d.subformats:
            assert d.default_subformat in d.subformats
        else:
            assert d.default_subformat is None
        if d.compression is None:
            assert not d.compress_options and not d.compress_args
        if d.native is not None:
            assert d.route == D.QEMU_IMG, "a native writer replaces qemu-img only"
            assert callable(d.native.load())
    assert [d.name for d in D.DESTINATIONS.values() if d.encrypts] == ["imgk"]


@pytest.mark.parametrize("name", [d.name for d in D.DESTINATIONS.values() if d.qemu_name])
def test_qemu_img_accepts_every_declared_option(tmp_path, name):
    """What convert hands qemu-img for each subformat (and with --compress) is a valid creation."""
    d = D.DESTINATIONS[name]
    for sub in d.subformats or (None,):
        for compress in (False, True) if d.compression else (False,):
            out = tmp_path / f"{sub}-{compress}.out"
            argv = ["qemu-img", "create", "-q", "-f", d.qemu_name, *d.qemu_img_options(sub, compress),
                    str(out), "3M"]
            r = subprocess.run(argv, capture_output=True, text=True)
            assert r.returncode == 0, (argv, r.stderr)


def test_qemu_options_keep_their_order():
    assert D.DESTINATIONS["vhd"].qemu_img_options("fixed", False) == ["-o", "subformat=fixed,force_size=on"]
    assert D.DESTINATIONS["qcow2"].qemu_img_options(None, True) == ["-o", "compat=1.1,compression_type=zstd"]
    assert D.DESTINATIONS["raw"].qemu_img_options(None, False) == []


def test_native_writer_conditions():
    qcow2, vhd = D.DESTINATIONS["qcow2"].native, D.DESTINATIONS["vhd"].native
    assert qcow2.applies(None, False) and not qcow2.applies(None, True)
    assert vhd.applies("dynamic", False) and not vhd.applies("fixed", False)
    assert D.DESTINATIONS["vhdx"].native is None and D.DESTINATIONS["vmdk"].native is None


def test_plan_reads_the_declarations():
    plan = conversion._plan("vmdk", None, False, None)
    assert (plan.dest.name, plan.subformat) == ("vmdk", "monolithicSparse")
    with pytest.raises(InputError, match=r"--compress applies to qcow2 \(zstd clusters\), not vmdk") as e:
        conversion._plan("vmdk", None, True, None)
    assert e.value.hint == "streamOptimized VMDK is always compressed"
    with pytest.raises(InputError, match="--subformat fixed does not apply to qcow2") as e:
        conversion._plan("qcow2", "fixed", False, None)
    assert e.value.hint == "qcow2 has no subformats"
    with pytest.raises(InputError, match="unknown destination format 'vdi'"):
        conversion._plan("vdi", None, False, "azure")


def test_names_reads_like_a_sentence():
    assert D.names(lambda d: d.qemu_name is not None and not d.optical) == "raw, qcow2, vhd, vhdx or vmdk"
    assert D.names(lambda d: d.name == "imgk") == "imgk"


def _format_names_compared(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every comparison against a format-name literal (`fmt == "qcow2"`,
    `to in ("raw", "iso")`): the switches the declarations replace."""
    names = set(D.DESTINATIONS)

    def literals(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [v for e in node.elts for v in literals(e)]
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for v in literals(node.left) + [v for c in node.comparators for v in literals(c)]:
                if v in names:
                    found.append((node.lineno, v))
    return found


def test_operations_and_cli_switch_on_no_format_name():
    root = pathlib.Path(conversion.__file__).resolve().parents[1]
    # An rbd: destination is a raw block image: "raw" there names what RBD holds, not a file format.
    allowed = {("operations/convert.py", "raw")}
    found = []
    for folder in ("operations", "cli"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            found += [(rel, line, name) for line, name in _format_names_compared(ast.parse(path.read_text()))
                      if (rel, name) not in allowed]
    assert found == []
    # the check sees a switch when there is one
    assert _format_names_compared(ast.parse('if fmt in ("qcow2", "vhd"): pass')) == [(1, "qcow2"), (1, "vhd")]


def test_presets_name_a_destination_and_its_subformat():
    for p in D.PRESETS.values():
        assert p.subformat in D.DESTINATIONS[p.to].subformats
    assert conversion.PRESETS == tuple(D.PRESETS)
    plan = conversion._plan("vhd", None, False, "azure")
    assert (plan.subformat, plan.pad_to_mib) == ("fixed", True)
    with pytest.raises(InputError, match="--preset azure makes a VHD, not qcow2") as e:
        conversion._plan("qcow2", None, False, "azure")
    assert e.value.hint == "name the destination .vhd or use --to vhd"
    with pytest.raises(InputError, match="--preset azure needs a fixed VHD; drop --subformat"):
        conversion._plan("vhd", "dynamic", False, "azure")
