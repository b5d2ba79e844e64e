"""The rescue-iso command: build the bootable rescue ISO (imgkit/rescue/)."""
from __future__ import annotations

import click

from ..rescue import build
from .main import cli
from .options import json_option
from .output import emit_json


@cli.command("rescue-iso")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--cache-dir", type=click.Path(file_okay=False), metavar="DIR",
              help=f"Package and layer cache (default {build.DEFAULT_CACHE}, or $IMGKIT_RESCUE_CACHE).")
@click.option("--refresh", is_flag=True, help="Fetch packages from the Debian mirror again (security updates) "
                                              "instead of the package cache.")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@json_option
def rescue_iso(out, cache_dir, refresh, force, as_json):
    """Build a bootable rescue ISO (BIOS + UEFI, hybrid: dd it to a USB stick) with imgkit and the
    disk tools, from Debian 12 packages. Needs root. The first build downloads ~140 MB of packages
    into the cache; later builds run offline from it. The same inputs give the same ISO.

    Example: imgkit rescue-iso imgkit-rescue.iso && imgkit boot-check imgkit-rescue.iso
    """
    result = build.build_rescue_iso(out, cache_dir, force=force, refresh=refresh,
                                    emit=lambda line: click.echo(line, err=True))
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{result['path']}: {result['size'] / (1 << 20):.1f} MiB, sha256 {result['sha256']}")
