"""Commands on an image's key slot, volume layout and chain: passwd, split, join, consolidate (logic: imgkit/operations/volumes.py, imgkit/operations/consolidate.py)."""
from __future__ import annotations

import click

from ..operations import volumes
from ..units import format_size
from .main import cli
from .options import (SPLIT_SIZE, json_option, make_progress, new_password, password_options,
                      progress_option, reading_password)
from .output import emit_json


@cli.command()
@click.argument("image", type=click.Path())
@password_options
@click.option("--new-password-file", type=click.Path(dir_okay=False),
              help="Read the new password from this file (first line). Also: IMGKIT_NEW_PASSWORD.")
@json_option
def passwd(image, password_file, new_password_file, as_json):
    """Change the password of an encrypted image, without rewriting its data.

    The current password is asked first (--password-file, IMGKIT_PASSWORD or a prompt), then the
    new one twice (--new-password-file, IMGKIT_NEW_PASSWORD or a prompt). Only the key slot of
    each volume's header is rewritten.

    Example: imgkit passwd backup.imgk
    """
    old = reading_password(password_file)
    fresh = lambda: new_password(new_password_file, "IMGKIT_NEW_PASSWORD", "--new-password-file",  # noqa: E731
                                 "passwd")
    paths = volumes.change_password(image, old, fresh)
    if as_json:
        emit_json({"image": image, "volumes": paths})
    else:
        click.echo(f"password changed: {image}" + (f" ({len(paths)} volumes)" if len(paths) > 1 else ""))


def _report(result: volumes.RelayoutResult, as_json: bool, verb: str) -> None:
    if as_json:
        emit_json({"image": result.paths[0], "volumes": result.paths, "stored_size": result.stored_bytes,
                   "chunks_copied": result.chunks_copied, "seconds": round(result.seconds, 3)})
    else:
        click.echo(f"{verb} {result.paths[0]}: {len(result.paths)} volume(s), "
                   f"{format_size(result.stored_bytes)}, in {result.seconds:.1f} s")


@cli.command()
@click.argument("image", type=click.Path())
@click.option("--split-size", type=SPLIT_SIZE, required=True,
              help="Largest volume: a size (650M, 4000M) or a preset: fat32 (4 GiB - 1 byte), "
                   "dvd (single-layer DVD, 4,692 MB).")
@click.option("-o", "--output", type=click.Path(), help="Write the new volumes here (default: replace IMAGE).")
@click.option("--force", is_flag=True, help="Replace an existing output image.")
@password_options
@progress_option
@json_option
def split(image, split_size, output, force, password_file, progress_mode, as_json):
    """Split an image (again) into volumes of at most SIZE, without recompressing.

    Stored chunks are copied byte for byte and checked on the way; encrypted images need their
    password because the index is sealed. The volumes are IMAGE, IMAGE.002, IMAGE.003, ...

    Example: imgkit split backup.imgk --split-size fat32 -o /media/usb/backup.imgk
    """
    result = volumes.relayout(image, output, split_size=split_size, password=reading_password(password_file),
                              force=force, progress=make_progress("split", progress_mode))
    _report(result, as_json, "split")


@cli.command()
@click.argument("image", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Write the joined image here (default: replace IMAGE).")
@click.option("--force", is_flag=True, help="Replace an existing output image.")
@password_options
@progress_option
@json_option
def join(image, output, force, password_file, progress_mode, as_json):
    """Join the volumes of a split image into one file, without recompressing.

    IMAGE is the first volume (the name without a .NNN suffix); the others are found next to it.

    Example: imgkit join /media/usb/backup.imgk -o backup.imgk
    """
    result = volumes.relayout(image, output, split_size=None, password=reading_password(password_file),
                              force=force, progress=make_progress("join", progress_mode))
    _report(result, as_json, "joined")


@cli.command()
@click.argument("child", type=click.Path())
@click.argument("output", type=click.Path(), required=False)
@click.option("--into", "into", type=click.Path(dir_okay=False), metavar="PARENT",
              help="Fold CHILD into its parent PARENT: PARENT's file then holds CHILD's disk and CHILD is removed.")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT; with --into, fold even if PARENT has other children.")
@password_options
@progress_option
@json_option
def consolidate(child, output, into, force, password_file, progress_mode, as_json):
    """Make a chain of incremental images shorter: a standalone image, or one link fewer.

    consolidate CHILD OUT writes the disk of CHILD's chain as one standalone image (a synthetic
    full, without the source disk). consolidate --into PARENT CHILD folds CHILD into its parent.
    Either way the result keeps CHILD's identity, so CHILD's own children still read through it.
    Crash-safe: an interruption leaves the old chain or the new one (run it again to finish).

    Examples: imgkit consolidate wed.imgk wed-full.imgk; imgkit consolidate --into tue.imgk wed.imgk
    """
    from ..operations.consolidate import consolidate as run
    if (output is None) == (into is None):
        raise click.UsageError("give either OUTPUT or --into PARENT")
    result = run(child, output, into=into, password=reading_password(password_file), force=force,
                 progress=make_progress("consolidate", progress_mode))
    doc = {"image": result.path, "removed": result.removed, "stored_size": result.stored_bytes,
           "chunks_copied": result.chunks_copied, "chunks_from_parents": result.chunks_from_parents,
           "still_a_child": result.still_a_child, "completed_earlier_run": result.completed_earlier_run,
           "seconds": round(result.seconds, 3)}
    if as_json:
        emit_json(doc)
    elif result.completed_earlier_run:
        click.echo(f"finished an interrupted consolidation: {child} was already folded into {result.path}; removed it")
    else:
        click.echo(f"consolidated {child} into {result.path} ({format_size(result.stored_bytes)}, "
                   f"{result.chunks_from_parents} chunks taken from parents"
                   + (", still an incremental image" if result.still_a_child else ", standalone") + ")"
                   + (f"; removed {', '.join(result.removed)}" if result.removed else ""))
