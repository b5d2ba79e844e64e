"""imgkit/cli/main.py: the command map loads lazily and names every command."""
import subprocess
import sys


def test_cli_help():
    out = subprocess.run(["imgkit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "capture" in out and "restore" in out


def test_every_command_is_in_the_lazy_map_and_help_lists_it():
    # main() imports only the module of the command being run: a command missing from
    # COMMAND_MODULES would be reachable from --help but not by name.
    from imgkit.cli.main import COMMAND_MODULES, _load_commands, cli
    _load_commands(["--help"])
    mapped = {c for commands in COMMAND_MODULES.values() for c in commands}
    assert set(cli.commands) == mapped
    out = subprocess.run(["imgkit", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(c in out for c in mapped)


def test_a_command_runs_without_the_other_families_imported():
    code = ("import sys; from imgkit.cli.main import main\n"
            "try:\n    main(['info', '/nonexistent.imgk'])\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, 'imgkit.operations.mount' in sys.modules, 'imgkit.views.nbd_export' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.split() == ["3", "False", "False"], p.stdout + p.stderr
    assert p.stderr.startswith("imgkit: error:") and len(p.stderr.strip().splitlines()) == 1


def test_convert_loads_only_what_its_source_and_destination_need(tmp_path):
    # The start-up of `imgkit convert` (issue 14): an imgk -> qcow2 conversion loads neither the S3
    # nor the RBD client, nor the foreign-header inspectors, nor the imgk writer; a foreign source
    # does load the inspectors (the lazy import is where it must be, not just gone).
    from imgkit import api
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\1" * (1 << 20))
    imgk = tmp_path / "d.imgk"
    api.capture(str(raw), str(imgk), sector_by_sector=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(tmp_path / "d.vmdk")], check=True)
    lazy = ("imgkit.remote.s3", "imgkit.remote.rbd_image", "imgkit.formats.foreign", "imgkit.formats.imgk_writer")

    def loaded(source, dest):
        code = (f"import sys\nfrom imgkit.cli.main import main\n"
                f"main(['convert', '--progress', 'none', {str(source)!r}, {str(dest)!r}])\n"
                f"print('LOADED', *[m for m in {lazy!r} if m in sys.modules], file=sys.stderr)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stderr.split("LOADED", 1)[1].split()
    assert loaded(imgk, tmp_path / "a.qcow2") == []
    assert loaded(imgk, tmp_path / "a.raw") == []
    assert loaded(tmp_path / "d.vmdk", tmp_path / "b.raw") == ["imgkit.formats.foreign"]
