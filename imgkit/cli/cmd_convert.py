"""The convert command: imgk, raw, ISO, qcow2, VHD, VHDX and VMDK in any direction."""
from __future__ import annotations

import click

from ..operations import convert as conversion
from ..formats.destinations import CAPTURE, DESTINATIONS
from ..formats.detect import FORMATS, format_from_extension
from ..formats.imgk_settings import LEVEL_DEFAULT, MAX_LEVEL, MIN_LEVEL
from ..units import format_size
from .main import cli
from .options import json_option, make_progress, new_password, password_options, progress_option, reading_password
from .output import emit_json


@cli.command()
@click.argument("source", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option("--from", "source_format", type=click.Choice(FORMATS),
              help="Format of SOURCE (default: read from its header; 'raw' takes the bytes as they are).")
@click.option("--to", "dest_format", type=click.Choice(FORMATS),
              help="Format of DEST (default: from its extension).")
@click.option("--compress", is_flag=True, help="qcow2: zstd-compressed clusters.")
@click.option("--level", type=click.IntRange(MIN_LEVEL, MAX_LEVEL),
              help=f"imgk destination: zstd level (default {LEVEL_DEFAULT}; 1 is fastest).")
@click.option("--subformat", help="vhd: dynamic (default) or fixed; vhdx: dynamic or fixed; "
                                  "vmdk: monolithicSparse (default) or streamOptimized (OVA/vSphere).")
@click.option("--preset", type=click.Choice(conversion.PRESETS),
              help="azure: fixed VHD, exact size rounded up to a whole MiB.")
@click.option("--force", is_flag=True, help="Replace an existing DEST.")
@click.option("--no-sync", "no_sync", is_flag=True,
              help="Do not fsync DEST (as `qemu-img convert` does not): faster, but after a power failure or "
                   "a crash of the machine DEST may be incomplete although convert reported success. For "
                   "scratch copies, CI, or when you sync yourself. Not for imgk or rbd: destinations.")
@click.option("--overlay", type=click.Path(dir_okay=False), metavar="FILE.qcow2",
              help="Apply the writes kept by `imgkit run --overlay FILE` on top of SOURCE (made over SOURCE only).")
@click.option("--encrypt", is_flag=True,
              help="imgk DEST: encrypt under a new password (IMGKIT_NEW_PASSWORD, --new-password-file or a "
                   "prompt). An encrypted imgk SOURCE otherwise stays encrypted under its own password.")
@click.option("--new-password-file", type=click.Path(dir_okay=False), help="With --encrypt: the new password.")
@click.option("--decrypt", is_flag=True, help="Write an encrypted SOURCE in clear (needed for any clear DEST).")
@click.option("--sector-by-sector", is_flag=True,
              help="imgk DEST: keep every byte, free space too. Default: only the blocks filesystems use.")
@password_options
@progress_option
@json_option
def convert(source, dest, source_format, dest_format, compress, level, subformat, preset, force, no_sync, overlay,
            encrypt, new_password_file, decrypt, sector_by_sector, password_file, progress_mode, as_json):
    """Convert a disk image between imgk, raw, iso, qcow2, vhd, vhdx and vmdk.

    Foreign images are inspected and refused (backing files, external data files, VMDK extents)
    before qemu opens them. DEST appears only when complete, synced to the disk (unless --no-sync);
    an existing DEST needs --force.

    Examples: imgkit convert backup.imgk vm.qcow2 --compress;
    imgkit convert backup.imgk azure.vhd --preset azure;
    imgkit convert disk.vmdk disk.imgk
    """
    if encrypt and decrypt:
        raise click.UsageError("--encrypt and --decrypt exclude each other")
    if sector_by_sector and not _captured(dest_format or format_from_extension(dest)):
        raise click.UsageError("--sector-by-sector applies to an imgk DEST only (other formats keep every byte)")
    fresh = new_password(new_password_file, "IMGKIT_NEW_PASSWORD", "--new-password-file") if encrypt else None
    result = conversion.convert(source, dest, source_format=source_format, to=dest_format, compress=compress,
                                subformat=subformat, preset=preset, force=force, level=level,
                                encrypt=fresh, decrypt=decrypt, sector_by_sector=sector_by_sector,
                                password=reading_password(password_file), overlay=overlay, sync=not no_sync,
                                progress=make_progress("convert", progress_mode))
    if as_json:
        emit_json(result.as_dict())
    else:
        sub = f" ({result.subformat})" if result.subformat else ""
        click.echo(f"converted {result.source_format} {format_size(result.virtual_size)} into "
                   f"{result.format}{sub}, {format_size(result.allocated_size)} on disk, in "
                   f"{result.seconds:.1f} s: {result.destination}")


def _captured(fmt: str | None) -> bool:
    """Whether convert captures into this destination (imgk), storing only the used blocks."""
    return fmt in DESTINATIONS and DESTINATIONS[fmt].route == CAPTURE
