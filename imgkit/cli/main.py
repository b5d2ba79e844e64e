"""imgkit's command line. Exit codes: 0 success; 1 the operation found a problem (verify found
damage, boot-check failed); 2 usage error; 3 bad input (not an image, wrong password, refused
target); 4 the environment lacks something; 130 interrupted."""
from __future__ import annotations

import sys

import click

from ..errors import ImgkitError, InternalError


class App:
    def __init__(self, debug: bool):
        self.debug = debug


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--endpoint-url", metavar="URL",
              help="S3 endpoint for s3:// images (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, ~/.aws/config).")
@click.option("--ceph-conf", metavar="FILE", type=click.Path(),
              help="Ceph configuration for rbd: images (default: CEPH_CONF, /etc/ceph/ceph.conf).")
@click.version_option(package_name="imgkit")
@click.pass_context
def cli(ctx, debug, endpoint_url, ceph_conf):
    """imgkit: capture, restore, inspect and verify disk images.

    Exit codes: 0 ok, 1 problem found, 2 usage, 3 bad input, 4 missing tool or device (qemu, /dev/fuse), 130 interrupted.
    """
    import os
    # Both go through the environment: boto3 and librados read it themselves, and so do the
    # processes a command starts (a mount's server, qemu's rbd driver).
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
    if ceph_conf:
        os.environ["CEPH_CONF"] = os.path.abspath(ceph_conf)
    ctx.obj = App(debug)


# Each module registers its commands on `cli`; a new command family is one new module and one entry
# here. Only the module of the command being run is imported (convert, mount and boot-check pull in
# the NBD server, FUSE and QEMU plumbing: ~40 ms a capture does not need); --help and unknown
# commands import them all. tests/test_main.py checks that this map names every command.
COMMAND_MODULES = {
    "cmd_core": ("capture", "restore", "info", "verify"),
    "cmd_volumes": ("passwd", "split", "join", "consolidate"),
    "cmd_convert": ("convert",),
    "cmd_bootcheck": ("boot-check",),
    "cmd_serve": ("serve",),
    "cmd_run": ("run",),
    "cmd_mount": ("mount", "umount"),
    "cmd_remote": ("s3-cleanup",),
    "cmd_rescue": ("rescue-iso",),
}


def _load_commands(args: list[str]) -> None:
    import importlib
    wanted = next((a for a in args if not a.startswith("-")), None)
    modules = [m for m, commands in COMMAND_MODULES.items() if wanted in commands] or list(COMMAND_MODULES)
    for name in modules:
        importlib.import_module(f"{__package__}.{name}")


def main(argv=None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    _load_commands(args)
    debug = "--debug" in args
    try:
        cli.main(args=argv, prog_name="imgkit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("imgkit: error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ImgkitError as e:
        if debug:
            raise
        click.echo(f"imgkit: error: {e}", err=True)
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("imgkit: error: interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"imgkit: error: {where}{e.strerror or e}", err=True)
        sys.exit(3)
    except Exception as e:  # a bug: still one line and an exit code, the traceback with --debug
        if debug:
            raise
        err = InternalError.from_exception(e)
        click.echo(f"imgkit: error: {err}", err=True)
        click.echo(f"hint: {err.hint}", err=True)
        sys.exit(err.exit_code)
