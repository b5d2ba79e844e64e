"""mount and umount: the image as a read-only FUSE filesystem (disk.raw, partitions/, files/, info.json)."""
from __future__ import annotations

import click

from ..operations import mount as mount_op
from ..units import format_size
from .main import cli
from .options import SIZE, password_options, reading_password


@cli.command()
@click.argument("image", type=click.Path())
@click.argument("mountpoint")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground and log to stderr (for debugging).")
@click.option("--allow-other", is_flag=True,
              help="Let other users see the mount; the image's owners and modes are then enforced.")
@click.option("--cache-size", type=SIZE, default="64M", show_default=True,
              help="Memory for decompressed chunks.")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Log of the mount daemon (default: syslog).")
@password_options
@click.pass_obj
def mount(app, image, mountpoint, foreground, allow_other, cache_size, log_file, password_file):
    """Mount an image read-only: MOUNTPOINT/disk.raw, partitions/p<N>.raw, files/p<N>/, info.json.

    The files view starts the libguestfs appliance on first access (20-30 s without KVM).

    Example: imgkit mount backup.imgk /mnt/backup && cp /mnt/backup/files/p1/etc/fstab .
    """
    import os
    try:
        hidden = len(os.listdir(mountpoint))
    except OSError:
        hidden = 0  # missing or unreadable: mount_op.mount says so
    warning = (f"imgkit: warning: {mountpoint} is not empty: its {hidden} entr{'y is' if hidden == 1 else 'ies are'} "
               "hidden while the image is mounted there (they come back after umount)") if hidden else None
    if warning and foreground:  # a foreground mount runs until unmounted: say it now
        click.echo(warning, err=True)
    pid = mount_op.mount(image, mountpoint, password=reading_password(password_file), foreground=foreground,
                         allow_other=allow_other, cache_size=cache_size, log_file=log_file,
                         debug=app.debug if app else False)
    if warning and not foreground:  # once the mount is live (a refused mount hides nothing)
        click.echo(warning, err=True)
    if not foreground:
        click.echo(f"mounted {image} on {mountpoint} (daemon pid {pid}, cache {format_size(cache_size)}); "
                   f"unmount with: imgkit umount {mountpoint}")


@cli.command()
@click.argument("mountpoint")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the daemon to stop before unmounting directly.")
def umount(mountpoint, timeout):
    """Unmount an imgkit mount (also cleans up a stale mount left by a killed daemon).

    Example: imgkit umount /mnt/backup
    """
    how = mount_op.unmount(mountpoint, timeout)
    click.echo(f"unmounted {mountpoint}" + (" (stale mount cleaned up)" if how == "stale" else ""))
