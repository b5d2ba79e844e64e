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
