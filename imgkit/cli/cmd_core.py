"""The core commands: capture, restore, info, verify."""
from __future__ import annotations

import os
import sys

import click

from .. import api
from ..errors import BadImage, CorruptChunk, ImgkitError, InputError, NewerFormat
from ..formats.imgk_settings import DEFAULT_CHUNK_SIZE, LEVEL_DEFAULT, LEVEL_FAST, LEVEL_HIGH, LEVEL_NONE, MAX_LEVEL, MIN_LEVEL
from ..units import format_size
from .main import cli
from .options import (SIZE, SPLIT_SIZE, json_option, make_progress, new_password, password_options,
                      progress_option, reading_password)
from .output import emit_json, render_info


def confirm_or_refuse(yes: bool):
    """The confirmation policy of every overwriting command: --yes, a terminal question, or refusal."""
    if yes:
        return None

    def ask(text: str) -> bool:
        if not sys.stdin.isatty():
            raise InputError(text.split(". ")[0] + ": refusing without --yes (no terminal to ask)",
                             hint="add --yes to confirm")
        click.echo(text, err=True)
        return click.confirm("Continue?", default=False, err=True)
    return ask


@cli.command()
@click.argument("source", type=click.Path())
@click.argument("image", type=click.Path())
@click.option("--level", type=click.IntRange(MIN_LEVEL, MAX_LEVEL), help=f"zstd level (default {LEVEL_DEFAULT}).")
@click.option("--fast", is_flag=True, help=f"zstd level {LEVEL_FAST}.")
@click.option("--high", is_flag=True, help=f"zstd level {LEVEL_HIGH}.")
@click.option("--no-compress", is_flag=True, help="Store chunks uncompressed.")
@click.option("--chunk-size", type=SIZE,
              help=f"Chunk size (64K..64M, power of two; default {DEFAULT_CHUNK_SIZE >> 20}M, or the base's).")
@click.option("--split-size", type=SPLIT_SIZE,
              help="Split into volumes of at most SIZE (650M, 4000M) or a preset: fat32 (4 GiB - 1 byte), "
                   "dvd (single-layer DVD, 4,692 MB).")
@click.option("--encrypt", is_flag=True, help="Encrypt with a password (prompted twice).")
@password_options
@click.option("--force", is_flag=True, help="Replace an existing image.")
@click.option("--yes", "-y", is_flag=True,
              help="Remove the partial files of an interrupted earlier capture to IMAGE without asking.")
@click.option("--sector-by-sector", is_flag=True,
              help="Keep every byte, free space too (forensics, unknown layouts). Default: only used blocks.")
@click.option("--partitions", metavar="LIST",
              help="Capture only these partitions (numbers, GPT names or labels, e.g. 1,3 or EFI,root), "
                   "plus the partition table and boot code.")
@click.option("--base", type=click.Path(dir_okay=False), metavar="PARENT",
              help="Incremental: store only the chunks that changed since the image PARENT (a full image "
                   "or another incremental); the new image needs PARENT to be read.")
