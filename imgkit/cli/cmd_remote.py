"""Commands about remote storage: s3-cleanup (incomplete multipart uploads a killed capture left)."""
from __future__ import annotations

import click

from ..errors import InputError
from ..remote import s3
from ..remote.locations import is_s3
from ..units import parse_duration
from .main import cli
from .options import json_option
from .output import emit_json


@cli.command("s3-cleanup")
@click.argument("prefix", metavar="s3://BUCKET[/PREFIX]")
@click.option("--older-than", default="0s", show_default=True, metavar="DURATION",
              help="Only uploads started longer ago (30s, 10m, 2h, 1d): spares captures still running.")
@json_option
def s3_cleanup(prefix, older_than, as_json):
    """Abort incomplete multipart uploads under an S3 prefix.

    A capture that fails or is interrupted aborts its own upload; one that was killed (SIGKILL, power
    loss) leaves its parts stored but never an object. This frees them.

    Example: imgkit s3-cleanup s3://backups/web1/ --older-than 1d
    """
    if not is_s3(prefix):
        raise InputError(f"{prefix}: not an s3://bucket/prefix location")
    aborted = s3.abort_incomplete_uploads(prefix, parse_duration(older_than))
    if as_json:
        emit_json({"aborted": aborted})
    else:
        click.echo(f"aborted {len(aborted)} incomplete upload(s)" + "".join(f"\n  {k}" for k in aborted))