@progress_option
@json_option
def capture(source, image, level, fast, high, no_compress, chunk_size, split_size, encrypt, password_file, force,
            yes, sector_by_sector, partitions, base, progress_mode, as_json):
    """Capture a disk, raw image or ISO into an imgk image.

    Filesystem-aware by default: ext2/3/4, FAT, exFAT, NTFS, XFS, btrfs and swap partitions store only
    their used blocks; other partitions and the space outside partitions are kept whole.

    Examples: imgkit capture /dev/sdb backup.imgk --high --partitions 1,2;
    imgkit capture /dev/sdb tue.imgk --base mon.imgk
    """
    # Separate flags (not one shared destination), so that two presets given together are seen
    # and refused like --level with one, instead of the last one silently winning.
    chosen = [name for name, on in (("fast", fast), ("high", high), ("none", no_compress)) if on]
    if len(chosen) > 1:
        raise click.UsageError("--fast, --high and --no-compress exclude each other")
    preset = chosen[0] if chosen else None
    if level is not None and preset:
        raise click.UsageError("--level and --fast/--high/--no-compress exclude each other")
    if level is None:
        level = {"fast": LEVEL_FAST, "high": LEVEL_HIGH, "none": LEVEL_NONE}.get(preset, LEVEL_DEFAULT)
    if password_file and not encrypt and not base:  # the user meant an encrypted image: never write it in clear
        raise click.UsageError("--password-file without --encrypt: add --encrypt to encrypt the image")
    # With --base, --password-file opens the base; an encrypted base makes an encrypted child under
    # the same password (api.capture), a plain base refuses --encrypt.
    password = new_password(password_file) if encrypt else None
    _offer_partials_cleanup(image, yes)
    result = api.capture(source, image, level=level, chunk_size=chunk_size, split_size=split_size,
                         password=password, force=force, progress=make_progress("capture", progress_mode),
                         source_password=reading_password(password_file),
                         sector_by_sector=sector_by_sector, partitions=partitions, base=base)
    for w in result.warnings:
        click.echo(f"imgkit: warning: {w}", err=True)
    doc = {"warnings": result.warnings, "image": result.paths[0], "volumes": result.paths,
           "logical_size": result.logical_size,
           "stored_size": result.stored_bytes, "data_chunks": result.data_chunks,
           "zero_chunks": result.zero_chunks, "free_chunks": result.free_chunks,
           "deduplicated_chunks": result.deduplicated, "parent_chunks": result.parent_chunks,
           "base": base, "seconds": round(result.seconds, 3)}
    if as_json:
        emit_json(doc)
    else:
        ratio = result.logical_size / result.stored_bytes if result.stored_bytes else 0
        click.echo(f"captured {format_size(result.logical_size)} into {format_size(result.stored_bytes)} "
                   f"({ratio:.2f}x) in {result.seconds:.1f} s: {result.paths[0]}"
                   + (f" (+{len(result.paths) - 1} volumes)" if len(result.paths) > 1 else "")
                   + (f"; {result.parent_chunks} unchanged chunks left in {base}" if base else ""))


def _offer_partials_cleanup(image: str, yes: bool) -> None:
    """An earlier capture to IMAGE killed before it finished left dot-named partial files: say so,
    and remove them with consent (--yes, or yes at the terminal's question)."""
    from ..operations.capture import stale_partials
    found = stale_partials(image)
    if not found:
        return
    total = sum(os.path.getsize(p) for p in found)
    listing = ", ".join(os.path.basename(p) for p in found)
    click.echo(f"imgkit: warning: an interrupted capture to {image} left {len(found)} partial file(s) "
               f"({format_size(total)}): {listing}", err=True)
    if yes or (sys.stdin.isatty() and click.confirm("Remove them?", default=True, err=True)):
        for p in found:
            os.unlink(p)
        click.echo(f"imgkit: removed {len(found)} partial file(s), {format_size(total)} freed", err=True)
    else:
        click.echo("hint: rerun with --yes to remove them, or delete them yourself", err=True)


@cli.command()
@click.argument("image", type=click.Path())
@click.argument("target", type=click.Path())
@click.option("--yes", "-y", is_flag=True, help="Do not ask before overwriting the target.")
@click.option("--verify", "verify_after", is_flag=True, help="Read the target back and compare hashes.")
@click.option("--discard", is_flag=True, help="Discard (TRIM) zero ranges on a device instead of writing zeros.")
@click.option("--partition", "partition", type=click.IntRange(0), metavar="N",
              help="Restore only partition N of the image (to the target's partition N, a partition device, or a file).")
@click.option("--to-partition", type=click.IntRange(0), metavar="M",
              help="With --partition: write into partition M of the target instead of the same number.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--keep-going", is_flag=True,
              help="A damaged chunk does not stop the restore: its range is written as zeros and reported "
                   "(partition, files where the filesystem tells); exit 1 if any.")
@click.option("--grow", is_flag=True,
              help="On a larger disk, grow the last partition and its filesystem (ext*, NTFS, FAT) to fill it.")
@click.option("--force", is_flag=True, help="Replace an existing rbd:POOL/IMAGE target (never one in use).")
@click.option("--shrink", type=click.Choice(["proportional", "last"]), is_flag=False, flag_value="proportional",
              default=None, help="On a smaller disk, shrink filesystems' free space (all in proportion, or only "
                                 "the last partition with '--shrink last'); --dry-run shows the plan.")
@click.option("--target-size", type=SIZE, metavar="SIZE",
              help="With --shrink onto a file: its size (default: the existing file's size).")
@password_options
@progress_option
@json_option
def restore(image, target, yes, verify_after, discard, partition, to_partition, dry_run, keep_going, grow, force,
            shrink, target_size, password_file, progress_mode, as_json):
    """Restore an image to a block device or a file (sparse), or one partition of it.

    On a larger disk the backup GPT is moved to the end; --grow also grows the last partition.

    Examples: imgkit restore backup.imgk /dev/sdc --verify;
    imgkit restore backup.imgk /dev/sdc --partition 2 --dry-run
    """
    if to_partition is not None and partition is None:
        raise click.UsageError("--to-partition needs --partition")
    if keep_going and (partition is not None or shrink or dry_run):
        raise click.UsageError("--keep-going applies to a whole-disk restore (not --partition, --shrink or --dry-run)")
    if partition is not None and (grow or verify_after or discard or shrink):
        raise click.UsageError("--grow, --shrink, --verify and --discard apply to whole-disk restores, not --partition")
    if shrink and (grow or verify_after):
        raise click.UsageError("--shrink excludes --grow and --verify (a shrunk disk differs from the image)")
    if target_size is not None and not shrink:
        raise click.UsageError("--target-size needs --shrink")
    password = reading_password(password_file)
    if partition is not None:
        plan = api.plan_partition_restore(image, target, partition, to_partition=to_partition, password=password,
                                          check=dry_run)
        if dry_run:
            emit_json({"dry_run": True, "plan": plan.to_dict()}) if as_json else click.echo(f"plan: {plan.describe()}")
            return
        if not as_json:
            click.echo(f"plan: {plan.describe()}", err=True)
        plan, result = api.restore_partition(image, target, partition, to_partition=to_partition,
                                             password=password, confirm=confirm_or_refuse(yes),
                                             progress=make_progress("restore", progress_mode))
        if as_json:
            emit_json({"target": result.target, "bytes_written": result.bytes_written,
                       "seconds": round(result.seconds, 3), "plan": plan.to_dict()})
        else:
            click.echo(f"restored partition {partition} to {target}"
                       + (f" partition {plan.to_partition}" if plan.to_partition is not None else "")
                       + f": {format_size(result.bytes_written)} of data written in {result.seconds:.1f} s")
        return
    if dry_run:
        # Every check of the real run: the plan is printed, then a refusal is the real run's own
        # error with its exit code (a dry run that says yes to what the run refuses misleads).
        doc = api.plan_restore(image, target, password=password, shrink=shrink, target_size=target_size)
        doc["grow"] = grow
        refusal = None
        try:
            result = api.restore(image, target, password=password, grow=grow, force=force, shrink=shrink,
                                 target_size=target_size, dry_run=True)
            doc["text"], doc["final_size"] = result.plan, result.final_size
        except ImgkitError as e:
            refusal = e
            doc["refused"] = str(e)
        if as_json:
            emit_json({"dry_run": True, "ok": refusal is None, "plan": doc})
        else:
            click.echo(f"plan: restore the whole image ({format_size(doc['image_size'])}) to {target}"
                       + (", then grow the last partition to fill it" if grow else ""))
            if doc.get("text"):
                click.echo(doc["text"])
            if doc.get("plan_text") and doc["plan_text"] != doc.get("text"):
                click.echo(doc["plan_text"])
            if doc.get("refused"):
                click.echo(f"refused: {doc['refused']}")
        if refusal is not None:
            raise refusal
        return
    result = api.restore(image, target, password=password, confirm=confirm_or_refuse(yes),
                         verify=verify_after, discard=discard, progress=make_progress("restore", progress_mode),
                         grow=grow, force=force, shrink=shrink, target_size=target_size, keep_going=keep_going)
    damaged = result.damaged or []
    if as_json:
        emit_json({"target": result.target, "bytes_written": result.bytes_written,
                   "seconds": round(result.seconds, 3), "verified": result.verified, "grow": result.grow,
                   "shrink": result.shrink, "damaged": [d.to_dict() for d in damaged]})
    else:
        click.echo(f"restored {image} to {target}: {format_size(result.bytes_written)} of data written "
                   f"in {result.seconds:.1f} s" + (", verified" if result.verified else ""))
        for note in ((result.grow or {}).get("notes") or []) + (
                ["backup GPT moved to the end of the disk"] if (result.grow or {}).get("moved_gpt") else []):
            click.echo(f"  {note}")
        for note in (result.shrink or {}).get("notes") or []:
            click.echo(f"  {note}")
    if damaged:
        click.echo(f"imgkit: DAMAGED: {len(damaged)} range(s) of the image failed their check and were "
                   f"written as zeros:", err=True)
        for d in damaged:
            click.echo(f"  {d.describe()}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("image", type=click.Path())
@password_options
@json_option
def info(image, password_file, as_json):
    """Show what an image holds: size, stored size, partitions, filesystems.

    Example: imgkit info backup.imgk --json
    """
    with api.open_image(image, reading_password(password_file)) as img:
        doc = api.image_info(img)
    emit_json(doc) if as_json else click.echo(render_info(doc))


@cli.command()
@click.argument("image", type=click.Path())
@click.option("--shallow", is_flag=True,
              help="Of an incremental image, check only the chunks it stores itself (its parents need not be there).")
@password_options
@progress_option
@json_option
def verify(image, shallow, password_file, progress_mode, as_json):
    """Decompress and check every chunk. Exit 0 if intact, 1 if damaged.

    An incremental image is checked with its whole chain: every chunk it reads from a parent too.

    Example: imgkit verify backup.imgk
    """
    try:
        report = api.verify(image, password=reading_password(password_file),
                            progress=make_progress("verify", progress_mode), shallow=shallow)
    except BadImage as e:
        if isinstance(e, NewerFormat) or (not api.is_imgk(image) and os.path.exists(image)):
            raise  # not damage: a newer imgkit's image (exit 3 with its hint) or not an image at all
        doc = {"ok": False, "error": str(e), "first_bad_offset": e.offset if isinstance(e, CorruptChunk) else None}
        emit_json(doc) if as_json else click.echo(f"DAMAGED: {e}", err=True)
        sys.exit(1)
    doc = {"ok": report.ok, "chunks": report.chunks, "data_chunks": report.data_chunks,
           "bytes_checked": report.bytes_checked, "bad_chunks": report.bad_count, "bad": report.bad,
           "first_bad_offset": report.first_bad_offset, "seconds": round(report.seconds, 3)}
    if as_json:
        emit_json(doc)
    elif report.ok:
        click.echo(f"OK: {report.data_chunks} stored chunks ({format_size(report.bytes_checked)}) verified")
    else:
        click.echo(f"DAMAGED: {report.bad_count} bad chunk(s); first at offset {report.first_bad_offset}: "
                   f"{report.bad[0]['error']}", err=True)
    sys.exit(0 if report.ok else 1)
